import assert from "node:assert/strict";
import {
  type BufferPool,
  CloseError,
  CloseSentError,
  Conn,
  ConnectionClosedError,
  isCloseError,
  isUnexpectedCloseError,
  MESSAGE_TYPE,
  PreparedMessage,
  ProtocolError,
  ReadLimitError,
  type Transport,
} from "../conn.ts";
import { createPipe, type Delivery, prng } from "../_pipe.ts";
import {
  connPair,
  expectClose,
  pattern,
  rawPeer,
  type Role,
  ROLES,
  tcpConnPair,
  textOf,
} from "./_helpers.ts";
import {
  closePayload,
  concat,
  frame,
  FrameReader,
  frames,
  LENGTH_EDGES,
  OP,
  parseClose,
  type RawFrame,
  utf8,
} from "./_frames.ts";

// ------------------------------------------------------------ the matrix

type WriteStyle = "bytes" | "string" | "writer" | "prepared";
const WRITE_STYLES: WriteStyle[] = ["bytes", "string", "writer", "prepared"];

async function writeIn(
  style: WriteStyle,
  conn: Conn,
  payload: Uint8Array,
  text: string,
) {
  switch (style) {
    case "bytes":
      return conn.writeMessage(MESSAGE_TYPE.Binary, payload);
    case "string":
      return conn.writeMessage(MESSAGE_TYPE.Text, text);
    case "writer": {
      const writer = conn.nextWriter(MESSAGE_TYPE.Binary);
      for (let i = 0; i < payload.length; i += 3000) {
        await writer.write(payload.subarray(i, i + 3000));
      }
      return writer.close();
    }
    case "prepared":
      return conn.writePreparedMessage(
        new PreparedMessage(MESSAGE_TYPE.Binary, payload),
      );
  }
}

function deliveriesFor(size: number): [string, Delivery][] {
  const out: [string, Delivery][] = [
    ["whole", "whole"],
    ["in halves", { splitAt: [Math.floor((size + 14) / 2)] }],
    ["at random points", {
      seed: size + 1,
      maxChunk: size > 70000 ? 9000 : 50,
    }],
  ];
  // One byte per read for a megabyte is a million reads: covered for the
  // other sizes, and the random splits reach the same parser states.
  if (size <= 65536) out.push(["one byte at a time", "byte"]);
  return out;
}

for (const role of ROLES) {
  Deno.test(`${role} Conn: every size x delivery x write style arrives intact`, async (t) => {
    for (const size of LENGTH_EDGES) {
      for (const [deliveryName, delivery] of deliveriesFor(size)) {
        await t.step(`${size} bytes, ${deliveryName}`, async () => {
          const { server, client } = connPair(delivery);
          const [writer, reader] = role === "server"
            ? [client, server]
            : [server, client];
          const payload = pattern(size);
          const text = textOf(size);
          for (const style of WRITE_STYLES) {
            const wrote = writeIn(style, writer, payload, text);
            const streamed = style === "writer" && size > 0;
            let got: Uint8Array;
            let type: number;
            if (streamed) {
              // Read the streamed message as a stream too.
              const next = await reader.nextReader();
              type = next.type;
              const parts: Uint8Array[] = [];
              const buffer = new Uint8Array(7000);
              for (let n; (n = await next.reader.read(buffer)) !== null;) {
                parts.push(buffer.slice(0, n));
              }
              got = concat(...parts);
            } else {
              ({ type, data: got } = await reader.readMessage());
            }
            await wrote;
            if (style === "string") {
              assert.equal(type, MESSAGE_TYPE.Text);
              assert.equal(new TextDecoder().decode(got), text, style);
            } else {
              assert.equal(type, MESSAGE_TYPE.Binary);
              assert.ok(
                got.length === size && got.every((b, i) => b === payload[i]),
                style,
              );
            }
          }
          server.close();
          client.close();
        });
      }
    }
  });

  Deno.test(`${role} Conn: raw frames of every size are read at every split`, async () => {
    for (const size of [0, 125, 126, 65535, 65536]) {
      for (const delivery of ["whole", "byte", { seed: size }] as Delivery[]) {
        const { conn, send, remote } = rawPeer(role, { delivery });
        const payload = pattern(size);
        // The same payload whole, then in three fragments.
        await send(
          { opcode: OP.binary, payload },
          {
            opcode: OP.binary,
            fin: false,
            payload: payload.subarray(0, size >> 2),
          },
          {
            opcode: OP.cont,
            fin: false,
            payload: payload.subarray(size >> 2, size >> 1),
          },
          { opcode: OP.cont, payload: payload.subarray(size >> 1) },
        );
        for (let i = 0; i < 2; i++) {
          const { type, data } = await conn.readMessage();
          assert.equal(type, MESSAGE_TYPE.Binary);
          assert.deepEqual(data, payload);
        }
        conn.close();
        remote.close();
      }
    }
  });

  Deno.test(`${role} Conn: frames it writes are masked only by a client`, async () => {
    const { conn, reader, remote } = rawPeer(role);
    await conn.writeMessage(MESSAGE_TYPE.Text, "hello");
    await conn.writeMessage(MESSAGE_TYPE.Binary, pattern(70000));
    const first = (await reader.next())!;
    const second = (await reader.next())!;
    for (const f of [first, second]) assert.equal(f.masked, role === "client");
    assert.equal(new TextDecoder().decode(first.payload), "hello");
    assert.deepEqual(second.payload, pattern(70000));
    conn.close();
    remote.close();
  });
}

// ------------------------------------------------------------ EOF and resets

Deno.test("readMessage() rejects with 1006 on EOF at every byte offset of a message", async () => {
  for (const role of ROLES) {
    const bytes = frames(
      {
        opcode: OP.text,
        fin: false,
        payload: "héllo",
        mask: role === "server",
      },
      { opcode: OP.ping, payload: "p", mask: role === "server" },
      { opcode: OP.cont, payload: "x".repeat(130), mask: role === "server" },
    );
    for (let cut = 0; cut < bytes.length; cut++) {
      const [local, remote] = createPipe();
      const conn = new Conn(local, { role });
      await remote.write(bytes.subarray(0, cut));
      remote.end();
      await assert.rejects(
        conn.readMessage(),
        (e) => e instanceof CloseError && e.code === 1006,
        `cut at ${cut}`,
      );
      assert.equal(conn.closed, true, "the transport is closed");
      remote.close();
    }
  }
});

Deno.test("readMessage() rejects with 1006 on a reset in the middle of a frame", async () => {
  const { conn, remote } = rawPeer("server");
  await remote.write(
    frame({ opcode: OP.binary, payload: pattern(1000), mask: true }).subarray(
      0,
      500,
    ),
  );
  const reading = conn.readMessage();
  remote.reset();
  await assert.rejects(
    reading,
    (e) => isCloseError(e, 1006) && isUnexpectedCloseError(e, 1000),
  );
});

