// Safe defaults and loud errors: a handler's failure after an upgrade is
// reported and its WebSocket closed with 1011, refused handshakes are logged,
// the Upgrader and the Dialer bound message size, keepalive notices a silent
// peer, and dial and listen errors say what was being dialed or listened on.
import assert from "node:assert/strict";
import {
  CloseError,
  Conn,
  Dialer,
  MESSAGE_TYPE,
  ReadLimitError,
  serve,
  Upgrader,
} from "../mod.ts";
import { FrameReader, OP, parseClose } from "./_frames.ts";
import { rawPeer } from "./_helpers.ts";

const MiB = 1024 * 1024;

/** Collects what `console[name]` prints while `body` runs. */
async function capture<T>(
  name: "error" | "warn",
  body: (lines: unknown[][]) => Promise<T>,
): Promise<T> {
  const original = console[name];
  const lines: unknown[][] = [];
  console[name] = (...args: unknown[]) => lines.push(args);
  try {
    return await body(lines);
  } finally {
    console[name] = original;
  }
}

function listenOptions() {
  return { hostname: "127.0.0.1", port: 0, onListen() {} };
}

/** A browser-style client; resolves its close event. */
async function closeAfterSending(url: string, text: string) {
  const ws = new WebSocket(url);
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = reject;
  });
  const closed = new Promise<CloseEvent>((resolve) => ws.onclose = resolve);
  ws.send(text);
  return await closed;
}

// ------------------------------------------------------ failing handlers

Deno.test("a handler that fails after upgrading is logged with its request, and its WebSocket closed with 1011", async () => {
  await capture("error", async (errors) => {
    const upgrader = new Upgrader();
    await using server = serve(listenOptions(), async (request) => {
      const conn = await upgrader.upgrade(request);
      await conn.readMessage();
      throw new Error("boom");
    });
    const closed = await closeAfterSending(
      `ws://127.0.0.1:${server.addr.port}/room/1?token=secret`,
      "hi",
    );
    assert.equal(closed.code, 1011);
    assert.equal(errors.length, 1);
    // The path, not the query, which may carry credentials.
    assert.equal(errors[0][0], "Request handler failed: GET /room/1:");
    assert.equal((errors[0][1] as Error).message, "boom");
  });
});

Deno.test("onError sees a handler's failure after the upgrade; its Response is dropped", async () => {
  await capture("error", async (errors) => {
    const seen: unknown[] = [];
    const upgrader = new Upgrader();
    await using server = serve({
      ...listenOptions(),
      onError(error) {
        seen.push(error);
        return new Response("not sent");
      },
    }, async (request) => {
      const conn = await upgrader.upgrade(request);
      await conn.readMessage();
      throw new RangeError("bad state");
    });
    const closed = await closeAfterSending(
      `ws://127.0.0.1:${server.addr.port}/`,
      "hi",
    );
    assert.equal(closed.code, 1011);
    assert.equal(seen.length, 1);
    assert.ok(seen[0] instanceof RangeError);
    assert.deepEqual(errors, [], "onError replaces the default log");
  });
});

Deno.test("a read loop ended by the peer's close is no handler failure", async () => {
  await capture("error", async (errors) => {
    const done = Promise.withResolvers<unknown>();
    const upgrader = new Upgrader();
    await using server = serve(listenOptions(), async (request) => {
      const conn = await upgrader.upgrade(request);
      try {
        for (;;) await conn.readMessage();
      } catch (error) {
        done.resolve(error);
        throw error;
      }
    });
    const ws = new WebSocket(`ws://127.0.0.1:${server.addr.port}/`);
    await new Promise((resolve) => ws.onopen = resolve);
    const closed = new Promise((resolve) => ws.onclose = resolve);
    ws.close(4000, "bye");
    assert.ok(await done.promise instanceof CloseError);
    await closed;
    // Give a report, were there one, time to be printed.
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.deepEqual(errors, []);
  });
});

// ------------------------------------------------------ refused handshakes

Deno.test("a refused handshake is logged once as a warning, with its request and client", async () => {
  await capture("warn", (warnings) =>
    capture("error", async (errors) => {
      const upgrader = new Upgrader();
      await using server = serve(listenOptions(), async (request) => {
        await upgrader.upgrade(request);
      });
      const response = await fetch(`http://127.0.0.1:${server.addr.port}/ws`, {
        headers: {
          connection: "upgrade",
          upgrade: "websocket",
          "sec-websocket-version": "13",
          "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
          origin: "http://evil.example",
        },
      });
      assert.equal(response.status, 403);
      await response.body?.cancel();
      assert.equal(warnings.length, 1);
      assert.match(
        String(warnings[0][0]),
        /^WebSocket handshake refused with 403 for GET \/ws from 127\.0\.0\.1:\d+: Cannot upgrade the connection: the origin "http:\/\/evil\.example" is not allowed$/,
      );
      assert.deepEqual(
        errors,
        [],
        "the handler's HandshakeError is not logged again",
      );
    }));
});

