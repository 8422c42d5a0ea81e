// Chaos: one serve() + Upgrader echo server (a child process, so
// its memory is measured alone) faces many hostile clients at once while
// healthy Dialer clients echo messages of 0 B to 200 KiB. The server must
// stay alive, the healthy clients must get every byte back in order, every
// hostile client must get the close code or HTTP status it deserves, and
// the server's memory must come back to where it started.

import assert from "node:assert/strict";
import { MESSAGE_TYPE } from "../conn.ts";
import { Dialer } from "../dialer.ts";
import { prng } from "../_pipe.ts";
import {
  closePayload,
  concat,
  concatAll,
  frame,
  frames,
  OP,
} from "./_frames.ts";
import {
  closeQuietly,
  drain,
  mib,
  runJsonScript,
  writeAll,
} from "./_helpers.ts";
import {
  type RawClient,
  rawHandshake,
  readResponse,
  readUntilClose,
  ServerProcess,
  type ServerStats,
  upgradeRequest,
} from "./_reliability/helpers.ts";

const READ_LIMIT = 1024 * 1024;
const WRITE_TIMEOUT = 1000;
const HEAD_TIMEOUT = 4000;
/** Copies of each hostile client that run at once. */
const COPIES = Deno.env.get("SOAK") === "1" ? 20 : 3;
const HEALTHY_CLIENTS = 4;
const MESSAGES_PER_CLIENT = 30;
const MiB = 1024 * 1024;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * One kind of hostile client: `run` misbehaves and checks what it got back;
 * `server` is how the server's echo loop must have seen the connection end
 * (undefined: the handler never ran or never upgraded).
 */
interface Hostile {
  name: string;
  server?: string;
  run(server: ServerProcess, name: string): Promise<void>;
}

const DEFLATE_OFFER_HEADER = "Sec-WebSocket-Extensions: permessage-deflate";

/**
 * Handshakes as `name` (offering permessage-deflate with `compressed`, and
 * then expecting it accepted), runs `body` on the upgraded raw connection,
 * and closes it whatever happens.
 */
function upgraded(
  body: (client: RawClient) => Promise<void>,
  { compressed = false } = {},
) {
  return async (server: ServerProcess, name: string) => {
    const extra = compressed ? [DEFLATE_OFFER_HEADER] : [];
    const client = await rawHandshake(server.port, name, extra);
    try {
      assert.equal(client.status, 101, client.head);
      if (compressed) assert.match(client.head, /permessage-deflate/i);
      await body(client);
    } finally {
      closeQuietly(client.conn);
    }
  };
}

/**
 * Handshakes, sends `bytes`, and expects a close frame with `code`, then the
 * end of the TCP connection.
 */
function sendsAndGetsClose(
  bytes: Uint8Array | Promise<Uint8Array>,
  code: number,
  options: { compressed?: boolean } = {},
) {
  return upgraded(async (client) => {
    await writeAll(client.conn, await bytes);
    assert.equal(await readUntilClose(client.frames), code);
    // The server closes the TCP connection after its close frame.
    assert.equal(await client.frames.next(), null);
  }, options);
}

/** Sends a normal close and expects the server's 1000 back. */
async function closeNormally(client: RawClient): Promise<void> {
  await writeAll(
    client.conn,
    frame({ opcode: OP.close, payload: closePayload(1000), mask: true }),
  );
  assert.equal(await readUntilClose(client.frames), 1000);
}

/**
 * Connects without a handshake of its own, sends `head(name)`, and expects
 * an HTTP error answer with `status`, then the end of the connection.
 */
function sendsAndGetsStatus(
  head: (name: string) => Uint8Array | string,
  status: number,
) {
  return async (server: ServerProcess, name: string) => {
    const conn = await Deno.connect({
      hostname: "127.0.0.1",
      port: server.port,
    });
    try {
      await writeAll(conn, head(name));
      const response = await readResponse(conn);
      assert.equal(response.status, status, response.head);
      await drain(conn);
    } finally {
      closeQuietly(conn);
    }
  };
}