Deno.test("nextReader()'s reader rejects with 1006 when the peer vanishes mid-message", async () => {
  const { conn, send, remote } = rawPeer("client");
  await send({ opcode: OP.binary, fin: false, payload: "abc" });
  const { reader } = await conn.nextReader();
  const buffer = new Uint8Array(10);
  assert.equal(await reader.read(buffer), 3);
  remote.end();
  await assert.rejects(reader.read(buffer), (e) => isCloseError(e, 1006));
  remote.close();
});

// ------------------------------------------------------------ validation

interface Violation {
  name: string;
  frames: RawFrame[];
  code: number;
  role?: Role;
}

const VIOLATIONS: Violation[] = [
  {
    name: "RSV1 is set",
    frames: [{ opcode: OP.text, rsv1: true, payload: "a" }],
    code: 1002,
  },
  {
    name: "RSV2 is set",
    frames: [{ opcode: OP.text, rsv2: true, payload: "a" }],
    code: 1002,
  },
  {
    name: "RSV3 is set",
    frames: [{ opcode: OP.binary, rsv3: true }],
    code: 1002,
  },
  ...[3, 4, 5, 6, 7, 11, 12, 13, 14, 15].map((opcode) => ({
    name: `the opcode is reserved (${opcode})`,
    frames: [{ opcode }],
    code: 1002,
  })),
  {
    name: "a ping is over 125 bytes",
    frames: [{ opcode: OP.ping, payload: new Uint8Array(126) }],
    code: 1002,
  },
  {
    name: "a close is over 125 bytes",
    frames: [{ opcode: OP.close, payload: new Uint8Array(126) }],
    code: 1002,
  },
  {
    name: "a ping is fragmented",
    frames: [{ opcode: OP.ping, fin: false }],
    code: 1002,
  },
  {
    name: "a continuation has no message open",
    frames: [{ opcode: OP.cont, payload: "a" }],
    code: 1002,
  },
  {
    name: "a new data frame comes while a fragmented message is open",
    frames: [{ opcode: OP.text, fin: false, payload: "a" }, {
      opcode: OP.text,
      payload: "b",
    }],
    code: 1002,
  },
  {
    name: "a client frame is unmasked",
    frames: [{ opcode: OP.text, payload: "a", mask: false }],
    code: 1002,
    role: "server",
  },
  {
    name: "a server frame is masked",
    frames: [{ opcode: OP.text, payload: "a", mask: true }],
    code: 1002,
    role: "client",
  },
  {
    name: "a close payload is 1 byte",
    frames: [{ opcode: OP.close, payload: new Uint8Array([3]) }],
    code: 1002,
  },
  ...[999, 1004, 1005, 1006, 1015, 2000, 5000].map((code) => ({
    name: `a close code may not be sent (${code})`,
    frames: [{ opcode: OP.close, payload: closePayload(code) }],
    code: 1002,
  })),
  {
    name: "a close reason is not UTF-8",
    frames: [{
      opcode: OP.close,
      payload: concat(closePayload(1000), new Uint8Array([0xff])),
    }],
    code: 1007,
  },
  {
    name: "a text message is not UTF-8",
    frames: [{ opcode: OP.text, payload: new Uint8Array([0x61, 0xc0, 0x80]) }],
    code: 1007,
  },
  {
    name: "a text message holds a surrogate",
    frames: [{ opcode: OP.text, payload: new Uint8Array([0xed, 0xa0, 0x80]) }],
    code: 1007,
  },
  {
    name: "a text message ends inside a character",
    frames: [{ opcode: OP.text, payload: new Uint8Array([0xe2, 0x82]) }],
    code: 1007,
  },
  {
    name: "a length exceeds 2^53 - 1",
    frames: [{ opcode: OP.binary, declaredLength: 1n << 62n }],
    code: 1009,
  },
  {
    name: "a 64-bit length has its top bit set",
    frames: [{ opcode: OP.binary, declaredLength: 1n << 63n }],
    code: 1002,
  },
];

for (const violation of VIOLATIONS) {
  for (const role of violation.role ? [violation.role] : ROLES) {
    Deno.test(`readMessage() on a ${role} closes with ${violation.code} when ${violation.name}`, async () => {
      const { conn, send, reader } = rawPeer(role);
      await send(...violation.frames);
      const error = await conn.readMessage().then(
        () => assert.fail("the read succeeded"),
        (e) => e,
      );
      assert.ok(error instanceof ProtocolError, `got ${error}`);
      assert.equal(error.code, violation.code);
      const { reason } = await expectClose(reader, violation.code);
      assert.equal(reason, error.message.slice(0, reason.length));
      // Errors are sticky: every later read rejects with the same error.
      await assert.rejects(conn.readMessage(), (e) => e === error);
      await assert.rejects(conn.nextReader(), (e) => e === error);
    });
  }
}

Deno.test("readMessage() names every header problem in one close reason", async () => {
  const { conn, send, reader } = rawPeer("server");
  await send({ opcode: 3, rsv2: true, mask: false });
  await assert.rejects(conn.readMessage(), ProtocolError);
  const { reason } = await expectClose(reader, 1002);
  assert.match(reason, /RSV2.*reserved opcode 3.*unmasked/);
});

Deno.test("readMessage() fails invalid UTF-8 on the frame where it becomes invalid", async () => {
  const { conn, send, reader } = rawPeer("server");
  // The second frame makes the text invalid; the message never ends, so
  // only a fail-fast validator can answer.
  await send(
    { opcode: OP.text, fin: false, payload: new Uint8Array([0x61, 0xe2]) },
    { opcode: OP.cont, fin: false, payload: new Uint8Array([0x28]) },
  );
  await assert.rejects(
    conn.readMessage(),
    (e) => e instanceof ProtocolError && e.code === 1007,
  );
  await expectClose(reader, 1007);
});

Deno.test("readMessage() accepts UTF-8 split inside characters across fragments, and a leading BOM", async () => {
  const { conn, send, remote } = rawPeer("server", { delivery: "byte" });
  const text = "\ufeff😀 é ✓";
  const bytes = utf8(text);
  await send(
    { opcode: OP.text, fin: false, payload: bytes.subarray(0, 2) },
    { opcode: OP.cont, fin: false, payload: bytes.subarray(2, 5) },
    { opcode: OP.cont, payload: bytes.subarray(5) },
  );
  const { type, data } = await conn.readMessage();
  assert.equal(type, MESSAGE_TYPE.Text);
  assert.deepEqual(data, bytes);
  conn.close();
  remote.close();
});

// ------------------------------------------------------------ control frames