Deno.test("logRefusals: false keeps refusals quiet; the error option still sees them", async () => {
  await capture("warn", async (warnings) => {
    const statuses: number[] = [];
    const upgrader = new Upgrader({
      logRefusals: false,
      error(_request, error) {
        statuses.push(error.status);
        return new Response("no", { status: error.status });
      },
    });
    await using server = serve(listenOptions(), async (request) => {
      await upgrader.upgrade(request).catch(() => {});
    });
    const response = await fetch(`http://127.0.0.1:${server.addr.port}/`);
    assert.equal(response.status, 400);
    assert.equal(await response.text(), "no");
    assert.deepEqual(statuses, [400]);
    assert.deepEqual(warnings, []);
  });
});

// ------------------------------------------------------ default read limit

/** A serve() echo server whose Upgrader has `options`. */
function echoServer(options: ConstructorParameters<typeof Upgrader>[0]) {
  const upgrader = new Upgrader(options);
  const failures: unknown[] = [];
  const server = serve(listenOptions(), async (request) => {
    const conn = await upgrader.upgrade(request);
    try {
      for (;;) {
        const { type, data } = await conn.readMessage();
        await conn.writeMessage(type, data);
      }
    } catch (error) {
      failures.push(error);
    }
  });
  return { server, failures };
}

Deno.test("the Upgrader refuses messages over 16 MiB by default, and readLimit: 0 lifts the limit", async () => {
  const big = new Uint8Array(16 * MiB + 1);
  const dialer = new Dialer({ readLimit: 0 });
  {
    const { server, failures } = echoServer({});
    const { conn } = await dialer.dial(`ws://127.0.0.1:${server.addr.port}/`);
    await conn.writeMessage(MESSAGE_TYPE.Binary, new Uint8Array(16 * MiB));
    assert.equal((await conn.readMessage()).data.length, 16 * MiB);
    await conn.writeMessage(MESSAGE_TYPE.Binary, big).catch(() => {});
    const error = await conn.readMessage().catch((e) => e);
    assert.ok(error instanceof CloseError);
    assert.equal(error.code, 1009);
    conn.close();
    await server.shutdown();
    assert.ok(failures[0] instanceof ReadLimitError);
  }
  {
    const { server } = echoServer({ readLimit: 0 });
    const { conn } = await dialer.dial(`ws://127.0.0.1:${server.addr.port}/`);
    await conn.writeMessage(MESSAGE_TYPE.Binary, big);
    assert.equal((await conn.readMessage()).data.length, big.length);
    await conn.closeGracefully();
    await server.shutdown();
  }
});

Deno.test("the Dialer refuses messages over 16 MiB by default", async () => {
  const upgrader = new Upgrader();
  const sent = Promise.withResolvers<void>();
  await using server = serve(listenOptions(), async (request) => {
    const conn = await upgrader.upgrade(request);
    await conn.writeMessage(MESSAGE_TYPE.Binary, new Uint8Array(16 * MiB + 1))
      .catch(() => {});
    await conn.readMessage().catch(() => {});
    sent.resolve();
  });
  const { conn } = await new Dialer().dial(
    `ws://127.0.0.1:${server.addr.port}/`,
  );
  await assert.rejects(conn.readMessage(), ReadLimitError);
  await sent.promise;
  conn.close();
});

// ------------------------------------------------------ keepalive

Deno.test("keepalive pings a silent peer, then closes with 1001 and fails reads with 1006", async () => {
  const { conn, remote } = rawPeer("server", {
    conn: { pingInterval: 50, pongTimeout: 100 },
  });
  const reading = conn.readMessage().catch((error) => error);
  const frames = new FrameReader(remote);
  const ping = await frames.next();
  assert.equal(ping?.opcode, OP.ping);
  const close = await frames.next();
  assert.equal(close?.opcode, OP.close);
  assert.equal(parseClose(close.payload).code, 1001);
  assert.equal(await frames.next(), null, "the transport is closed");
  const error = await reading;
  assert.ok(error instanceof CloseError);
  assert.equal(error.code, 1006);
  assert.match(error.message, /did not answer a keepalive ping/);
  assert.equal(conn.closed, true);
  remote.close();
});