/** Deflates `data` as one permessage-deflate message (RFC 7692 7.2.1). */
async function deflateMessage(
  data: Uint8Array<ArrayBuffer>,
): Promise<Uint8Array> {
  const stream = new Blob([data]).stream().pipeThrough(
    new CompressionStream("deflate-raw"),
  );
  const out = new Uint8Array(await new Response(stream).arrayBuffer());
  // Deno's stream ends with a sync flush and an empty final block
  // (00 00 ff ff 03 00): drop both, as a permessage-deflate sender does.
  return out.subarray(0, out.length - 6);
}

/** 32 MiB of zeros, deflated to about 32 KiB: made once, sent by each copy. */
const BOMB = deflateMessage(new Uint8Array(32 * MiB));

const HOSTILE: Hostile[] = [
  {
    name: "random bytes instead of a handshake",
    run: sendsAndGetsStatus(() => {
      const random = prng(7);
      const junk = new Uint8Array(300).map(() => random() * 256);
      junk[0] = 0; // never a method's first letter
      // Ended like a head, so the server judges it at once (a head that
      // never ends is the slowloris case).
      junk.set([13, 10, 13, 10], junk.length - 4);
      return junk;
    }, 400),
  },
  {
    name: "a request head trickled a byte at a time",
    server: "close 1000",
    async run(server, name) {
      const conn = await Deno.connect({
        hostname: "127.0.0.1",
        port: server.port,
      });
      try {
        const head = new TextEncoder().encode(upgradeRequest(name));
        // Slow is not hostile by itself: a byte per write for up to half the
        // head timeout, then the rest at once, so a busy machine cannot turn
        // the trickle into the slowloris case.
        const trickleUntil = Date.now() + HEAD_TIMEOUT / 2;
        let sent = 0;
        while (sent < head.length && Date.now() < trickleUntil) {
          await writeAll(conn, head.subarray(sent, ++sent));
          await sleep(1);
        }
        await writeAll(conn, head.subarray(sent));
        const client = await readResponse(conn);
        assert.equal(client.status, 101, client.head);
        await writeAll(
          conn,
          frame({ opcode: OP.text, payload: "slow", mask: true }),
        );
        const echo = await client.frames.next();
        assert.equal(new TextDecoder().decode(echo!.payload), "slow");
        await closeNormally(client);
      } finally {
        closeQuietly(conn);
      }
    },
  },
  {
    name: "a request head that never ends (slowloris)",
    run: sendsAndGetsStatus(
      (name) => upgradeRequest(name).slice(0, 40),
      408,
    ),
  },
  {
    name: "a handshake without Sec-WebSocket-Key",
    server: "handshake 400",
    run: sendsAndGetsStatus(
      (name) =>
        upgradeRequest(name).replace(/Sec-WebSocket-Key:[^\r]*\r\n/, ""),
      400,
    ),
  },
  {
    name: "a reset in the middle of a frame",
    server: "close 1006",
    run: upgraded(async (client) => {
      const whole = frame({
        opcode: OP.binary,
        payload: new Uint8Array(1000),
        mask: true,
      });
      // The server's pong is left unread, and closing a socket with unread
      // bytes makes the kernel send a reset (RST) instead of a FIN.
      await writeAll(
        client.conn,
        frame({ opcode: OP.ping, payload: new Uint8Array(4), mask: true }),
      );
      await writeAll(client.conn, whole.subarray(0, 300));
      await sleep(50);
      client.conn.close();
    }),
  },
  {
    name: "a 64-bit length of 2^62",
    server: "protocol 1009",
    run: sendsAndGetsClose(
      frame({
        opcode: OP.binary,
        declaredLength: 1n << 62n,
        mask: true,
        payload: new Uint8Array(16),
      }),
      1009,
    ),
  },
  {
    name: "a message over the read limit",
    server: "protocol 1009",
    run: sendsAndGetsClose(
      frames(
        {
          opcode: OP.binary,
          fin: false,
          payload: new Uint8Array(READ_LIMIT / 2),
          mask: true,
        },
        {
          opcode: OP.cont,
          payload: new Uint8Array(READ_LIMIT / 2 + 1),
          mask: true,
        },
      ),
      1009,
    ),
  },
  {
    name: "invalid UTF-8",
    server: "protocol 1007",
    run: sendsAndGetsClose(
      frames(
        { opcode: OP.text, fin: false, payload: "valid so far ", mask: true },
        {
          opcode: OP.cont,
          payload: new Uint8Array([0xed, 0xa0, 0x80]),
          mask: true,
        },
      ),
      1007,
    ),
  },
  {
    name: "an oversized control frame",
    server: "protocol 1002",
    run: sendsAndGetsClose(
      frame({ opcode: OP.ping, payload: new Uint8Array(126), mask: true }),
      1002,
    ),
  },
  {
    name: "a fragmented control frame",
    server: "protocol 1002",
    run: sendsAndGetsClose(
      frame({ opcode: OP.ping, fin: false, payload: "p", mask: true }),
      1002,
    ),
  },
  {
    name: "an unmasked frame",
    server: "protocol 1002",
    run: sendsAndGetsClose(frame({ opcode: OP.text, payload: "bare" }), 1002),
  },
  {
    name: "a reserved opcode",
    server: "protocol 1002",
    run: sendsAndGetsClose(
      frame({ opcode: 11, payload: "?", mask: true }),
      1002,
    ),
  },
  {
    name: "a forbidden close code (1005)",
    server: "protocol 1002",
    run: sendsAndGetsClose(
      frame({ opcode: OP.close, payload: closePayload(1005), mask: true }),
      1002,
    ),
  },
  {
    name: "a close frame with a 1-byte payload",
    server: "protocol 1002",
    run: sendsAndGetsClose(
      frame({ opcode: OP.close, payload: new Uint8Array([3]), mask: true }),
      1002,
    ),
  },
  {
    name: "a close reason that is not UTF-8",
    server: "protocol 1007",
    run: sendsAndGetsClose(
      frame({
        opcode: OP.close,
        payload: concat(closePayload(1000), new Uint8Array([0xc0, 0xaf])),
        mask: true,
      }),
      1007,
    ),
  },
  {
    name: "a message in 50,000 one-byte fragments",
    server: "close 1000",
    run: upgraded(async (client) => {
      const count = 50_000;
      const parts = Array.from({ length: count }, (_, i) =>
        frame({
          opcode: i === 0 ? OP.binary : OP.cont,
          fin: i === count - 1,
          payload: new Uint8Array([i & 0xff]),
          mask: true,
        }));
      await writeAll(client.conn, concatAll(parts));
      const echo = await client.frames.next();
      assert.equal(echo?.payload.length, count);
      assert.ok(echo!.payload.every((b, i) => b === (i & 0xff)));
      await closeNormally(client);
    }),
  },
  {
    name: "a ping flood",
    server: "close 1000",
    run: upgraded(async (client) => {
      const count = 20_000;
      const ping = frame({
        opcode: OP.ping,
        payload: "0123456789abcdef",
        mask: true,
      });
      const flood = new Uint8Array(ping.length * count);
      for (let i = 0; i < count; i++) flood.set(ping, i * ping.length);
      const seen = new Map<number, number>();
      const reading = readUntilClose(client.frames, seen);
      await writeAll(
        client.conn,
        concat(
          flood,
          frame({ opcode: OP.close, payload: closePayload(1000), mask: true }),
        ),
      );
      assert.equal(await reading, 1000);
      assert.equal(seen.get(OP.pong), count, "every ping answered");
    }),
  },
  {
    name: "a client that sends megabytes and never reads",
    // The echo cannot be written: the write deadline fails it.
    server: "TimedOut",
    run: upgraded(async (client) => {
      const message = frame({
        opcode: OP.binary,
        payload: new Uint8Array(200 * 1024).fill(7),
        mask: true,
      });
      let sent = 0;
      try {
        // Bounded: the server must cut us off long before 256 MiB.
        while (sent < 256 * MiB) {
          await writeAll(client.conn, message);
          sent += message.length;
        }
      } catch {
        // The server closed the connection (reset): what we wait for.
      }
      assert.ok(sent < 256 * MiB, "the server stopped taking bytes");
    }),
  },
  {
    name: "compressed data that is not DEFLATE",
    // BTYPE 11 is reserved (RFC 1951 section 3.2.3).
    server: "protocol 1007",
    run: sendsAndGetsClose(
      frame({
        opcode: OP.binary,
        rsv1: true,
        payload: new Uint8Array(64).fill(0xff),
        mask: true,
      }),
      1007,
      { compressed: true },
    ),
  },
  {
    name: "RSV1 on a continuation frame",
    server: "protocol 1002",
    run: sendsAndGetsClose(
      frames(
        { opcode: OP.binary, fin: false, payload: "a", mask: true },
        { opcode: OP.cont, rsv1: true, payload: "b", mask: true },
      ),
      1002,
      { compressed: true },
    ),
  },
  {
    name: "a deflate bomb",
    server: "protocol 1009",
    run: sendsAndGetsClose(
      BOMB.then((bomb) =>
        frame({ opcode: OP.binary, rsv1: true, payload: bomb, mask: true })
      ),
      1009,
      { compressed: true },
    ),
  },
];