Deno.test("readMessage() handles pings and pongs between fragments and answers the ping", async () => {
  for (const delivery of ["whole", "byte"] as Delivery[]) {
    const { conn, send, reader, remote } = rawPeer("server", { delivery });
    const pongs: string[] = [];
    conn.setPongHandler((data) => {
      pongs.push(new TextDecoder().decode(data));
    });
    await send(
      { opcode: OP.text, fin: false, payload: "one " },
      { opcode: OP.ping, payload: "are you there" },
      { opcode: OP.cont, fin: false, payload: "two " },
      { opcode: OP.pong, payload: "pong!" },
      { opcode: OP.cont, payload: "three" },
    );
    const { data } = await conn.readMessage();
    assert.equal(new TextDecoder().decode(data), "one two three");
    assert.deepEqual(pongs, ["pong!"]);
    const answer = (await reader.next())!;
    assert.equal(answer.opcode, OP.pong);
    assert.equal(answer.masked, false);
    assert.equal(new TextDecoder().decode(answer.payload), "are you there");
    conn.close();
    remote.close();
  }
});

Deno.test("the default close handler echoes the code and the read rejects with CloseError", async () => {
  const { conn, send, reader } = rawPeer("server");
  await send({ opcode: OP.close, payload: closePayload(4001, "bye") });
  await assert.rejects(
    conn.readMessage(),
    (e) => e instanceof CloseError && e.code === 4001 && e.text === "bye",
  );
  const echo = (await reader.next())!;
  assert.equal(echo.opcode, OP.close);
  assert.deepEqual(parseClose(echo.payload), { code: 4001, reason: "" });
  assert.equal(
    await reader.next(),
    null,
    "both close frames crossed: the transport is closed",
  );
  assert.equal(conn.closed, true);
});

Deno.test("a close frame with no payload is echoed empty and reads as 1005", async () => {
  const { conn, send, reader } = rawPeer("client");
  await send({ opcode: OP.close });
  await assert.rejects(conn.readMessage(), (e) => isCloseError(e, 1005));
  const echo = (await reader.next())!;
  assert.equal(echo.opcode, OP.close);
  assert.equal(echo.payload.length, 0);
  assert.equal(echo.masked, true);
});

Deno.test("custom handlers replace the defaults and null restores them", async () => {
  const { conn, send, reader, remote } = rawPeer("server");
  const seen: string[] = [];
  const ping = (d: Uint8Array) => {
    seen.push(`ping ${d.length}`);
  };
  const close = (code: number) => {
    seen.push(`close ${code}`);
  };
  conn.setPingHandler(ping);
  conn.setCloseHandler(close);
  assert.equal(conn.pingHandler(), ping);
  assert.equal(conn.closeHandler(), close);
  await send({ opcode: OP.ping, payload: "xy" }, {
    opcode: OP.binary,
    payload: "d",
  });
  await conn.readMessage();
  conn.setPingHandler(null);
  assert.notEqual(conn.pingHandler(), ping);
  await send({ opcode: OP.ping, payload: "z" }, {
    opcode: OP.close,
    payload: closePayload(1000),
  });
  await assert.rejects(conn.readMessage(), CloseError);
  assert.deepEqual(seen, ["ping 2", "close 1000"]);
  // Only the restored default answered a ping; the custom close handler
  // sent no close frame.
  const sent = [(await reader.next())!];
  assert.equal(sent[0].opcode, OP.pong);
  assert.equal(new TextDecoder().decode(sent[0].payload), "z");
  assert.equal(conn.closed, false);
  conn.close();
  assert.equal(await reader.next(), null);
  remote.close();
});

// ------------------------------------------------------------ limits

Deno.test("setReadLimit() counts every fragment and closes with 1009", async () => {
  const { conn, send, reader } = rawPeer("server");
  conn.setReadLimit(10);
  await send(
    { opcode: OP.binary, payload: new Uint8Array(10) },
    { opcode: OP.binary, fin: false, payload: new Uint8Array(6) },
    { opcode: OP.cont, payload: new Uint8Array(6) },
  );
  assert.equal((await conn.readMessage()).data.length, 10);
  await assert.rejects(
    conn.readMessage(),
    (e) => e instanceof ReadLimitError && e.code === 1009 && e.limit === 10,
  );
  await expectClose(reader, 1009);
});

Deno.test("setReadLimit() rejects a huge declared length before allocating", async () => {
  const { conn, send, reader } = rawPeer("server");
  conn.setReadLimit(1 << 20);
  await send({ opcode: OP.binary, declaredLength: 1n << 40n });
  await assert.rejects(conn.readMessage(), ReadLimitError);
  await expectClose(reader, 1009);
});

Deno.test("setReadLimit() throws RangeError for a negative limit", () => {
  const { conn, remote } = rawPeer("server");
  assert.throws(() => conn.setReadLimit(-1), RangeError);
  conn.close();
  remote.close();
});

// ------------------------------------------------------------ deadlines

Deno.test("setReadDeadline() times a read out and the read side stays failed", async () => {
  const { conn, send, remote } = rawPeer("server");
  conn.setReadDeadline(new Date(Date.now() + 20));
  const error = await conn.readMessage().then(() => assert.fail(), (e) => e);
  assert.ok(error instanceof Deno.errors.TimedOut);
  await send({ opcode: OP.text, payload: "late" });
  conn.setReadDeadline(null);
  await assert.rejects(conn.readMessage(), (e) => e === error);
  // The write side still works: a close frame can be sent.
  await conn.writeControl(MESSAGE_TYPE.Close, closePayload(1000));
  conn.close();
  remote.close();
});

Deno.test("setReadDeadline() in the past fails the next read at once", async () => {
  const { conn, send, remote } = rawPeer("server");
  await send({ opcode: OP.ping }); // only control frames: the read must wait
  conn.setReadDeadline(new Date(Date.now() - 1000));
  await assert.rejects(conn.readMessage(), Deno.errors.TimedOut);
  conn.close();
  remote.close();
});

Deno.test("setReadDeadline() moved while a read waits applies to that read, as in Go", async () => {
  const { conn, send, remote } = rawPeer("server");
  // Lifted while the read waits: the read goes on and gets the message.
  conn.setReadDeadline(new Date(Date.now() + 30));
  const reading = conn.readMessage();
  conn.setReadDeadline(null);
  await new Promise((resolve) => setTimeout(resolve, 60));
  await send({ opcode: OP.text, payload: "in time" });
  const { data } = await reading;
  assert.equal(new TextDecoder().decode(data), "in time");
  // Brought forward while the read waits: it times out at the new time.
  conn.setReadDeadline(new Date(Date.now() + 60_000));
  const waiting = conn.readMessage();
  conn.setReadDeadline(new Date());
  await assert.rejects(waiting, Deno.errors.TimedOut);
  conn.close();
  remote.close();
});

Deno.test("readMessage({ signal }) rejects with the abort reason, sticky", async () => {
  const { conn, remote } = rawPeer("client");
  const controller = new AbortController();
  const reading = conn.readMessage({ signal: controller.signal });
  const reason = new Error("stop");
  controller.abort(reason);
  await assert.rejects(reading, (e) => e === reason);
  await assert.rejects(conn.readMessage(), (e) => e === reason);
  await assert.rejects(
    conn.readMessage({ signal: AbortSignal.abort() }),
    (e) => e === reason,
  );
  conn.close();
  remote.close();
});

