// Graceful shutdown under load: shutdown() while clients are
// echoing answers every message the server accepted before it, closes the
// WebSocket connections with 1001 within the timeout the application chose,
// and resolves.

import assert from "node:assert/strict";
import { CloseError, type Conn, isCloseError, MESSAGE_TYPE } from "../conn.ts";
import { Dialer } from "../dialer.ts";
import { serve, Upgrader } from "../upgrader.ts";
import { closePayload, frame, OP } from "./_frames.ts";
import { rawHandshake, readUntilClose } from "./_reliability/helpers.ts";

const CLIENTS = 20;

/** An echo server as an application writes it, counting what it read. */
function echoServer(processing?: () => Promise<void>) {
  const upgrader = new Upgrader();
  const accepted = new Map<string, number>();
  const loops: Promise<void>[] = [];
  const server = serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    async (request) => {
      const name = new URL(request.url).pathname.slice(1);
      const conn = await upgrader.upgrade(request);
      accepted.set(name, 0);
      const loop = (async () => {
        try {
          while (true) {
            const { type, data } = await conn.readMessage();
            accepted.set(name, accepted.get(name)! + 1);
            await processing?.();
            await conn.writeMessage(type, data);
          }
        } catch {
          // The close handshake (or its timeout) ends the loop.
        } finally {
          conn.close();
        }
      })();
      loops.push(loop);
      await loop;
    },
  );
  return { server, accepted, loops };
}

/**
 * Sends numbered messages as fast as the echoes come back (up to 8 in
 * flight) until the server closes; returns the echoes and the close error.
 */
async function echoClient(conn: Conn) {
  const echoes: number[] = [];
  let sent = 0;
  let error: unknown;
  const window = 8;
  const send = () =>
    conn.writeMessage(MESSAGE_TYPE.Text, `message ${sent++}`).catch(() => {});
  for (let i = 0; i < window; i++) send();
  try {
    while (true) {
      const { data } = await conn.readMessage();
      const text = new TextDecoder().decode(data);
      assert.equal(text, `message ${echoes.length}`, "echoes come in order");
      echoes.push(echoes.length);
      send();
    }
  } catch (caught) {
    error = caught;
  }
  conn.close();
  return { echoes: echoes.length, sent, error };
}

Deno.test("shutdown() under load answers every accepted message, closes every WebSocket with 1001 and resolves", async () => {
  const { server, accepted, loops } = echoServer();
  const url = `ws://127.0.0.1:${server.addr.port}`;
  const conns = await Promise.all(
    Array.from(
      { length: CLIENTS },
      async (_, i) => (await new Dialer().dial(`${url}/c${i}`)).conn,
    ),
  );
  const clients = conns.map(echoClient);
  // Let traffic flow, then shut down in the middle of it.
  await new Promise((resolve) => setTimeout(resolve, 200));
  const started = performance.now();
  const snapshot = new Map(accepted);
  // A timeout no healthy run comes near: ending before it means shutdown()
  // ended on the peers' answers.
  const timeout = 30_000;
  await server.shutdown({ closeWebSockets: true, timeout });
  const took = performance.now() - started;
  const results = await Promise.all(clients);
  await Promise.all(loops);
  let total = 0;
  let unanswered = 0;
  results.forEach((result, i) => {
    const before = snapshot.get(`c${i}`)!;
    assert.ok(before > 0, `client ${i} was echoing`);
    assert.ok(
      result.echoes >= before,
      `client ${i}: ${result.echoes} echoes for ${before} accepted before shutdown()`,
    );
    // Messages that crossed the server's close frame can be read but no
    // longer answered (a close frame was sent): counted, not failed.
    unanswered += accepted.get(`c${i}`)! - result.echoes;
    assert.ok(isCloseError(result.error, 1001), String(result.error));
    total += result.echoes;
  });
  assert.ok(took < timeout, `shutdown() took ${took} ms with answering peers`);
  console.log(
    `shutdown: ${CLIENTS} clients, ${total} messages echoed, ${unanswered} read during the closing handshake and not answered, shutdown() took ${
      Math.round(took)
    } ms`,
  );
  await assert.rejects(
    Deno.connect({ hostname: "127.0.0.1", port: server.addr.port }),
    Deno.errors.ConnectionRefused,
  );
});

Deno.test("shutdown() waits the application's timeout for a peer that never answers the close, then closes it", async () => {
  const { server, loops } = echoServer();
  const silent = await rawHandshake(server.addr.port, "silent");
  assert.equal(silent.status, 101);
  const timeout = 300;
  const started = performance.now();
  await server.shutdown({ closeWebSockets: true, timeout });
  const took = performance.now() - started;
  await Promise.all(loops);
  // The peer did get the 1001, and then the connection was closed.
  assert.equal(await readUntilClose(silent.frames), 1001);
  assert.equal(await silent.frames.next(), null);
  assert.ok(took >= timeout - 20, `shutdown() took ${took} ms`);
  assert.ok(took < timeout + 10_000, `shutdown() took ${took} ms`);
  silent.conn.close();
});

Deno.test("shutdown() while a client answers late still closes with 1001 once it answers", async () => {
  const { server, loops } = echoServer();
  const client = await rawHandshake(server.addr.port, "late");
  assert.equal(client.status, 101);
  const timeout = 30_000;
  const started = performance.now();
  const shutting = server.shutdown({ closeWebSockets: true, timeout });
  assert.equal(await readUntilClose(client.frames), 1001);
  // Answer after a while; shutdown() resolves then, not at the timeout.
  await new Promise((resolve) => setTimeout(resolve, 100));
  const close = frame({
    opcode: OP.close,
    payload: closePayload(1001),
    mask: true,
  });
  for (let o = 0; o < close.length;) {
    o += await client.conn.write(close.subarray(o));
  }
  await shutting;
  assert.ok(performance.now() - started < timeout, "resolved on the answer");
  await Promise.all(loops);
  assert.equal(await client.frames.next(), null);
  client.conn.close();
});

Deno.test("shutdown() after a message was read but before it was answered still answers it", async () => {
  // The application takes a while with each message: shutdown() arrives
  // between reading one and answering it.
  let reached!: () => void;
  const inHandler = new Promise<void>((resolve) => reached = resolve);
  const { server, loops } = echoServer(async () => {
    reached();
    await new Promise((resolve) => setTimeout(resolve, 100));
  });
  const { conn } = await new Dialer().dial(
    `ws://127.0.0.1:${server.addr.port}/slow`,
  );
  await conn.writeMessage(MESSAGE_TYPE.Text, "accepted before shutdown");
  await inHandler;
  const shutting = server.shutdown({ closeWebSockets: true, timeout: 2000 });
  const reply = await conn.readMessage().catch((error) => error);
  // Then the close: reading it answers it, so shutdown() ends at once.
  const closing = conn.readMessage().catch((error) => error);
  await shutting;
  await Promise.all(loops);
  assert.ok(isCloseError(await closing, 1001));
  conn.close();
  assert.ok(!(reply instanceof CloseError), `the answer was lost: ${reply}`);
  assert.equal(
    new TextDecoder().decode(reply.data),
    "accepted before shutdown",
  );
});