/** Sizes a healthy client sends: 0 B to 200 KiB, at the length boundaries. */
const SIZES = [
  0,
  1,
  125,
  126,
  127,
  1000,
  4096,
  65535,
  65536,
  100_000,
  200 * 1024,
];

/**
 * Echoes MESSAGES_PER_CLIENT messages, writing and reading at once, and
 * checks every byte and the order.
 */
async function healthy(port: number, id: number): Promise<number> {
  // Every other client offers compression.
  const offers = id % 2 === 1;
  const { conn, response } = await new Dialer({ enableCompression: offers })
    .dial(
      `ws://127.0.0.1:${port}/healthy-${id}`,
    );
  // The server accepts compression from the clients that offer it.
  assert.equal(
    /permessage-deflate/.test(
      response.headers.get("sec-websocket-extensions") ?? "",
    ),
    offers,
  );
  const random = prng(1000 + id);
  const sent: { type: 1 | 2; data: Uint8Array }[] = [];
  for (let i = 0; i < MESSAGES_PER_CLIENT; i++) {
    const size = SIZES[(i + id) % SIZES.length];
    const type = i % 2 === 0 ? MESSAGE_TYPE.Binary : MESSAGE_TYPE.Text;
    const data = type === MESSAGE_TYPE.Text
      ? new TextEncoder().encode("é".repeat(size >> 1) + (size & 1 ? "x" : ""))
      : new Uint8Array(size).map(() => random() * 256);
    sent.push({ type, data });
  }
  const writing = (async () => {
    for (const { type, data } of sent) await conn.writeMessage(type, data);
  })();
  try {
    for (let i = 0; i < sent.length; i++) {
      const got = await conn.readMessage();
      assert.equal(got.type, sent[i].type, `healthy-${id} message ${i} type`);
      assert.equal(
        got.data.length,
        sent[i].data.length,
        `healthy-${id} message ${i} length`,
      );
      assert.ok(
        got.data.every((b, j) => b === sent[i].data[j]),
        `healthy-${id} message ${i} bytes`,
      );
    }
    await writing;
  } finally {
    await writing.catch(() => {});
    await conn.closeGracefully(1000, "", { timeout: 2000 });
  }
  return sent.length;
}