Deno.test("setWriteDeadline() bounds a write to a peer that stops reading", async () => {
  const { conn, remote } = rawPeer("server", { capacity: 1024 });
  conn.setWriteDeadline(new Date(Date.now() + 30));
  const error = await conn.writeMessage(
    MESSAGE_TYPE.Binary,
    new Uint8Array(1 << 20),
  )
    .then(() => assert.fail("the write completed"), (e) => e);
  assert.ok(error instanceof Deno.errors.TimedOut);
  await assert.rejects(
    conn.writeMessage(MESSAGE_TYPE.Text, "more"),
    (e) => e === error,
  );
  conn.close();
  remote.close();
});

Deno.test("setWriteDeadline() brought forward while a write waits ends that write", async () => {
  const { conn, remote } = rawPeer("server", { capacity: 1024 });
  conn.setWriteDeadline(new Date(Date.now() + 60_000));
  const writing = conn.writeMessage(
    MESSAGE_TYPE.Binary,
    new Uint8Array(1 << 20),
  );
  await new Promise((resolve) => setTimeout(resolve, 10));
  conn.setWriteDeadline(new Date());
  await assert.rejects(writing, Deno.errors.TimedOut);
  conn.close();
  remote.close();
});

Deno.test("writeControl() with a deadline rejects when the frame cannot go out", async () => {
  const { conn, remote } = rawPeer("server", { capacity: 16 });
  const big = conn.writeMessage(MESSAGE_TYPE.Binary, new Uint8Array(100_000))
    .catch((e) => e);
  await assert.rejects(
    conn.writeControl(MESSAGE_TYPE.Ping, "x", {
      deadline: new Date(Date.now() + 20),
    }),
    Deno.errors.TimedOut,
  );
  conn.close();
  assert.ok((await big) instanceof Error);
  remote.close();
});

// ------------------------------------------------------------ writing

Deno.test("a hundred tasks writing at once: every message arrives whole, in each writer's order", async () => {
  const { server, client } = connPair({ seed: 5, maxChunk: 3000 });
  const TASKS = 100;
  const PER_TASK = 12;
  const sizes = [3, 200, 5000, 70000];
  const writers = Array.from({ length: TASKS }, async (_, task) => {
    for (let seq = 0; seq < PER_TASK; seq++) {
      const size = sizes[(task + seq) % sizes.length];
      const body = new Uint8Array(size).fill((task + seq) & 0xff);
      const head = utf8(`${task}:${seq}:`);
      const payload = concat(head, body);
      if (seq % 5 === 4) {
        const writer = client.nextWriter(MESSAGE_TYPE.Binary);
        await writer.write(head);
        await writer.write(body);
        await writer.close();
      } else if (seq % 3 === 0) {
        // Not awaited: the queue keeps the order anyway.
        client.writeMessage(MESSAGE_TYPE.Binary, payload);
      } else {
        await client.writeMessage(MESSAGE_TYPE.Binary, payload);
      }
      if (seq % 4 === 0) {
        await client.writeControl(MESSAGE_TYPE.Ping, `${task}`);
      }
    }
  });
  const next = new Array(TASKS).fill(0);
  for (let i = 0; i < TASKS * PER_TASK; i++) {
    const { data } = await server.readMessage();
    const text = new TextDecoder().decode(data.subarray(0, 12));
    const [task, seq] = text.split(":").map(Number);
    assert.equal(seq, next[task], `task ${task} in order`);
    next[task]++;
    const size = sizes[(task + seq) % sizes.length];
    const headLength = `${task}:${seq}:`.length;
    assert.equal(data.length, headLength + size);
    assert.ok(
      data.subarray(headLength).every((b) => b === ((task + seq) & 0xff)),
    );
  }
  await Promise.all(writers);
  server.close();
  client.close();
});

/** A transport that records each chunk it is asked to write, then passes it on. */
function recordingWrites(end: Transport) {
  const writes: Uint8Array[] = [];
  const transport: Transport = {
    read: (b) => end.read(b),
    write: (d) => {
      writes.push(d);
      return end.write(d);
    },
    close: () => end.close(),
  };
  return { transport, writes };
}

Deno.test("small frames queued while a write is in flight leave in one write", async () => {
  const [local, remote] = createPipe();
  const { transport, writes } = recordingWrites(local);
  const conn = new Conn(transport, { role: "server" });
  const pending = [];
  for (let i = 0; i < 50; i++) {
    pending.push(conn.writeMessage(MESSAGE_TYPE.Text, "0123456789"));
  }
  await Promise.all(pending);
  await conn.writeControl(MESSAGE_TYPE.Ping, "");
  assert.ok(
    writes.length <= 3,
    `${writes.length} writes: ${writes.map((w) => w.length)}`,
  );
  const reader = new FrameReader(remote);
  for (let i = 0; i < 50; i++) {
    const f = (await reader.next())!;
    assert.equal(new TextDecoder().decode(f.payload), "0123456789");
  }
  assert.equal((await reader.next())!.opcode, OP.ping);
  conn.close();
  remote.close();
});

Deno.test("a large server payload is written as its own write, not copied", async () => {
  const [local, remote] = createPipe();
  const { transport, writes: written } = recordingWrites(local);
  const conn = new Conn(transport, { role: "server" });
  const payload = new Uint8Array(100_000);
  await conn.writeMessage(MESSAGE_TYPE.Binary, payload);
  assert.ok(
    written.some((d) => d.buffer === payload.buffer),
    "the payload's own bytes were written",
  );
  conn.close();
  remote.close();
});

Deno.test("writePreparedMessage() sends the same bytes as writeMessage()", async () => {
  for (
    const type of [MESSAGE_TYPE.Text, MESSAGE_TYPE.Binary, MESSAGE_TYPE.Ping]
  ) {
    for (const size of [0, 5, 125, 126, 70000]) {
      if (type === MESSAGE_TYPE.Ping && size > 125) continue;
      const payload = type === MESSAGE_TYPE.Text
        ? utf8(textOf(size))
        : pattern(size);
      const { conn, remote } = rawPeer("server");
      const prepared = new PreparedMessage(type, payload);
      await conn.writeMessage(type, payload);
      await conn.writePreparedMessage(prepared);
      await conn.writePreparedMessage(prepared);
      const total = 3 *
        (payload.length + (size < 126 ? 2 : size < 65536 ? 4 : 10));
      const bytes = new Uint8Array(total);
      for (let got = 0; got < total;) {
        got += (await remote.read(bytes.subarray(got)))!;
      }
      const third = total / 3;
      assert.deepEqual(
        bytes.subarray(third, 2 * third),
        bytes.subarray(0, third),
      );
      assert.deepEqual(bytes.subarray(2 * third), bytes.subarray(0, third));
      conn.close();
      remote.close();
    }
  }
  // A client masks each copy with its own key.
  const { conn, reader, remote } = rawPeer("client");
  const prepared = new PreparedMessage(MESSAGE_TYPE.Text, "same");
  await conn.writePreparedMessage(prepared);
  await conn.writeMessage(MESSAGE_TYPE.Text, "same");
  const [a, b] = [(await reader.next())!, (await reader.next())!];
  assert.deepEqual(a, b);
  assert.equal(a.masked, true);
  conn.close();
  remote.close();
});