Deno.test("keepalive keeps a peer that answers, and pings no busy connection", async () => {
  // Two Conns pinging each other: each answers the other's pings while it
  // reads, so both stay open well past several timeouts.
  const options = { pingInterval: 30, pongTimeout: 60 };
  const { server, client } = await (async () => {
    using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const [a, b] = await Promise.all([
      listener.accept(),
      Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
    ]);
    return {
      server: new Conn(a, { role: "server", ...options }),
      client: new Conn(b, { role: "client", ...options }),
    };
  })();
  const reads = [server, client].map((conn) =>
    conn.readMessage().catch((error) => error)
  );
  await new Promise((resolve) => setTimeout(resolve, 400));
  assert.equal(server.closed || client.closed, false);
  await Promise.all([server.closeGracefully(), client.closeGracefully()]);
  for (const error of await Promise.all(reads)) {
    assert.ok(error instanceof CloseError);
    assert.equal(error.code, 1000);
  }

  // A peer that keeps sending gets no pings.
  const { conn, remote, send } = rawPeer("server", {
    conn: { pingInterval: 40, pongTimeout: 1000 },
  });
  const frames: number[] = [];
  const watching = (async () => {
    const reader = new FrameReader(remote);
    for (let f; (f = await reader.next()) !== null;) frames.push(f.opcode);
  })();
  for (let i = 0; i < 20; i++) {
    await send({ opcode: OP.text, payload: "tick" });
    await conn.readMessage();
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  conn.close();
  await watching;
  assert.deepEqual(frames, []);
  remote.close();
});

// ------------------------------------------------------ option checks

Deno.test("readLimit, pingInterval and pongTimeout are checked where they are given", () => {
  const cases: [string, Record<string, number>][] = [
    ["readLimit must be a non-negative integer, got -1", { readLimit: -1 }],
    ["readLimit must be a non-negative integer, got 1.5", { readLimit: 1.5 }],
    [
      "pingInterval must be a finite number of milliseconds >= 0, got Infinity",
      { pingInterval: Infinity },
    ],
    [
      "pongTimeout must be a finite number of milliseconds > 0, got 0",
      { pongTimeout: 0 },
    ],
  ];
  for (const [message, options] of cases) {
    assert.throws(() => new Upgrader(options), {
      name: "RangeError",
      message: `Cannot create the Upgrader: ${message}`,
    });
    assert.throws(() => new Dialer(options), {
      name: "RangeError",
      message: `Cannot create the dialer: ${message}`,
    });
    const { remote } = rawPeer("server");
    assert.throws(() => new Conn(remote, { role: "client", ...options }), {
      name: "RangeError",
      message: `Cannot create connection: ${message}`,
    });
    remote.close();
  }
});

// ------------------------------------------------------ errors with context

Deno.test("a dial to a closed port names the URL and keeps the platform error", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr;
  listener.close();
  const error = await new Dialer().dial(
    `ws://127.0.0.1:${port}/chat?key=secret`,
  )
    .catch((e) => e);
  assert.ok(error instanceof Deno.errors.ConnectionRefused);
  assert.match(
    error.message,
    new RegExp(`^Cannot dial ws://127\\.0\\.0\\.1:${port}/chat: `),
  );
  assert.ok(error.cause instanceof Deno.errors.ConnectionRefused);
});

Deno.test("listening on a taken port names the address", async () => {
  using taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = taken.addr;
  const error = Promise.try(() =>
    serve({ hostname: "127.0.0.1", port, onListen() {} }, () => new Response())
  );
  await assert.rejects(error, Deno.errors.AddrInUse);
  const reason = await error.catch((e) => e);
  assert.match(
    reason.message,
    new RegExp(`^Cannot listen on 127\\.0\\.0\\.1:${port}: `),
  );
  assert.ok(reason.cause instanceof Deno.errors.AddrInUse);
});

Deno.test("a wss: dial to a plain serve() fails at once with a TLS error", async () => {
  // A head timeout far beyond the dial's: the refusal must not wait for it.
  await using server = serve(
    { ...listenOptions(), headTimeout: 60_000 },
    () => new Response("plain"),
  );
  const url = `wss://127.0.0.1:${server.addr.port}/`;
  const error = await new Dialer({ handshakeTimeout: 20_000 }).dial(url)
    .catch((e) => e);
  assert.ok(!(error instanceof Deno.errors.TimedOut), String(error));
  assert.match(
    error.message,
    new RegExp(
      `^Cannot dial wss://127\\.0\\.0\\.1:${server.addr.port}/: the TLS handshake failed: `,
    ),
  );
});
