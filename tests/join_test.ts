import assert from "node:assert/strict";
import { joinMessages } from "../join.ts";
import { CloseError, MESSAGE_TYPE } from "../frame.ts";
import { connPair, pattern, rawPeer, tcpConnPair } from "./_helpers.ts";
import { closePayload, OP, utf8 } from "./_frames.ts";

const decoder = new TextDecoder();

/** Reads a byte stream to its end. */
async function bytesOf(stream: ReadableStream<Uint8Array>) {
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

Deno.test("joinMessages() joins text and binary messages, each followed by the terminator, and ends at a 1000 close", async () => {
  const { server, client } = connPair();
  await client.writeMessage(MESSAGE_TYPE.Text, "héllo");
  await client.writeMessage(MESSAGE_TYPE.Binary, utf8("wörld"));
  const closing = client.closeGracefully(1000, "", { timeout: 1000 });
  assert.equal(
    decoder.decode(await bytesOf(joinMessages(server, "\r\n"))),
    "héllo\r\nwörld\r\n",
  );
  await closing;
  server.close();
});

Deno.test("joinMessages() keeps empty messages and an empty or binary terminator", async () => {
  const cases: [string | Uint8Array | undefined, string][] = [
    [undefined, "ab"],
    ["", "ab"],
    ["\n", "\na\n\nb\n"],
    [utf8("€"), "€a€€b€"],
  ];
  for (const [terminator, expected] of cases) {
    const { server, client } = connPair("byte");
    for (const text of ["", "a", "", "b"]) {
      await client.writeMessage(MESSAGE_TYPE.Text, text);
    }
    const closing = client.closeGracefully(1000, "", { timeout: 1000 });
    const stream = terminator === undefined
      ? joinMessages(server)
      : joinMessages(server, terminator);
    assert.equal(decoder.decode(await bytesOf(stream)), expected);
    await closing;
    server.close();
  }
});

Deno.test("joinMessages() copies a Uint8Array terminator", async () => {
  const { server, client } = connPair();
  const terminator = utf8(";");
  const stream = joinMessages(server, terminator);
  terminator[0] = 0x21;
  await client.writeMessage(MESSAGE_TYPE.Text, "x");
  const closing = client.closeGracefully(1000, "", { timeout: 1000 });
  assert.equal(decoder.decode(await bytesOf(stream)), "x;");
  await closing;
  server.close();
});

Deno.test("joinMessages() streams a 200 KB fragmented message and its terminator into small BYOB buffers", async () => {
  const { server, client } = await tcpConnPair();
  const payload = pattern(200_000);
  const writing = (async () => {
    const writer = client.nextWriter(MESSAGE_TYPE.Binary);
    for (let at = 0; at < payload.length; at += 30_000) {
      await writer.write(payload.subarray(at, at + 30_000));
    }
    await writer.close();
    await client.closeGracefully(1000, "", { timeout: 2000 });
  })();
  const reader = joinMessages(server, "END").getReader({ mode: "byob" });
  const parts: Uint8Array[] = [];
  let total = 0;
  while (true) {
    const { value, done } = await reader.read(new Uint8Array(7));
    if (done) break;
    assert.ok(value.length > 0 && value.length <= 7);
    parts.push(value);
    total += value.length;
  }
  const joined = new Uint8Array(total);
  let at = 0;
  for (const part of parts) joined.set(part, (at += part.length) - part.length);
  assert.equal(total, payload.length + 3);
  assert.deepEqual(joined.subarray(0, payload.length), payload);
  assert.equal(decoder.decode(joined.subarray(payload.length)), "END");
  await writing;
  server.close();
});

Deno.test("joinMessages() ends on 1001 and on a close frame without a status", async () => {
  for (const payload of [closePayload(1001, "bye"), new Uint8Array(0)]) {
    const { conn, send } = rawPeer("server");
    await send(
      { opcode: OP.text, payload: utf8("last") },
      { opcode: OP.close, payload },
    );
    assert.equal(
      decoder.decode(await bytesOf(joinMessages(conn, "."))),
      "last.",
    );
    conn.close();
  }
});

Deno.test("joinMessages() errors the stream on an unexpected close code or a dead transport", async () => {
  const { conn, send } = rawPeer("server");
  await send(
    { opcode: OP.text, payload: utf8("one") },
    { opcode: OP.close, payload: closePayload(1011, "broken") },
  );
  const reader = joinMessages(conn, "\n").getReader();
  assert.equal(decoder.decode((await reader.read()).value), "one");
  assert.equal(decoder.decode((await reader.read()).value), "\n");
  await assert.rejects(
    reader.read(),
    (error) => error instanceof CloseError && error.code === 1011,
  );
  conn.close();

  const dead = rawPeer("server");
  const stream = joinMessages(dead.conn);
  dead.remote.close();
  await assert.rejects(
    bytesOf(stream),
    (error) => error instanceof CloseError && error.code === 1006,
  );
  dead.conn.close();
});

Deno.test("joinMessages() errors the stream when a normal close cuts a message short", async () => {
  const { conn, send } = rawPeer("server");
  await send(
    { opcode: OP.text, fin: false, payload: utf8("half") },
    { opcode: OP.close, payload: closePayload(1000) },
  );
  const reader = joinMessages(conn, "\n").getReader();
  assert.equal(decoder.decode((await reader.read()).value), "half");
  await assert.rejects(
    reader.read(),
    (error) => error instanceof CloseError && error.code === 1000,
  );
  conn.close();
});

Deno.test("joinMessages() reads nothing until the stream is read (backpressure)", async () => {
  const { server, client } = connPair();
  const stream = joinMessages(server, "\n");
  await client.writeMessage(MESSAGE_TYPE.Text, "first");
  await client.writeMessage(MESSAGE_TYPE.Text, "second");
  // Let any eager pull run: none may take a message off the connection.
  for (let i = 0; i < 5; i++) await new Promise((r) => setTimeout(r, 0));
  const first = await server.readMessage();
  assert.equal(decoder.decode(first.data), "first");
  const reader = stream.getReader();
  assert.equal(decoder.decode((await reader.read()).value), "second");
  await reader.cancel();
  client.close();
  server.close();
});

Deno.test("joinMessages() cancelled while waiting leaves the connection open and stops reading", async () => {
  const { server, client } = connPair();
  const reader = joinMessages(server).getReader();
  const pending = reader.read();
  // Let the stream start and begin its wait for a message.
  for (let i = 0; i < 5; i++) await new Promise((r) => setTimeout(r, 0));
  await reader.cancel(new Error("no longer interested"));
  assert.deepEqual(await pending, { value: undefined, done: true });
  assert.equal(server.closed, false);
  // The aborted wait failed the read side, as any aborted read does.
  await new Promise((r) => setTimeout(r, 0));
  await assert.rejects(server.readMessage(), /no longer interested/);
  await client.writeMessage(MESSAGE_TYPE.Text, "still writable");
  client.close();
  server.close();
});

Deno.test("joinMessages() refuses a terminator that is neither a string nor bytes", () => {
  const { server, client } = connPair();
  for (const bad of [1, null, [10], new Uint16Array(1)]) {
    assert.throws(
      () => joinMessages(server, bad as unknown as string),
      (error) =>
        error instanceof TypeError &&
        error.message ===
          "Cannot join the messages: the terminator must be a string or a Uint8Array",
    );
  }
  client.close();
  server.close();
});