Deno.test("nextWriter() sends fragments of writeBufferSize and the final frame on close", async () => {
  const { conn, reader, remote } = rawPeer("server", {
    conn: { writeBufferSize: 1000 },
  });
  const writer = conn.nextWriter(MESSAGE_TYPE.Text);
  await writer.write("a".repeat(2500));
  // A control frame may go between fragments.
  await conn.writeControl(MESSAGE_TYPE.Ping, "between");
  // Other data messages wait until the writer is closed.
  const waiting = conn.writeMessage(MESSAGE_TYPE.Binary, new Uint8Array([1]));
  await writer.write("b");
  await writer.close();
  await waiting;
  const seen = [];
  for (let i = 0; i < 5; i++) {
    const f = (await reader.next())!;
    seen.push([f.opcode, f.fin, f.payload.length]);
  }
  assert.deepEqual(seen, [
    [OP.text, false, 1000],
    [OP.cont, false, 1000],
    [OP.ping, true, 7],
    [OP.cont, true, 501],
    [OP.binary, true, 1],
  ]);
  await assert.rejects(writer.write("x"), TypeError);
  conn.close();
  remote.close();
});

Deno.test("writes reject with CloseSentError after a close frame was sent", async () => {
  const { conn, remote } = rawPeer("server");
  const writer = conn.nextWriter(MESSAGE_TYPE.Binary);
  await conn.writeControl(MESSAGE_TYPE.Close, closePayload(1000));
  await assert.rejects(
    conn.writeMessage(MESSAGE_TYPE.Text, "x"),
    CloseSentError,
  );
  await assert.rejects(
    conn.writeControl(MESSAGE_TYPE.Close, closePayload(1000)),
    CloseSentError,
  );
  await assert.rejects(writer.write(new Uint8Array(5000)), CloseSentError);
  await assert.rejects(writer.close(), CloseSentError);
  // As in gorilla, every frame is refused once the close frame is out.
  await assert.rejects(
    conn.writeControl(MESSAGE_TYPE.Ping, ""),
    CloseSentError,
  );
  conn.close();
  remote.close();
});

Deno.test("write methods throw TypeError and RangeError for caller mistakes", async () => {
  const { conn, remote } = rawPeer("server");
  // @ts-expect-error: not a message type
  await assert.rejects(conn.writeMessage(3, "x"), TypeError);
  // @ts-expect-error: not bytes
  await assert.rejects(conn.writeMessage(MESSAGE_TYPE.Binary, 42), TypeError);
  await assert.rejects(conn.writeControl(MESSAGE_TYPE.Text, "x"), TypeError);
  await assert.rejects(
    conn.writeControl(MESSAGE_TYPE.Ping, new Uint8Array(126)),
    RangeError,
  );
  await assert.rejects(conn.writeJSON(undefined), TypeError);
  assert.throws(() => conn.nextWriter(MESSAGE_TYPE.Ping as never), TypeError);
  assert.throws(
    () => new PreparedMessage(MESSAGE_TYPE.Pong, new Uint8Array(126)),
    RangeError,
  );
  assert.throws(() => conn.setWriteDeadline(new Date(NaN)), TypeError);
  // @ts-expect-error: not a role
  assert.throws(() => new Conn(remote, { role: "peer" }), TypeError);
  assert.throws(
    () => new Conn(remote, { role: "server", readBufferSize: 0 }),
    RangeError,
  );
  conn.close();
  remote.close();
});

Deno.test("a write buffer pool lends buffers and gets them back", async () => {
  const buffers: Uint8Array[] = [];
  let lent = 0;
  let returned = 0;
  const pool: BufferPool = {
    get: () => {
      lent++;
      return buffers.pop();
    },
    put: (b) => {
      returned++;
      buffers.push(b);
    },
  };
  const { server, client } = connPair("whole", { writeBufferPool: pool });
  for (let i = 0; i < 20; i++) {
    await client.writeMessage(MESSAGE_TYPE.Text, `m${i}`);
    assert.equal(
      new TextDecoder().decode((await server.readMessage()).data),
      `m${i}`,
    );
  }
  assert.ok(lent > 0);
  assert.equal(returned, lent, "every buffer taken was given back");
  server.close();
  client.close();
});

// ------------------------------------------------------------ reading API

Deno.test("nextReader() streams bytes before the message is complete", async () => {
  const { conn, send, remote } = rawPeer("server");
  await send({ opcode: OP.binary, fin: false, payload: "first" });
  const { type, reader } = await conn.nextReader();
  assert.equal(type, MESSAGE_TYPE.Binary);
  const buffer = new Uint8Array(100);
  const n = await reader.read(buffer);
  assert.equal(new TextDecoder().decode(buffer.subarray(0, n!)), "first");
  await send({ opcode: OP.cont, payload: "second" });
  const m = await reader.read(buffer);
  assert.equal(new TextDecoder().decode(buffer.subarray(0, m!)), "second");
  assert.equal(await reader.read(buffer), null);
  conn.close();
  remote.close();
});

Deno.test("starting the next message discards the unread rest of the previous one", async () => {
  const { conn, send, remote } = rawPeer("server", { delivery: { seed: 9 } });
  await send(
    { opcode: OP.binary, fin: false, payload: pattern(3000) },
    { opcode: OP.cont, payload: pattern(5000) },
    { opcode: OP.text, payload: "next" },
  );
  const first = await conn.nextReader();
  await first.reader.read(new Uint8Array(10));
  const { data } = await conn.readMessage();
  assert.equal(new TextDecoder().decode(data), "next");
  await assert.rejects(first.reader.read(new Uint8Array(10)), /newer message/);
  conn.close();
  remote.close();
});

Deno.test("a second concurrent read throws TypeError", async () => {
  const { conn, remote } = rawPeer("server");
  const first = conn.readMessage();
  await assert.rejects(conn.readMessage(), /another read is in progress/);
  conn.close();
  await assert.rejects(first, ConnectionClosedError);
  remote.close();
});

Deno.test("readJSON() and writeJSON() round-trip values", async () => {
  const { server, client } = connPair();
  await client.writeJSON({ a: [1, 2], b: "ü" });
  assert.deepEqual(await server.readJSON(), { a: [1, 2], b: "ü" });
  await client.writeMessage(MESSAGE_TYPE.Text, "{not json");
  await assert.rejects(server.readJSON(), SyntaxError);
  server.close();
  client.close();
});