Deno.test("chaos: hostile clients get their close code or status while healthy clients lose nothing and memory comes back", async () => {
  await using server = await ServerProcess.start({
    config: {
      readLimit: READ_LIMIT,
      writeTimeout: WRITE_TIMEOUT,
      headTimeout: HEAD_TIMEOUT,
      compression: true,
    },
  });
  // Warm up every code path once, so the baseline includes compiled code.
  await healthy(server.port, 999);
  const before = await server.settled();
  assert.ok(before.gc, "the server runs with --expose-gc");

  const started = performance.now();
  const tasks: Promise<unknown>[] = [];
  const names: { name: string; kind: Hostile }[] = [];
  for (const kind of HOSTILE) {
    for (let copy = 0; copy < COPIES; copy++) {
      const name = `${kind.name} #${copy}`;
      names.push({ name, kind });
      tasks.push(
        kind.run(server, name).catch((error) => {
          throw new Error(`Hostile client "${name}" failed`, { cause: error });
        }),
      );
    }
  }
  for (let id = 0; id < HEALTHY_CLIENTS; id++) {
    tasks.push(healthy(server.port, id));
  }
  let running = true;
  const all = Promise.all(tasks).finally(() => running = false);
  // Sample the server's memory (no GC) while it is under attack.
  let peak = before.heapUsed + before.external;
  let peakRss = before.rss;
  while (running) {
    const sample = await server.command<
      { rss: number; heapUsed: number; external: number }
    >("peak");
    peak = Math.max(peak, sample.heapUsed + sample.external);
    peakRss = Math.max(peakRss, sample.rss);
    await Promise.race([all.catch(() => {}), sleep(100)]);
  }
  await all;
  const elapsed = Math.round(performance.now() - started);

  const after = await server.settled();
  assert.equal(after.open, 0, "every connection ended on the server");
  for (const { name, kind } of names) {
    assert.equal(after.outcomes[name], kind.server, `server side of "${name}"`);
  }
  for (let id = 0; id < HEALTHY_CLIENTS; id++) {
    assert.equal(after.outcomes[`healthy-${id}`], "close 1000");
  }
  // The server still serves.
  await healthy(server.port, 1);

  const used = (s: ServerStats) => s.heapUsed + s.external;
  const final = await server.settled();
  const grown = used(final) - used(before);
  console.log(
    `chaos: ${names.length} hostile + ${HEALTHY_CLIENTS} healthy connections in ${elapsed} ms;` +
      ` server heap+external before ${mib(used(before))}, peak ${
        mib(peak)
      } (no GC), after ${mib(used(final))} MiB;` +
      ` rss before ${mib(before.rss)}, peak ${mib(peakRss)}, after ${
        mib(final.rss)
      } MiB`,
  );
  assert.ok(grown < 4 * MiB, `the server kept ${mib(grown)} MiB`);
  await server.shutdown();
});