Deno.test("for await ends on a normal close and throws on an abnormal one", async () => {
  const { conn, send } = rawPeer("server");
  await send({ opcode: OP.text, payload: "1" }, {
    opcode: OP.text,
    payload: "2",
  }, {
    opcode: OP.close,
    payload: closePayload(1001),
  });
  const got = [];
  for await (const m of conn) got.push(new TextDecoder().decode(m.data));
  assert.deepEqual(got, ["1", "2"]);

  const second = rawPeer("server");
  await second.send({ opcode: OP.close, payload: closePayload(4000) });
  await assert.rejects(async () => {
    for await (const _ of second.conn) { /* nothing arrives */ }
  }, (e) => isCloseError(e, 4000));
});

Deno.test("the head option's bytes are parsed before the transport's", async () => {
  const [local, remote] = createPipe();
  const head = frames({ opcode: OP.text, payload: "from head", mask: true }, {
    opcode: OP.text,
    fin: false,
    payload: "split ",
    mask: true,
  });
  const conn = new Conn(local, { role: "server", head });
  await remote.write(
    frame({ opcode: OP.cont, payload: "message", mask: true }),
  );
  assert.equal(
    new TextDecoder().decode((await conn.readMessage()).data),
    "from head",
  );
  assert.equal(
    new TextDecoder().decode((await conn.readMessage()).data),
    "split message",
  );
  conn.close();
  remote.close();
});

Deno.test("an idle connection's pending read uses a small buffer that grows with traffic", async () => {
  const [local, remote] = createPipe();
  const sizes: number[] = [];
  const recording: Transport = {
    read: (b) => {
      sizes.push(b.length);
      return local.read(b);
    },
    write: (d) => local.write(d),
    close: () => local.close(),
  };
  const conn = new Conn(recording, { role: "server", readBufferSize: 8192 });
  const reading = conn.readMessage();
  await remote.write(
    frames(
      ...Array.from(
        { length: 300 },
        () => ({ opcode: OP.text, payload: "0123456789", mask: true }),
      ),
    ),
  );
  await reading;
  for (let i = 1; i < 300; i++) await conn.readMessage();
  assert.ok(sizes[0] <= 512, `first read of ${sizes[0]} bytes`);
  assert.ok(sizes.some((s) => s === 8192), `grew: ${sizes}`);
  conn.close();
  remote.close();
});

// ------------------------------------------------------------ closing

Deno.test("close() rejects a pending read and pending writes, and is idempotent", async () => {
  const { conn, remote } = rawPeer("server", { capacity: 10 });
  const reading = conn.readMessage();
  const writing = conn.writeMessage(
    MESSAGE_TYPE.Binary,
    new Uint8Array(100_000),
  );
  conn.close();
  conn.close();
  await assert.rejects(reading, ConnectionClosedError);
  await assert.rejects(writing, ConnectionClosedError);
  await assert.rejects(
    conn.writeMessage(MESSAGE_TYPE.Text, "x"),
    ConnectionClosedError,
  );
  assert.equal(remote.closed, false);
  remote.close();
});

Deno.test("closeGracefully() completes the handshake while the application is not reading", async () => {
  const { server, client } = connPair("byte");
  await client.writeMessage(MESSAGE_TYPE.Text, "unread");
  const serverSide = (async () => {
    await assert.rejects(
      server.readMessage().then(() => server.readMessage()),
      (e) => isCloseError(e, 1000),
    );
  })();
  await client.closeGracefully(1000, "done", { timeout: 5000 });
  await serverSide;
  assert.equal(client.closed, true);
  assert.equal(server.closed, true);
});

Deno.test("closeGracefully() works while the application reads at the same time", async () => {
  const { server, client } = connPair();
  const reading = client.readMessage().catch((e) => e);
  const serverReading = server.readMessage().catch((e) => e);
  await client.closeGracefully(4000, "", { timeout: 5000 });
  assert.ok(
    isCloseError(await reading, 4000),
    "the reader sees the echoed close",
  );
  assert.ok(isCloseError(await serverReading, 4000));
  assert.equal(client.closed, true);
  assert.equal(server.closed, true);
});

Deno.test("closeGracefully() on both sides at once resolves on both", async () => {
  const { server, client } = connPair({ seed: 2 });
  await Promise.all([
    server.closeGracefully(1001, "server", { timeout: 5000 }),
    client.closeGracefully(1000, "client", { timeout: 5000 }),
  ]);
  assert.equal(server.closed && client.closed, true);
});

Deno.test("closeGracefully() gives up after the timeout when the peer never answers", async () => {
  const { conn, reader, remote } = rawPeer("server");
  const started = Date.now();
  await conn.closeGracefully(1000, "bye", { timeout: 50 });
  assert.ok(Date.now() - started >= 45);
  assert.equal(conn.closed, true);
  const f = (await reader.next())!;
  assert.deepEqual(parseClose(f.payload), { code: 1000, reason: "bye" });
  assert.equal(await reader.next(), null);
  remote.close();
});

Deno.test("a close arriving in the middle of a fragmented message ends the read with CloseError", async () => {
  const { conn, send, reader } = rawPeer("server");
  await send({ opcode: OP.text, fin: false, payload: "half" }, {
    opcode: OP.close,
    payload: closePayload(1001, "leaving"),
  });
  await assert.rejects(conn.readMessage(), (e) => isCloseError(e, 1001));
  assert.equal((await reader.next())!.opcode, OP.close);
  assert.equal(await reader.next(), null);
});

Deno.test("closeGracefully() while a streaming writer is open: the writer fails with CloseSentError", async () => {
  const { server, client } = connPair();
  const writer = client.nextWriter(MESSAGE_TYPE.Binary);
  await writer.write(new Uint8Array(10));
  const serverReading = server.readMessage().catch((e) => e);
  await client.closeGracefully(1000, "", { timeout: 5000 });
  await assert.rejects(
    writer.close(),
    (e) => e instanceof CloseSentError || e instanceof ConnectionClosedError,
  );
  assert.ok(isCloseError(await serverReading, 1000));
});

Deno.test("Symbol.asyncDispose closes gracefully", async () => {
  const { server, client } = connPair();
  const serverReading = server.readMessage().catch((e) => e);
  {
    await using _ = client;
  }
  assert.equal(client.closed, true);
  assert.ok(isCloseError(await serverReading, 1000));
});

// ------------------------------------------------------------ backpressure

Deno.test("writes to a peer that stops reading wait, and nothing queues without limit", async () => {
  const { conn, remote } = rawPeer("server", { capacity: 64 * 1024 });
  let resolved = 0;
  const pending: Promise<void>[] = [];
  // Fire 200 messages of 8 KiB without awaiting them.
  for (let i = 0; i < 200; i++) {
    pending.push(
      conn.writeMessage(MESSAGE_TYPE.Binary, new Uint8Array(8192).fill(i)).then(
        () => {
          resolved++;
        },
      ),
    );
  }
  await new Promise((r) => setTimeout(r, 30));
  assert.ok(resolved < 200, "writes wait for the peer");
  assert.ok(
    remote.buffered <= 64 * 1024 + 8192 + 14,
    `the pipe holds ${remote.buffered}`,
  );
  // The peer reads everything: every message arrives, in order.
  const reader = new FrameReader(remote);
  for (let i = 0; i < 200; i++) {
    const f = (await reader.next())!;
    assert.equal(f.payload.length, 8192);
    assert.equal(f.payload[0], i & 0xff);
  }
  await Promise.all(pending);
  assert.equal(resolved, 200);
  conn.close();
  remote.close();
});

// ------------------------------------------------------------ hostile input

Deno.test("random garbage at random splits never hangs and never rejects unobserved", async () => {
  for (let seed = 1; seed <= 300; seed++) {
    const random = prng(seed);
    const role = ROLES[seed % 2];
    const { conn, remote } = rawPeer(role, {
      delivery: { seed, maxChunk: 17 },
    });
    const pieces: Uint8Array[] = [];
    for (let i = 0; i < 6; i++) {
      if (random() < 0.5) {
        pieces.push(
          new Uint8Array(1 + Math.floor(random() * 40)).map(() =>
            random() * 256
          ),
        );
      } else {
        pieces.push(frame({
          opcode: [0, 1, 2, 8, 9, 10, 3][Math.floor(random() * 7)],
          fin: random() < 0.7,
          rsv1: random() < 0.1,
          mask: random() < 0.8 ? role === "server" : role !== "server",
          payload: new Uint8Array(Math.floor(random() * 200)).map(() =>
            random() * 256
          ),
        }));
      }
    }
    await remote.write(concat(...pieces));
    remote.end();
    const writing = conn.writeMessage(MESSAGE_TYPE.Text, "hi").catch(() => {});
    while (true) {
      try {
        await conn.readMessage();
      } catch (error) {
        assert.ok(
          error instanceof ProtocolError || error instanceof CloseError,
          `seed ${seed}: ${error}`,
        );
        break;
      }
    }
    await writing;
    conn.close();
    if (!remote.closed) remote.close();
  }
});

// ------------------------------------------------------------ real sockets

Deno.test("a server Conn and a client Conn echo over loopback TCP", async () => {
  const { server, client, clientSocket } = await tcpConnPair();
  assert.deepEqual(server.remoteAddr, clientSocket.localAddr);
  const echo = (async () => {
    for await (const { type, data } of server) {
      await server.writeMessage(type, data);
    }
  })();
  for (const size of [0, 1, 125, 126, 65535, 65536, 1 << 20]) {
    const payload = pattern(size);
    await client.writeMessage(MESSAGE_TYPE.Binary, payload);
    const { data } = await client.readMessage();
    assert.deepEqual(data, payload);
  }
  const texts = Array.from({ length: 500 }, (_, i) => `message ${i} ✓`);
  await Promise.all(
    texts.map((t) => client.writeMessage(MESSAGE_TYPE.Text, t)),
  );
  for (const text of texts) {
    assert.equal(
      new TextDecoder().decode((await client.readMessage()).data),
      text,
    );
  }
  await client.closeGracefully(1000, "done", { timeout: 2000 });
  await echo;
  server.close();
});

// ------------------------------------------------------------ coalescing

Deno.test("answers to a pipelined burst leave together, not one write each", async () => {
  const [local, remote] = createPipe();
  const { transport, writes } = recordingWrites(local);
  const conn = new Conn(transport, { role: "server" });
  await remote.write(frames(
    ...Array.from(
      { length: 100 },
      (_, i) => ({ opcode: OP.text, payload: `m${i}`, mask: true }),
    ),
  ));
  for (let i = 0; i < 100; i++) {
    const { type, data } = await conn.readMessage();
    await conn.writeMessage(type, data);
  }
  const reader = new FrameReader(remote);
  for (let i = 0; i < 100; i++) {
    assert.equal(
      new TextDecoder().decode((await reader.next())!.payload),
      `m${i}`,
    );
  }
  // One write per transport read of the burst (the idle read buffer takes
  // it in a few reads), where answering each message alone would take 100.
  assert.ok(writes.length <= 6, `${writes.length} writes`);
  conn.close();
  remote.close();
});

Deno.test("a write held back during a burst still leaves when the application stops reading", async () => {
  const { conn, send, reader, remote } = rawPeer("server");
  await send({ opcode: OP.text, payload: "one" }, {
    opcode: OP.text,
    payload: "two",
  });
  await conn.readMessage();
  await conn.writeMessage(MESSAGE_TYPE.Text, "answer");
  // The application never reads "two"; the answer goes out anyway.
  const f = (await reader.next())!;
  assert.equal(new TextDecoder().decode(f.payload), "answer");
  conn.close();
  remote.close();
});

Deno.test("partial transport writes are completed in order", async () => {
  const [a, b] = createPipe({ maxWrite: 7, delivery: { seed: 4 } });
  const server = new Conn(a, { role: "server" });
  const client = new Conn(b, { role: "client" });
  const payloads = [0, 5, 200, 70000].map((n) => pattern(n));
  await Promise.all(
    payloads.map((p) => server.writeMessage(MESSAGE_TYPE.Binary, p)),
  );
  for (const p of payloads) {
    assert.deepEqual((await client.readMessage()).data, p);
  }
  server.close();
  client.close();
});

Deno.test("writeMessage({ signal }) gives up a write the peer does not take, sticky", async () => {
  const { conn, remote } = rawPeer("server", { capacity: 1024 });
  const controller = new AbortController();
  const writing = conn.writeMessage(
    MESSAGE_TYPE.Binary,
    new Uint8Array(1 << 20),
    {
      signal: controller.signal,
    },
  );
  const reason = new Error("give up");
  controller.abort(reason);
  await assert.rejects(writing, (e) => e === reason);
  await assert.rejects(
    conn.writeMessage(MESSAGE_TYPE.Text, "x"),
    (e) => e === reason,
  );
  // An already aborted signal rejects before anything is queued.
  const fresh = rawPeer("server");
  await assert.rejects(
    fresh.conn.writeMessage(MESSAGE_TYPE.Text, "x", {
      signal: AbortSignal.abort(reason),
    }),
    (e) => e === reason,
  );
  await fresh.conn.writeMessage(MESSAGE_TYPE.Text, "still fine");
  assert.equal(
    new TextDecoder().decode((await fresh.reader.next())!.payload),
    "still fine",
  );
  for (const c of [conn, fresh.conn]) c.close();
  remote.close();
  fresh.remote.close();
});

Deno.test("a header that claims a huge length costs little until the bytes come", async () => {
  const { conn, send, remote } = rawPeer("server");
  await send({ opcode: OP.binary, declaredLength: 1n << 40n });
  const reading = conn.readMessage();
  await send({ opcode: OP.cont }); // garbage payload bytes, not a frame
  remote.end();
  await assert.rejects(reading, (e) => isCloseError(e, 1006));
  // Reaching this point at all shows no terabyte was allocated.
  remote.close();
});