/** Runs _reliability/fragments.ts: memory kept while assembling fragments. */
async function fragmentMemory(
  size: number,
  deflate: boolean,
): Promise<{ count: number; retained: number; ok: boolean }> {
  return await runJsonScript(
    new URL("./_reliability/fragments.ts", import.meta.url),
    [String(size), ...(deflate ? ["deflate"] : [])],
    ["--v8-flags=--expose-gc"],
  );
}

Deno.test("chaos: a message cut into one-byte fragments costs memory in proportion to its payload, not to its fragment count", async () => {
  // 100,000 payload bytes at 7 wire bytes each: under a 1 MiB read limit any
  // client may send this, plain or compressed. Measured in a child process
  // that can force GC.
  const results = [];
  for (const deflate of [false, true]) {
    const { count, retained, ok } = await fragmentMemory(100_000, deflate);
    const kind = deflate ? "compressed" : "plain";
    assert.ok(ok, `the ${kind} message arrived intact`);
    console.log(
      `chaos: assembling a ${kind} message of ${count} one-byte fragments kept ${
        mib(retained)
      } MiB (${Math.round(retained / count)} B per fragment)`,
    );
    results.push({ kind, count, retained });
  }
  // A few bytes per payload byte is fair; an object per fragment is not.
  for (const { kind, count, retained } of results) {
    assert.ok(
      retained < 16 * count,
      `assembling a ${kind} message of ${count} fragments kept ${
        mib(retained)
      } MiB`,
    );
  }
});