Deno.test("messages handed out as views are never overwritten by later reads", async () => {
  for (const delivery of ["whole", { seed: 12, maxChunk: 700 }] as Delivery[]) {
    const { conn, send, remote } = rawPeer("server", { delivery });
    const sent = Array.from(
      { length: 400 },
      (_, i) => pattern(1 + (i * 37) % 300, i),
    );
    const kept: Uint8Array[] = [];
    for (let i = 0; i < sent.length; i += 50) {
      await send(
        ...sent.slice(i, i + 50).map((payload) => ({
          opcode: OP.binary,
          payload,
        })),
      );
      for (let j = 0; j < 50; j++) kept.push((await conn.readMessage()).data);
    }
    for (let i = 0; i < sent.length; i++) {
      assert.deepEqual(kept[i], sent[i], `message ${i}`);
    }
    conn.close();
    remote.close();
  }
});

// ------------------------------------------------------------ fuzzing

/** Terminal events of a fuzz case and the error each must produce. */
const FUZZ_ENDINGS: { frames: RawFrame[]; check: (e: unknown) => boolean }[] = [
  { frames: [], check: (e) => isCloseError(e, 1006) }, // EOF
  {
    frames: [{ opcode: OP.close, payload: closePayload(1000, "ok") }],
    check: (e) => isCloseError(e, 1000),
  },
  { frames: [{ opcode: OP.close }], check: (e) => isCloseError(e, 1005) },
  ...VIOLATIONS.filter((v) => !v.role).map((v) => ({
    frames: v.frames,
    check: (e: unknown) => e instanceof ProtocolError && e.code === v.code,
  })),
];

Deno.test("fuzz: random valid traffic then an ending delivers exactly the messages, then the right error", async () => {
  let cases = 0;
  for (let seed = 1; seed <= 1000; seed++) {
    const random = prng(seed * 7919);
    const pick = <T>(items: readonly T[]) =>
      items[Math.floor(random() * items.length)];
    const role = pick(ROLES);
    const expected: { type: number; data: Uint8Array }[] = [];
    const specs: RawFrame[] = [];
    const control = () =>
      pick<RawFrame>([
        { opcode: OP.ping, payload: pattern(Math.floor(random() * 126), seed) },
        { opcode: OP.pong, payload: pattern(Math.floor(random() * 10), seed) },
      ]);
    for (let m = Math.floor(random() * 5); m > 0; m--) {
      const text = random() < 0.5;
      const size = pick([0, 1, 125, 126, 127, 300, 65535, 65536]);
      const data = text ? utf8(textOf(size)) : pattern(size, seed + m);
      expected.push({ type: text ? 1 : 2, data });
      // Cut anywhere, even inside a character: validity is per message.
      const cuts = [
        ...new Set([
          0,
          data.length,
          ...Array.from(
            { length: Math.floor(random() * 4) },
            () => Math.floor(random() * data.length),
          ),
        ]),
      ].sort((a, b) => a - b);
      if (cuts.length === 1) cuts.push(0);
      for (let i = 0; i + 1 < cuts.length; i++) {
        if (i > 0 && random() < 0.3) specs.push(control());
        specs.push({
          opcode: i === 0 ? (text ? OP.text : OP.binary) : OP.cont,
          fin: i + 2 === cuts.length,
          payload: data.subarray(cuts[i], cuts[i + 1]),
        });
      }
      if (random() < 0.2) specs.push(control());
    }
    const ending = pick(FUZZ_ENDINGS);
    specs.push(...ending.frames);
    const wire = frames(
      ...specs.map((s) => ({ mask: role === "server", ...s })),
    );
    // One byte per read only for short traffic, to keep the run short.
    const { conn, remote } = rawPeer(role, {
      delivery: wire.length < 4000 && random() < 0.3
        ? "byte"
        : { seed, maxChunk: pick([3, 50, 2000, 70000]) },
    });
    // Answers (pongs, close echoes) are drained so writes never stall.
    const draining = new FrameReader(remote).all();
    const sending = remote.write(wire).then(() => remote.end(), () => {});
    for (const message of expected) {
      const got = await conn.readMessage();
      assert.equal(got.type, message.type, `seed ${seed}`);
      assert.deepEqual(got.data, message.data, `seed ${seed}`);
    }
    const error = await conn.readMessage().then(() => undefined, (e) => e);
    assert.ok(ending.check(error), `seed ${seed}: ${error}`);
    await sending;
    conn.close();
    remote.close();
    await draining;
    cases++;
  }
  assert.equal(cases, 1000);
});

Deno.test("closeGracefully() throws RangeError for a code that may not be sent, sending nothing", async () => {
  const { conn, reader, remote } = rawPeer("server");
  assert.throws(
    () => conn.closeGracefully(1006),
    /close code 1006 may not be sent/,
  );
  assert.throws(() => conn.closeGracefully(1000, "x".repeat(124)), RangeError);
  assert.throws(
    () => conn.closeGracefully(1000, "", { timeout: -1 }),
    RangeError,
  );
  // 1005 means "no status": an empty close frame.
  await conn.closeGracefully(1005, "", { timeout: 10 });
  const f = (await reader.next())!;
  assert.equal(f.opcode, OP.close);
  assert.equal(f.payload.length, 0);
  assert.equal(await reader.next(), null);
  remote.close();
});

Deno.test("closeGracefully({ afterCurrentMessage }) lets the answer to a message being handled go first", async () => {
  const { server, client } = connPair();
  await client.writeMessage(MESSAGE_TYPE.Text, "question");
  const app = (async () => {
    const { data } = await server.readMessage();
    await new Promise((resolve) => setTimeout(resolve, 30)); // handling it
    await server.writeMessage(MESSAGE_TYPE.Text, data);
    return await server.readMessage().catch((e) => e);
  })();
  // Closing from outside the loop while the message is being handled.
  await new Promise((resolve) => setTimeout(resolve, 5));
  const closing = server.closeGracefully(1001, "", {
    timeout: 2000,
    afterCurrentMessage: true,
  });
  const answer = await client.readMessage();
  assert.equal(new TextDecoder().decode(answer.data), "question");
  await assert.rejects(client.readMessage(), (e) => isCloseError(e, 1001));
  await closing;
  assert.ok(isCloseError(await app, 1001));
  assert.equal(server.closed && client.closed, true);
});

Deno.test("closeGracefully({ afterCurrentMessage }) closes at once when the application is waiting to read", async () => {
  const { server, client } = connPair();
  const reading = server.readMessage().catch((e) => e);
  const clientReading = client.readMessage().catch((e) => e);
  await server.closeGracefully(1001, "", {
    timeout: 2000,
    afterCurrentMessage: true,
  });
  assert.ok(isCloseError(await clientReading, 1001));
  assert.ok(isCloseError(await reading, 1001));
});
