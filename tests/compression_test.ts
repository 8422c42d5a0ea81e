// permessage-deflate (RFC 7692) at the Conn level: what goes on the wire,
// what is accepted from it, the read limit on inflated bytes, and round trips
// through the Upgrader and the Dialer, with the `ws` package on the other end.

import assert from "node:assert/strict";
import zlib from "node:zlib";
import { NodeWebSocket, WebSocketServer } from "./_ws.ts";
import {
  CloseError,
  Conn,
  type ConnOptions,
  MESSAGE_TYPE,
  PreparedMessage,
  ProtocolError,
  ReadLimitError,
} from "../conn.ts";
import {
  acceptDeflateResponse,
  DEFLATE_OFFER,
  type DeflateParameters,
  negotiateDeflate,
} from "../deflate.ts";
import { Dialer } from "../dialer.ts";
import { serve, Upgrader } from "../upgrader.ts";
import { createPipe, type Delivery } from "../_pipe.ts";
import {
  connPair,
  expectClose,
  jsonText,
  mib,
  pattern,
  rawPeer,
  type Role,
  ROLES,
  runJsonScript,
} from "./_helpers.ts";
import {
  concat,
  FrameReader,
  frames,
  OP,
  type RawFrame,
  type ReadFrame,
  utf8,
} from "./_frames.ts";

const TAIL = new Uint8Array([0x00, 0x00, 0xff, 0xff]);
const NEGOTIATED: DeflateParameters = negotiateDeflate(DEFLATE_OFFER)!
  .parameters;
const decoder = new TextDecoder();

/** What a zlib peer (ws, browsers) sends: sync flush, tail removed. */
function deflate(data: Uint8Array | string): Uint8Array {
  const bytes = typeof data === "string" ? utf8(data) : data;
  const out = zlib.deflateRawSync(bytes, {
    finishFlush: zlib.constants.Z_SYNC_FLUSH,
  });
  return new Uint8Array(out.subarray(0, -4));
}

/** How a zlib peer inflates a message (RFC 7692 section 7.2.2). */
function inflate(payload: Uint8Array): Uint8Array {
  return new Uint8Array(
    zlib.inflateRawSync(concat(payload, TAIL), {
      finishFlush: zlib.constants.Z_SYNC_FLUSH,
    }),
  );
}

/**
 * {@linkcode rawPeer} with compression negotiated: a Conn on one end of a
 * pipe, raw bytes on the other.
 */
function compressedPeer(
  role: Role,
  options: Partial<ConnOptions> = {},
  delivery?: Delivery,
) {
  return rawPeer(role, {
    delivery,
    conn: { compression: NEGOTIATED, ...options },
  });
}

/** Two Conns with compression negotiated (threshold 0), over one pipe. */
function compressedPair(
  options: Partial<ConnOptions> = {},
  delivery: Delivery = "whole",
) {
  return connPair(delivery, {
    compression: NEGOTIATED,
    compressionThreshold: 0,
    ...options,
  });
}

/** `socket`, with every byte it reads and writes copied into the arrays. */
function recording(
  socket: Deno.Conn,
  received: Uint8Array[],
  sent: Uint8Array[],
): Deno.Conn {
  return new Proxy(socket, {
    get(target, name) {
      if (name === "read") {
        return async (buffer: Uint8Array) => {
          const n = await target.read(buffer);
          if (n !== null) received.push(buffer.slice(0, n));
          return n;
        };
      }
      if (name === "write") {
        return async (data: Uint8Array) => {
          const n = await target.write(data);
          sent.push(data.slice(0, n));
          return n;
        };
      }
      const value = Reflect.get(target, name);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
}

/** The first frame after the HTTP head in recorded bytes. */
async function firstFrameAfterHead(chunks: Uint8Array[]): Promise<ReadFrame> {
  const bytes = concat(...chunks);
  const end = decoder.decode(bytes).indexOf("\r\n\r\n") + 4;
  let rest: Uint8Array | null = bytes.subarray(end);
  const frame = await new FrameReader({
    read(buffer) {
      if (rest === null || rest.length === 0) return Promise.resolve(null);
      const n = Math.min(buffer.length, rest.length);
      buffer.set(rest.subarray(0, n));
      rest = rest.subarray(n);
      return Promise.resolve(n);
    },
  }).next();
  assert.ok(frame, "no frame after the head");
  return frame;
}

/** Reads everything a streaming reader yields, `size` bytes at a time. */
async function readAll(
  reader: { read(buffer: Uint8Array): Promise<number | null> },
  size: number,
): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  const buffer = new Uint8Array(size);
  for (let n; (n = await reader.read(buffer)) !== null;) {
    parts.push(buffer.slice(0, n));
  }
  return concat(...parts);
}

// ---------------------------------------------------------------- sending

for (const role of ROLES) {
  Deno.test(`${role}: writeMessage() sets RSV1 and sends a payload zlib inflates`, async () => {
    const { conn, remote, reader } = compressedPeer(role);
    const text = jsonText(5000);
    await conn.writeMessage(MESSAGE_TYPE.Text, text);
    const f = (await reader.next())!;
    assert.equal(f.rsv, 4);
    assert.equal(f.fin, true);
    assert.equal(f.opcode, OP.text);
    assert.equal(f.masked, role === "client");
    assert.ok(f.payload.length < 2500, `${f.payload.length} bytes`);
    assert.equal(decoder.decode(inflate(f.payload)), text);
    conn.close();
    remote.close();
  });
}

Deno.test("writeMessage() sends messages below the threshold uncompressed", async () => {
  const { conn, remote, reader } = compressedPeer("server", {
    compressionThreshold: 100,
  });
  await conn.writeMessage(MESSAGE_TYPE.Text, "a".repeat(99));
  await conn.writeMessage(MESSAGE_TYPE.Text, "a".repeat(100));
  const small = (await reader.next())!;
  assert.equal(small.rsv, 0);
  assert.equal(decoder.decode(small.payload), "a".repeat(99));
  const big = (await reader.next())!;
  assert.equal(big.rsv, 4);
  assert.equal(decoder.decode(inflate(big.payload)), "a".repeat(100));
  conn.close();
  remote.close();
});

Deno.test("writeMessage() uses a default threshold of 256 bytes", async () => {
  const { conn, remote, reader } = compressedPeer("server", {
    compressionThreshold: undefined,
  });
  await conn.writeMessage(MESSAGE_TYPE.Binary, new Uint8Array(255));
  await conn.writeMessage(MESSAGE_TYPE.Binary, new Uint8Array(256));
  assert.equal((await reader.next())!.rsv, 0);
  assert.equal((await reader.next())!.rsv, 4);
  conn.close();
  remote.close();
});

Deno.test("enableWriteCompression() toggles compression per message, in order", async () => {
  const { conn, remote, reader } = compressedPeer("client", {
    compressionThreshold: 0,
  });
  const sent: Promise<void>[] = [];
  for (let i = 0; i < 6; i++) {
    conn.enableWriteCompression(i % 2 === 0);
    sent.push(conn.writeMessage(MESSAGE_TYPE.Text, `message ${i}`));
  }
  await Promise.all(sent);
  for (let i = 0; i < 6; i++) {
    const f = (await reader.next())!;
    assert.equal(f.rsv, i % 2 === 0 ? 4 : 0, `message ${i}`);
    const payload = f.rsv === 4 ? inflate(f.payload) : f.payload;
    assert.equal(decoder.decode(payload), `message ${i}`);
  }
  assert.throws(
    () => conn.enableWriteCompression("yes" as unknown as boolean),
    TypeError,
  );
  conn.close();
  remote.close();
});

Deno.test("writeMessage() keeps compressed and uncompressed messages and control frames in order", async () => {
  const { conn, remote, reader } = compressedPeer("server", {
    compressionThreshold: 1000,
  });
  const sizes = [2000, 10, 50_000, 0, 3000, 999];
  const writes = sizes.map((size, i) =>
    conn.writeMessage(MESSAGE_TYPE.Text, String(i).repeat(size))
  );
  const ping = conn.writeControl(MESSAGE_TYPE.Ping, "p");
  await Promise.all([...writes, ping]);
  const data: string[] = [];
  let pings = 0;
  while (data.length < sizes.length) {
    const f = (await reader.next())!;
    if (f.opcode === OP.ping) {
      pings++;
      continue;
    }
    assert.equal(f.rsv, sizes[data.length] >= 1000 ? 4 : 0);
    data.push(decoder.decode(f.rsv === 4 ? inflate(f.payload) : f.payload));
  }
  assert.equal(pings, 1);
  assert.deepEqual(data, sizes.map((size, i) => String(i).repeat(size)));
  conn.close();
  remote.close();
});

Deno.test("writeMessage() with compression lets the caller reuse a small payload once it returns", async () => {
  const { conn, remote, reader } = compressedPeer("server", {
    compressionThreshold: 0,
  });
  const buffer = utf8("a".repeat(1000));
  const writes = [conn.writeMessage(MESSAGE_TYPE.Binary, buffer)];
  buffer.fill(0x62); // "b"
  writes.push(conn.writeMessage(MESSAGE_TYPE.Binary, buffer));
  await Promise.all(writes);
  assert.equal(
    decoder.decode(inflate((await reader.next())!.payload)),
    "a".repeat(1000),
  );
  assert.equal(
    decoder.decode(inflate((await reader.next())!.payload)),
    "b".repeat(1000),
  );
  conn.close();
  remote.close();
});

for (const role of ROLES) {
  for (const bits of [9, 10, 12, 14, 15]) {
    Deno.test(`${role}: compresses within the ${bits}-bit window its peer allowed, and inflates`, async () => {
      const answer = role === "server"
        ? `permessage-deflate; server_max_window_bits=${bits}`
        : `permessage-deflate; server_no_context_takeover; client_max_window_bits=${bits}`;
      const parameters = role === "server"
        ? negotiateDeflate(answer)!.parameters
        : acceptDeflateResponse(answer)!;
      const { conn, remote, reader, send } = compressedPeer(role, {
        compression: parameters,
        compressionThreshold: 0,
      });
      // Repetitive over more than the window: a wider one would reach back.
      const text = jsonText(40_000);
      await conn.writeMessage(MESSAGE_TYPE.Text, text);
      const f = (await reader.next())!;
      assert.equal(f.rsv, 4);
      assert.ok(f.payload.length < text.length / 2, `${f.payload.length} B`);
      // An inflater with exactly that window refuses any farther distance.
      const inflated = zlib.inflateRawSync(
        concat(f.payload, new Uint8Array([0, 0, 0xff, 0xff])),
        { windowBits: bits, finishFlush: zlib.constants.Z_SYNC_FLUSH },
      );
      assert.equal(decoder.decode(inflated), text);
      await send({ opcode: OP.text, rsv1: true, payload: deflate(text) });
      assert.equal(decoder.decode((await conn.readMessage()).data), text);
      conn.close();
      remote.close();
    });
  }
}

Deno.test("a server sends uncompressed to a client that allowed an 8-bit window, and inflates", async () => {
  const negotiated = negotiateDeflate(
    "permessage-deflate; server_max_window_bits=8",
  )!;
  const { conn, remote, reader, send } = compressedPeer("server", {
    compression: negotiated.parameters,
    compressionThreshold: 0,
  });
  const text = jsonText(3000);
  await conn.writeMessage(MESSAGE_TYPE.Text, text);
  const f = (await reader.next())!;
  assert.equal(f.rsv, 0);
  assert.equal(decoder.decode(f.payload), text);
  await send({ opcode: OP.text, rsv1: true, payload: deflate(text) });
  assert.equal(decoder.decode((await conn.readMessage()).data), text);
  conn.close();
  remote.close();
});

for (const level of [-2, -1, 0, 1, 6, 9]) {
  Deno.test(`compression level ${level}: messages and fragments round-trip, and a higher level compresses no worse`, async () => {
    const { conn, remote, reader } = compressedPeer("server", {
      compressionLevel: level,
      compressionThreshold: 0,
    });
    const text = jsonText(20_000);
    await conn.writeMessage(MESSAGE_TYPE.Text, text);
    const whole = (await reader.next())!;
    assert.equal(whole.rsv, 4);
    assert.equal(decoder.decode(inflate(whole.payload)), text);
    if (level === 0) assert.ok(whole.payload.length >= text.length);
    if (level >= 1) {
      assert.ok(
        whole.payload.length < text.length / 3,
        `${whole.payload.length} bytes`,
      );
    }
    const writer = conn.nextWriter(MESSAGE_TYPE.Text);
    for (let i = 0; i < text.length; i += 5000) {
      await writer.write(text.slice(i, i + 5000));
    }
    await writer.close();
    const pieces: Uint8Array[] = [];
    for (let f; (f = (await reader.next())!);) {
      pieces.push(f.payload);
      if (f.fin) break;
    }
    assert.equal(decoder.decode(inflate(concat(...pieces))), text);
    conn.close();
    remote.close();
  });
}

Deno.test("setCompressionLevel() changes the level of later messages; a bad level is a RangeError", async () => {
  const { conn, remote, reader } = compressedPeer("server", {
    compressionThreshold: 0,
  });
  const text = jsonText(20_000);
  const sizes: number[] = [];
  for (const level of [0, 9]) {
    conn.setCompressionLevel(level);
    await conn.writeMessage(MESSAGE_TYPE.Text, text);
    const f = (await reader.next())!;
    assert.equal(decoder.decode(inflate(f.payload)), text);
    sizes.push(f.payload.length);
  }
  assert.ok(sizes[1] < sizes[0] / 3, String(sizes));
  for (const level of [-3, 10, 1.5, NaN]) {
    assert.throws(() => conn.setCompressionLevel(level), {
      name: "RangeError",
      message:
        `Cannot set compression level: compressionLevel must be an integer from -2 to 9, got ${level}`,
    });
  }
  assert.throws(() => new Upgrader({ compressionLevel: 10 }), RangeError);
  conn.close();
  remote.close();
});

for (const role of ROLES) {
  Deno.test(`${role}: nextWriter() compresses, with RSV1 on the first frame only`, async () => {
    const { conn, remote, reader } = compressedPeer(role, {
      writeBufferSize: 1024,
    });
    const text = jsonText(10_000);
    const writer = conn.nextWriter(MESSAGE_TYPE.Text);
    for (let i = 0; i < text.length; i += 700) {
      await writer.write(text.slice(i, i + 700));
    }
    await writer.close();
    const payloads: Uint8Array[] = [];
    for (let first = true;; first = false) {
      const f = (await reader.next())!;
      assert.equal(f.rsv, first ? 4 : 0);
      assert.equal(f.opcode, first ? OP.text : OP.cont);
      payloads.push(f.payload);
      if (f.fin) break;
    }
    assert.ok(payloads.length > 2, `${payloads.length} frames`);
    assert.equal(decoder.decode(inflate(concat(...payloads))), text);
    conn.close();
    remote.close();
  });
}

Deno.test("nextWriter() sends a message that ends within its first fragment below the threshold uncompressed", async () => {
  const { conn, remote, reader } = compressedPeer("server", {
    compressionThreshold: 64,
  });
  const small = conn.nextWriter(MESSAGE_TYPE.Text);
  await small.write("tiny");
  await small.close();
  const empty = conn.nextWriter(MESSAGE_TYPE.Binary);
  await empty.close();
  const big = conn.nextWriter(MESSAGE_TYPE.Text);
  await big.write("b".repeat(64));
  await big.close();
  const f1 = (await reader.next())!;
  assert.deepEqual([f1.rsv, decoder.decode(f1.payload)], [0, "tiny"]);
  const f2 = (await reader.next())!;
  assert.deepEqual([f2.rsv, f2.payload.length], [0, 0]);
  const f3 = (await reader.next())!;
  assert.equal(f3.rsv, 4);
  assert.equal(decoder.decode(inflate(f3.payload)), "b".repeat(64));
  conn.close();
  remote.close();
});

Deno.test("nextWriter() with threshold 0 sends an empty message as the single byte 00", async () => {
  const { conn, remote, reader } = compressedPeer("server", {
    compressionThreshold: 0,
  });
  const writer = conn.nextWriter(MESSAGE_TYPE.Binary);
  await writer.close();
  const f = (await reader.next())!;
  assert.equal(f.rsv, 4);
  assert.deepEqual([...f.payload], [0x00]); // RFC 7692 section 7.2.3.6
  conn.close();
  remote.close();
});

Deno.test("writePreparedMessage() compresses once and sends the same payload on every connection", async () => {
  const prepared = new PreparedMessage(MESSAGE_TYPE.Text, jsonText(4000));
  const payloads: Uint8Array[] = [];
  for (const role of ["server", "server", "client"] as const) {
    const { conn, remote, reader } = compressedPeer(role);
    await conn.writePreparedMessage(prepared);
    const f = (await reader.next())!;
    assert.equal(f.rsv, 4);
    assert.equal(decoder.decode(inflate(f.payload)), jsonText(4000));
    payloads.push(f.payload);
    conn.close();
    remote.close();
  }
  assert.deepEqual(payloads[1], payloads[0]);
  assert.deepEqual(payloads[2], payloads[0]);
});

Deno.test("without negotiation nothing is compressed, whatever enableWriteCompression says", async () => {
  const { conn, remote, reader } = compressedPeer("server", {
    compression: undefined,
    compressionThreshold: 0,
  });
  assert.equal(conn.compression, undefined);
  conn.enableWriteCompression(true);
  await conn.writeMessage(MESSAGE_TYPE.Text, jsonText(2000));
  const writer = conn.nextWriter(MESSAGE_TYPE.Text);
  await writer.write(jsonText(2000));
  await writer.close();
  assert.equal((await reader.next())!.rsv, 0);
  assert.equal((await reader.next())!.rsv, 0);
  conn.close();
  remote.close();
});

Deno.test("new Conn() checks compression and compressionThreshold", () => {
  const [a, b] = createPipe();
  for (const threshold of [-1, 1.5, NaN, Infinity]) {
    assert.throws(
      () => new Conn(a, { role: "server", compressionThreshold: threshold }),
      (error: Error) =>
        error instanceof RangeError &&
        /compressionThreshold must be a non-negative integer/.test(
          error.message,
        ),
    );
  }
  assert.throws(
    () =>
      new Conn(a, {
        role: "server",
        compression: true as unknown as DeflateParameters,
      }),
    TypeError,
  );
  a.close();
  b.close();
});

// -------------------------------------------------------------- receiving

for (const role of ROLES) {
  Deno.test(`${role}: readMessage() inflates a message from zlib, whole and fragmented with pings between`, async () => {
    const { conn, remote, send, reader } = compressedPeer(role);
    const text = jsonText(20_000);
    const payload = deflate(text);
    await send({ opcode: OP.text, rsv1: true, payload });
    const { type, data } = await conn.readMessage();
    assert.deepEqual({ type, data }, {
      type: MESSAGE_TYPE.Text,
      data: utf8(text),
    });
    const third = Math.floor(payload.length / 3);
    await send(
      {
        opcode: OP.binary,
        rsv1: true,
        fin: false,
        payload: payload.subarray(0, third),
      },
      { opcode: OP.ping, payload: "1" },
      {
        opcode: OP.cont,
        fin: false,
        payload: payload.subarray(third, 2 * third),
      },
      { opcode: OP.ping, payload: "2" },
      { opcode: OP.cont, fin: false, payload: new Uint8Array(0) },
      { opcode: OP.cont, payload: payload.subarray(2 * third) },
    );
    const message = await conn.readMessage();
    assert.equal(message.type, MESSAGE_TYPE.Binary);
    assert.equal(decoder.decode(message.data), text);
    for (const expected of ["1", "2"]) {
      const pong = (await reader.next())!;
      assert.equal(pong.opcode, OP.pong);
      assert.equal(decoder.decode(pong.payload), expected);
    }
    conn.close();
    remote.close();
  });
}

Deno.test("readMessage() inflates a message that ends in a final block, then the next one", async () => {
  const { conn, remote, send } = compressedPeer("server");
  // Z_FINISH: the message ends in a BFINAL block (RFC 7692 section 7.2.3.4).
  const finished = new Uint8Array(zlib.deflateRawSync(utf8(jsonText(3000))));
  await send(
    { opcode: OP.text, rsv1: true, payload: finished },
    { opcode: OP.text, rsv1: true, payload: deflate("next") },
  );
  assert.equal(decoder.decode((await conn.readMessage()).data), jsonText(3000));
  assert.equal(decoder.decode((await conn.readMessage()).data), "next");
  conn.close();
  remote.close();
});

Deno.test("readMessage() inflates the RFC 7692 section 7.2.3.1 example and an empty block", async () => {
  const { conn, remote, send } = compressedPeer("client");
  await send(
    {
      opcode: OP.text,
      rsv1: true,
      payload: new Uint8Array([0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]),
    },
    { opcode: OP.binary, rsv1: true, payload: new Uint8Array([0x00]) },
  );
  assert.equal(decoder.decode((await conn.readMessage()).data), "Hello");
  assert.equal((await conn.readMessage()).data.length, 0);
  conn.close();
  remote.close();
});

Deno.test("readMessage() mixes compressed and uncompressed messages", async () => {
  const { conn, remote, send } = compressedPeer("server");
  const specs: RawFrame[] = [];
  for (let i = 0; i < 20; i++) {
    const text = `message ${i} `.repeat(i * 10);
    specs.push(
      i % 3 === 0
        ? { opcode: OP.text, payload: text }
        : { opcode: OP.text, rsv1: true, payload: deflate(text) },
    );
  }
  await send(...specs);
  for (let i = 0; i < 20; i++) {
    const { data } = await conn.readMessage();
    assert.equal(decoder.decode(data), `message ${i} `.repeat(i * 10));
  }
  conn.close();
  remote.close();
});

for (
  const [name, spec] of [
    ["a continuation frame", [
      { opcode: OP.text, rsv1: true, fin: false, payload: deflate("ab") },
      { opcode: OP.cont, rsv1: true, payload: new Uint8Array(0) },
    ]],
    ["a ping", [{ opcode: OP.ping, rsv1: true, payload: "x" }]],
    ["a close frame", [{ opcode: OP.close, rsv1: true }]],
  ] as [string, RawFrame[]][]
) {
  Deno.test(`readMessage() closes with 1002 when RSV1 is set on ${name}`, async () => {
    const { conn, send, reader } = compressedPeer("server");
    await send(...spec);
    const error = await conn.readMessage().catch((e) => e);
    assert.ok(error instanceof ProtocolError);
    assert.equal(error.code, 1002);
    assert.match(error.message, /RSV1 set on a (control|continuation) frame/);
    await expectClose(reader, 1002);
  });
}

Deno.test("readMessage() closes with 1002 when RSV1 is set without negotiation", async () => {
  const { conn, send, reader } = compressedPeer("client", {
    compression: undefined,
  });
  await send({ opcode: OP.text, rsv1: true, payload: deflate("hi") });
  const error = await conn.readMessage().catch((e) => e);
  assert.ok(error instanceof ProtocolError);
  assert.equal(error.code, 1002);
  assert.match(error.message, /RSV1 set with no extension negotiated/);
  await expectClose(reader, 1002);
});

Deno.test("readMessage() still closes with 1002 for RSV2 and RSV3 with compression on", async () => {
  for (const bit of ["rsv2", "rsv3"] as const) {
    const { conn, send, reader } = compressedPeer("server");
    await send({
      opcode: OP.binary,
      rsv1: true,
      [bit]: true,
      payload: deflate("x"),
    });
    const error = await conn.readMessage().catch((e) => e);
    assert.equal(error.code, 1002);
    await expectClose(reader, 1002);
  }
});

for (
  const [name, payload] of [
    ["a corrupt stream", new Uint8Array([0xff, 0xff, 0xff, 0xff])],
    // Not even the 00 of an empty block (RFC 7692 section 7.2.3.6).
    ["an empty payload", new Uint8Array(0)],
    ["a truncated stream", deflate(jsonText(1000)).subarray(0, 40)],
    [
      "data after a final block",
      concat(zlib.deflateRawSync(utf8("done")), new Uint8Array([1, 2, 3])),
    ],
  ] as [string, Uint8Array][]
) {
  Deno.test(`readMessage() closes with 1007 on ${name}`, async () => {
    const { conn, send, reader } = compressedPeer("server");
    await send({ opcode: OP.binary, rsv1: true, payload });
    const error = await conn.readMessage().catch((e) => e);
    assert.ok(error instanceof ProtocolError, String(error));
    assert.equal(error.code, 1007);
    await expectClose(reader, 1007);
    // The read side stays failed with the same error.
    assert.equal(await conn.readMessage().catch((e) => e), error);
  });
}

Deno.test("readMessage() validates UTF-8 after inflation: valid text split anywhere passes, invalid closes with 1007", async () => {
  const { conn, remote, send } = compressedPeer("server");
  const text = "é✓😀".repeat(3000);
  const payload = deflate(text);
  const specs: RawFrame[] = [];
  for (let i = 0; i < payload.length; i += 97) {
    specs.push({
      opcode: i === 0 ? OP.text : OP.cont,
      rsv1: i === 0,
      fin: i + 97 >= payload.length,
      payload: payload.subarray(i, i + 97),
    });
  }
  await send(...specs);
  assert.equal(decoder.decode((await conn.readMessage()).data), text);
  // Invalid once inflated, although the compressed bytes are anything.
  await send({
    opcode: OP.text,
    rsv1: true,
    payload: deflate(new Uint8Array([0x61, 0xc3, 0x28])),
  });
  const error = await conn.readMessage().catch((e) => e);
  assert.equal(error.code, 1007);
  assert.match(error.message, /not valid UTF-8/);
  conn.close();
  remote.close();
});

Deno.test("readMessage() closes with 1007 on a compressed text message truncated inside a character", async () => {
  const { conn, send, reader } = compressedPeer("server");
  await send({
    opcode: OP.text,
    rsv1: true,
    payload: deflate(utf8("ab😀").subarray(0, 4)),
  });
  const error = await conn.readMessage().catch((e) => e);
  assert.equal(error.code, 1007);
  await expectClose(reader, 1007);
});

Deno.test("the read limit bounds the inflated size: exactly the limit passes, one byte more closes with 1009", async () => {
  const { conn, send, reader } = compressedPeer("server");
  conn.setReadLimit(10_000);
  const zeros = new Uint8Array(10_000);
  await send({ opcode: OP.binary, rsv1: true, payload: deflate(zeros) });
  assert.equal((await conn.readMessage()).data.length, 10_000);
  // 10,001 bytes from 30 compressed ones: a small frame is no proof.
  const over = deflate(new Uint8Array(10_001));
  assert.ok(over.length < 100);
  await send({ opcode: OP.binary, rsv1: true, payload: over });
  const error = await conn.readMessage().catch((e) => e);
  assert.ok(error instanceof ReadLimitError, String(error));
  assert.equal(error.code, 1009);
  await expectClose(reader, 1009);
});

Deno.test("the read limit does not refuse a compressed message whose payload is larger than its inflated size", async () => {
  const { conn, remote, send } = compressedPeer("server");
  const data = pattern(4096);
  const payload = deflate(data);
  assert.ok(payload.length > data.length);
  conn.setReadLimit(4096);
  await send({ opcode: OP.binary, rsv1: true, payload });
  assert.deepEqual((await conn.readMessage()).data, data);
  conn.close();
  remote.close();
});

Deno.test("the read limit bounds what nextReader() streams out of a compressed message", async () => {
  const { conn, send, reader } = compressedPeer("client");
  conn.setReadLimit(50_000);
  await send({
    opcode: OP.text,
    rsv1: true,
    payload: deflate("a".repeat(60_000)),
  });
  const { reader: messageReader } = await conn.nextReader();
  const error = await readAll(messageReader, 1024).catch((e) => e);
  assert.equal(error.code, 1009);
  await expectClose(reader, 1009);
});

Deno.test("a 256 MiB bomb over a Conn is refused with 1009 without inflating it", async () => {
  // Built by zlib in a stream, so the test itself never holds 256 MiB.
  const deflater = zlib.createDeflateRaw();
  const parts: Uint8Array[] = [];
  deflater.on("data", (chunk: Uint8Array) => parts.push(new Uint8Array(chunk)));
  const zeros = new Uint8Array(1 << 20);
  for (let i = 0; i < 256; i++) deflater.write(zeros);
  await new Promise<void>((resolve) =>
    deflater.flush(zlib.constants.Z_SYNC_FLUSH, () => resolve())
  );
  deflater.close();
  const bomb = concat(...parts).subarray(0, -4);
  assert.ok(bomb.length < 300 * 1024, `${bomb.length} bytes`);
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeFile(`${dir}/bomb.bin`, bomb);
    // A child process, so its peak RSS (VmHWM) is the Conn's alone. The bomb
    // goes through a real socket, in frames of 64 KiB, and as one frame.
    const script = `
      import { Conn } from ${
      JSON.stringify(new URL("../conn.ts", import.meta.url).href)
    };
      import { DEFLATE_OFFER, negotiateDeflate } from ${
      JSON.stringify(new URL("../deflate.ts", import.meta.url).href)
    };
      const compression = negotiateDeflate(DEFLATE_OFFER).parameters;
      const peak = () => Number(/VmHWM:\\s+(\\d+)/.exec(Deno.readTextFileSync("/proc/self/status"))[1]) * 1024;
      const bomb = Deno.readFileSync(Deno.args[0]);
      const results = [];
      for (const fragment of [65536, bomb.length]) {
        using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
        const [socket, peer] = await Promise.all([
          listener.accept(),
          Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
        ]);
        const server = new Conn(socket, { role: "server", compression });
        const client = new Conn(peer, { role: "client", compression, compressionThreshold: 0 });
        server.setReadLimit(1 << 20);
        // Warm up: JIT, buffers and the inflater are not the bomb's.
        await client.writeMessage(2, new Uint8Array(1000));
        await server.readMessage();
        const before = peak();
        // The bomb's frames, built by hand: RSV1 on the first, masked with
        // an all-zero key (legal, and it leaves the payload as it is).
        const frames = [];
        for (let offset = 0; offset < bomb.length; offset += fragment) {
          const end = Math.min(bomb.length, offset + fragment);
          const body = bomb.slice(offset, end);
          const head = [ (end === bomb.length ? 0x80 : 0) | (offset === 0 ? 0x42 : 0x00) ];
          const n = body.length;
          if (n < 126) head.push(0x80 | n);
          else if (n < 65536) head.push(0x80 | 126, n >> 8, n & 255);
          else head.push(0x80 | 127, 0, 0, 0, 0, (n >>> 24) & 255, (n >> 16) & 255, (n >> 8) & 255, n & 255);
          head.push(0, 0, 0, 0);
          frames.push(new Uint8Array(head), body);
        }
        const sending = (async () => {
          try { for (const f of frames) await peer.write(f); } catch { /* closed by the server */ }
        })();
        let code = 0;
        try { await server.readMessage(); } catch (error) { code = error.code; }
        await sending;
        results.push({ code, growth: peak() - before });
        server.close();
        client.close();
      }
      console.log(JSON.stringify(results));
    `;
    await Deno.writeTextFile(`${dir}/bomb.ts`, script);
    const results = await runJsonScript<{ code: number; growth: number }[]>(
      `${dir}/bomb.ts`,
      [`${dir}/bomb.bin`],
      ["--no-check"],
    );
    assert.equal(results.length, 2);
    console.log(
      `bomb: ${(bomb.length / 1024).toFixed(0)} KiB inflating to 256 MiB ` +
        `refused; peak RSS grew by ${
          results.map((r) => mib(r.growth)).join(" and ")
        } MiB`,
    );
    // The inflater's own bound is the 1 MiB read limit; the rest is the
    // allocator and GC, which vary by machine (4-9 MiB seen). 32 MiB keeps
    // that noise out and still fails a Conn that inflates one 64 KiB
    // fragment whole (64 MiB) or the bomb (256 MiB).
    for (const result of results) {
      assert.equal(result.code, 1009);
      assert.ok(
        result.growth < 32 * 1024 * 1024,
        `peak RSS grew by ${result.growth} bytes`,
      );
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("nextReader() streams the inflated bytes of a fragmented compressed message", async () => {
  const { conn, remote, send } = compressedPeer("server");
  const data = utf8(jsonText(100_000));
  const payload = deflate(data);
  const half = payload.length >> 1;
  await send(
    {
      opcode: OP.text,
      rsv1: true,
      fin: false,
      payload: payload.subarray(0, half),
    },
    { opcode: OP.ping },
    { opcode: OP.cont, payload: payload.subarray(half) },
    { opcode: OP.binary, rsv1: true, payload: deflate("after") },
  );
  const { type, reader } = await conn.nextReader();
  assert.equal(type, MESSAGE_TYPE.Text);
  const buffer = new Uint8Array(1000);
  const first = await reader.read(buffer);
  assert.ok(first !== null && first > 0 && first <= 1000);
  assert.equal(await reader.read(new Uint8Array(0)), 0);
  const rest = await readAll(reader, 333);
  assert.deepEqual(concat(buffer.subarray(0, first), rest), data);
  assert.equal(await reader.read(buffer), null);
  assert.equal(decoder.decode((await conn.readMessage()).data), "after");
  conn.close();
  remote.close();
});

Deno.test("a compressed message abandoned part-way by nextReader() does not disturb the next one", async () => {
  const { conn, remote, send } = compressedPeer("client");
  const payload = deflate(jsonText(50_000));
  await send(
    {
      opcode: OP.text,
      rsv1: true,
      fin: false,
      payload: payload.subarray(0, 100),
    },
    { opcode: OP.cont, payload: payload.subarray(100) },
    { opcode: OP.text, rsv1: true, payload: deflate("second") },
    { opcode: OP.text, rsv1: true, payload: deflate("third") },
  );
  const first = await conn.nextReader();
  assert.ok((await first.reader.read(new Uint8Array(10))) === 10);
  const second = await conn.nextReader();
  await assert.rejects(() => first.reader.read(new Uint8Array(10)), TypeError);
  assert.equal(decoder.decode(await readAll(second.reader, 3)), "second");
  assert.equal(decoder.decode((await conn.readMessage()).data), "third");
  conn.close();
  remote.close();
});

Deno.test("an EOF at every byte of a compressed message rejects the read with 1006 and nothing else", async () => {
  const wire = frames(
    {
      opcode: OP.text,
      rsv1: true,
      fin: false,
      mask: true,
      payload: deflate(jsonText(300)).subarray(0, 50),
    },
    {
      opcode: OP.cont,
      mask: true,
      payload: deflate(jsonText(300)).subarray(50),
    },
  );
  for (let cut = 0; cut < wire.length; cut++) {
    const { conn, remote } = compressedPeer("server");
    await remote.write(wire.subarray(0, cut));
    remote.close();
    const error = await conn.readMessage().catch((e) => e);
    assert.ok(error instanceof CloseError, `cut at ${cut}: ${error}`);
    assert.equal(error.code, 1006);
    conn.close();
  }
});

Deno.test("close() during an inflate rejects the read, with nothing unobserved", async () => {
  const { conn, remote, send } = compressedPeer("server");
  await send({
    opcode: OP.binary,
    rsv1: true,
    payload: deflate(new Uint8Array(5_000_000)),
  });
  const reading = conn.readMessage().catch((e) => e);
  await new Promise((resolve) => setTimeout(resolve, 1));
  conn.close();
  const result = await reading;
  // Either the message made it before close() or the read was cut short.
  if (!("data" in result)) assert.ok(result instanceof Error);
  remote.close();
});

// ------------------------------------------------------------ round trips

const SIZES = [
  0,
  1,
  125,
  126,
  255,
  256,
  1000,
  4096,
  65_535,
  65_536,
  1 << 20,
  4 << 20,
];

for (const delivery of ["whole", { seed: 7, maxChunk: 3000 }] as Delivery[]) {
  const how = delivery === "whole" ? "whole" : "in random pieces";
  Deno.test(`Conn round trips text and binary of 0 B to 4 MiB, compressed both ways (${how})`, async () => {
    const { server, client } = compressedPair({}, delivery);
    for (const size of SIZES) {
      const text = jsonText(size);
      const binary = pattern(size);
      const sent = Promise.all([
        client.writeMessage(MESSAGE_TYPE.Text, text),
        client.writeMessage(MESSAGE_TYPE.Binary, binary),
      ]);
      for (const expected of [utf8(text), binary]) {
        const { type, data } = await server.readMessage();
        assert.equal(
          type,
          expected === binary ? MESSAGE_TYPE.Binary : MESSAGE_TYPE.Text,
        );
        assert.deepEqual(data, expected, `size ${size}`);
        await server.writeMessage(type, data);
        assert.deepEqual((await client.readMessage()).data, expected);
      }
      await sent;
    }
    await Promise.all([client.closeGracefully(), server.closeGracefully()]);
  });
}

Deno.test("Conn round trips fragmented messages with interleaved pings and per-message toggling", async () => {
  const { server, client } = compressedPair({ writeBufferSize: 4096 });
  let pongs = 0;
  client.setPongHandler(() => {
    pongs++;
  });
  const clientReads: Uint8Array[] = [];
  const clientReading = (async () => {
    for (let i = 0; i < 8; i++) {
      clientReads.push((await client.readMessage()).data);
    }
  })();
  for (let i = 0; i < 8; i++) {
    const size = [0, 10, 5000, 100_000][i % 4] + i;
    const data = utf8(jsonText(size));
    client.enableWriteCompression(i % 3 !== 0);
    const writer = client.nextWriter(MESSAGE_TYPE.Text);
    for (let offset = 0; offset < data.length; offset += 3000) {
      await writer.write(data.subarray(offset, offset + 3000));
      await client.writeControl(MESSAGE_TYPE.Ping, String(offset));
    }
    await writer.close();
    const { data: got } = await server.readMessage();
    assert.deepEqual(got, data, `message ${i}`);
    server.enableWriteCompression(i % 2 === 0);
    await server.writeMessage(MESSAGE_TYPE.Text, got);
  }
  await clientReading;
  assert.equal(clientReads.length, 8);
  assert.ok(pongs > 8, `${pongs} pongs`);
  await Promise.all([client.closeGracefully(), server.closeGracefully()]);
});

Deno.test("a compressed connection that idled past the inflater sweep still inflates", async () => {
  const { server, client } = compressedPair();
  await client.writeMessage(MESSAGE_TYPE.Text, "before");
  assert.equal(decoder.decode((await server.readMessage()).data), "before");
  // The sweep frees an inflater idle for one to two seconds.
  await new Promise((resolve) => setTimeout(resolve, 2_100));
  await client.writeMessage(MESSAGE_TYPE.Text, jsonText(3000));
  assert.equal(
    decoder.decode((await server.readMessage()).data),
    jsonText(3000),
  );
  await Promise.all([client.closeGracefully(), server.closeGracefully()]);
});

// ------------------------------------------------- Upgrader and Dialer

async function withServer(
  upgrader: Upgrader,
  run: (url: string, conns: Promise<Conn>) => Promise<void>,
): Promise<void> {
  const accepted = Promise.withResolvers<Conn>();
  const server = serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    async (request) => {
      const conn = await upgrader.upgrade(request);
      accepted.resolve(conn);
      return new Response(null);
    },
  );
  try {
    await run(`ws://127.0.0.1:${server.addr.port}/`, accepted.promise);
  } finally {
    await server.shutdown();
  }
}

/** Echoes until the peer closes. */
async function echo(conn: Conn): Promise<void> {
  try {
    for await (const { type, data } of conn) {
      await conn.writeMessage(type, data);
    }
  } finally {
    conn.close();
  }
}

Deno.test("Upgrader and Dialer negotiate permessage-deflate and echo compressed messages", async () => {
  await withServer(
    new Upgrader({ enableCompression: true }),
    async (url, accepted) => {
      const { conn, response } = await new Dialer({ enableCompression: true })
        .dial(url);
      assert.equal(
        response.headers.get("sec-websocket-extensions"),
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
      );
      const server = await accepted;
      assert.deepEqual(conn.compression, NEGOTIATED);
      assert.deepEqual(server.compression, NEGOTIATED);
      const echoing = echo(server);
      for (const size of [0, 300, 70_000]) {
        await conn.writeMessage(MESSAGE_TYPE.Text, jsonText(size));
        assert.equal(
          decoder.decode((await conn.readMessage()).data),
          jsonText(size),
        );
      }
      await conn.closeGracefully();
      await echoing;
    },
  );
});

Deno.test("Upgrader without enableCompression declines the offer, and the Dialer accepts that", async () => {
  await withServer(new Upgrader(), async (url, accepted) => {
    const { conn, response } = await new Dialer({ enableCompression: true })
      .dial(url);
    assert.equal(response.headers.get("sec-websocket-extensions"), null);
    assert.equal(conn.compression, undefined);
    const server = await accepted;
    assert.equal(server.compression, undefined);
    server.close();
    conn.close();
  });
});

Deno.test("Dialer without enableCompression sends no offer and gets no compression", async () => {
  await withServer(
    new Upgrader({ enableCompression: true }),
    async (url, accepted) => {
      const { conn, response } = await new Dialer().dial(url);
      assert.equal(response.headers.get("sec-websocket-extensions"), null);
      assert.equal((await accepted).compression, undefined);
      (await accepted).close();
      conn.close();
    },
  );
});

Deno.test("Upgrader and Dialer pass compressionThreshold to the Conn and check it", async () => {
  assert.throws(() => new Upgrader({ compressionThreshold: -1 }), RangeError);
  assert.throws(() => new Dialer({ compressionThreshold: 0.5 }), RangeError);
  await withServer(
    new Upgrader({ enableCompression: true, compressionThreshold: 0 }),
    async (url, accepted) => {
      // The client's socket records both directions, so the frames can be
      // checked as they were on the wire.
      const received: Uint8Array[] = [];
      const sent: Uint8Array[] = [];
      const { conn } = await new Dialer({
        enableCompression: true,
        compressionThreshold: 100_000,
        connect: async ({ hostname, port }) =>
          recording(await Deno.connect({ hostname, port }), received, sent),
      }).dial(url);
      const server = await accepted;
      await server.writeMessage(MESSAGE_TYPE.Text, "tiny");
      assert.equal(decoder.decode((await conn.readMessage()).data), "tiny");
      await conn.writeMessage(MESSAGE_TYPE.Text, jsonText(50_000));
      assert.equal((await server.readMessage()).data.length, 50_000);
      server.close();
      conn.close();
      // Threshold 0 on the server: even 4 bytes go compressed (RSV1).
      const fromServer = await firstFrameAfterHead(received);
      assert.equal(fromServer.rsv, 4);
      // Threshold 100,000 on the client: 50,000 bytes go as they are.
      const fromClient = await firstFrameAfterHead(sent);
      assert.equal(fromClient.rsv, 0);
      assert.equal(fromClient.payload.length, 50_000);
    },
  );
});

Deno.test("Dialer fails the handshake on an extension answer it cannot honour", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const answering = (async () => {
    const socket = await listener.accept();
    const buffer = new Uint8Array(4096);
    const n = (await socket.read(buffer))!;
    const key = /sec-websocket-key: *(\S+)/i.exec(
      decoder.decode(buffer.subarray(0, n)),
    )![1];
    const { computeAcceptKey } = await import("../_handshake.ts");
    await socket.write(utf8(
      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
        `Sec-WebSocket-Accept: ${await computeAcceptKey(key)}\r\n` +
        "Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
    ));
    socket.close();
  })();
  const error = await new Dialer({ enableCompression: true })
    .dial(`ws://127.0.0.1:${listener.addr.port}/`)
    .catch((e) => e);
  await answering;
  listener.close();
  assert.equal(error.name, "BadHandshakeError");
  assert.match(error.message, /server_no_context_takeover" is missing/);
  assert.equal(error.cause?.name, "ExtensionNegotiationError");
});

// --------------------------------------------------- interop with npm:ws

const INTEROP_SIZES = [0, 100, 2000, 70_000, 1 << 20];

for (
  const [name, perMessageDeflate] of [
    ["its defaults (context takeover unless told)", true],
    ["context takeover disabled", {
      serverNoContextTakeover: true,
      clientNoContextTakeover: true,
      threshold: 0,
    }],
    // ws inflates with the window it allowed: a wider one would fail it.
    ["10-bit windows both ways", {
      serverNoContextTakeover: true,
      clientNoContextTakeover: true,
      serverMaxWindowBits: 10,
      clientMaxWindowBits: 10,
      threshold: 0,
    }],
  ] as const
) {
  Deno.test(`ws client with ${name} echoes through our Upgrader, compressed both ways`, async () => {
    await withServer(
      new Upgrader({ enableCompression: true, compressionThreshold: 0 }),
      async (url, accepted) => {
        const ws = new NodeWebSocket(url, { perMessageDeflate });
        try {
          const answer = Promise.withResolvers<string>();
          ws.once(
            "upgrade",
            (response: { headers: Record<string, string> }) => {
              answer.resolve(response.headers["sec-websocket-extensions"]);
            },
          );
          await new Promise((resolve, reject) => {
            ws.once("open", resolve);
            ws.once("error", reject);
          });
          assert.equal(ws.extensions, "permessage-deflate");
          assert.match(
            await answer.promise,
            /^permessage-deflate; server_no_context_takeover; client_no_context_takeover/,
          );
          const server = await accepted;
          assert.ok(server.compression);
          const echoing = echo(server);
          const replies: { data: Uint8Array; binary: boolean }[] = [];
          const waiters: (() => void)[] = [];
          ws.on("message", (data: Uint8Array, binary: boolean) => {
            replies.push({ data: new Uint8Array(data), binary });
            waiters.shift()?.();
          });
          for (const size of INTEROP_SIZES) {
            for (const binary of [false, true]) {
              const payload = binary ? pattern(size) : utf8(jsonText(size));
              const got = new Promise<void>((resolve) => waiters.push(resolve));
              ws.send(payload, { binary });
              await got;
              const reply = replies.shift()!;
              assert.equal(reply.binary, binary);
              assert.deepEqual(reply.data, payload, `size ${size}`);
            }
          }
          const closed = new Promise((resolve) => ws.once("close", resolve));
          ws.close(1000);
          await closed;
          await echoing;
        } finally {
          ws.terminate();
        }
      },
    );
  });

  Deno.test(`our Dialer echoes through a ws server with ${name}, compressed both ways`, async () => {
    const wss = new WebSocketServer({
      host: "127.0.0.1",
      port: 0,
      perMessageDeflate,
    });
    await new Promise((resolve) => wss.once("listening", resolve));
    const extensions = Promise.withResolvers<string>();
    wss.on("headers", (lines: string[]) => {
      const line = lines.find((l) => /^sec-websocket-extensions:/i.test(l));
      extensions.resolve(line?.replace(/^[^:]*: */, "") ?? "");
    });
    wss.on("connection", (socket: NodeWebSocket) => {
      socket.on(
        "message",
        (data: Uint8Array, binary: boolean) => socket.send(data, { binary }),
      );
    });
    try {
      const port = (wss.address() as { port: number }).port;
      const { conn } = await new Dialer({
        enableCompression: true,
        compressionThreshold: 0,
      })
        .dial(`ws://127.0.0.1:${port}/`);
      assert.match(
        await extensions.promise,
        /^permessage-deflate; server_no_context_takeover/,
      );
      assert.equal(conn.compression?.serverNoContextTakeover, true);
      // Offered by our client, limited by the server when it is set to.
      assert.equal(
        conn.compression?.clientMaxWindowBits,
        typeof perMessageDeflate === "object" &&
          "clientMaxWindowBits" in perMessageDeflate
          ? perMessageDeflate.clientMaxWindowBits
          : 15,
      );
      for (const size of INTEROP_SIZES) {
        for (const type of [MESSAGE_TYPE.Text, MESSAGE_TYPE.Binary]) {
          const payload = type === MESSAGE_TYPE.Binary
            ? pattern(size)
            : utf8(jsonText(size));
          await conn.writeMessage(type, payload);
          const reply = await conn.readMessage();
          assert.equal(reply.type, type);
          assert.deepEqual(reply.data, payload, `size ${size}`);
        }
      }
      const writer = conn.nextWriter(MESSAGE_TYPE.Text);
      for (let i = 0; i < 10; i++) await writer.write(jsonText(5000));
      await writer.close();
      assert.equal((await conn.readMessage()).data.length, 50_000);
      await conn.closeGracefully(1000, "", { timeout: 2000 });
    } finally {
      await new Promise((resolve) => wss.close(resolve));
    }
  });
}

// ------------------------------------------- context takeover (opt in)

/** What `role` agreed to with a peer that offered or answered plain deflate. */
function takeoverParameters(role: Role): DeflateParameters {
  const takeover = { contextTakeover: true };
  return role === "server"
    ? negotiateDeflate("permessage-deflate", takeover)!.parameters
    : acceptDeflateResponse("permessage-deflate", takeover)!;
}

/** A peer's zlib stream with context takeover: each push is sync-flushed. */
function takeoverStream(stream: zlib.DeflateRaw | zlib.InflateRaw) {
  const chunks: Uint8Array[] = [];
  stream.on("data", (chunk: Uint8Array) => chunks.push(new Uint8Array(chunk)));
  return {
    push(bytes: Uint8Array): Promise<Uint8Array> {
      return new Promise((resolve, reject) => {
        stream.once("error", reject);
        stream.write(bytes);
        stream.flush(zlib.constants.Z_SYNC_FLUSH, () => {
          stream.off("error", reject);
          resolve(concat(...chunks.splice(0)));
        });
      });
    },
    close: () => stream.close(),
  };
}

/** A peer's compressor with context takeover. */
function takeoverDeflater() {
  const stream = takeoverStream(zlib.createDeflateRaw());
  return {
    /** The message's payload, its 00 00 ff ff tail removed (section 7.2.1). */
    async compress(text: string): Promise<Uint8Array> {
      const all = await stream.push(utf8(text));
      return all.subarray(0, all.length - TAIL.length);
    },
    close: stream.close,
  };
}

/** A peer's inflater with context takeover. */
function takeoverInflater() {
  const stream = takeoverStream(zlib.createInflateRaw());
  return {
    /** The text of a message's payload, with its tail put back (7.2.2). */
    async inflate(payload: Uint8Array): Promise<string> {
      return decoder.decode(await stream.push(concat(payload, TAIL)));
    },
    close: stream.close,
  };
}

Deno.test("negotiation with contextTakeover keeps the context in each direction not refused, and only then", () => {
  const takeover = { contextTakeover: true };
  const both = negotiateDeflate(
    "permessage-deflate; client_max_window_bits",
    takeover,
  )!;
  assert.equal(both.header, "permessage-deflate");
  assert.equal(both.parameters.serverNoContextTakeover, false);
  assert.equal(both.parameters.clientNoContextTakeover, false);
  // What the client refuses or promises is kept, in the answer too.
  for (const side of ["server", "client"] as const) {
    const refused = `${side}_no_context_takeover`;
    const answer = negotiateDeflate(
      `permessage-deflate; ${refused}`,
      takeover,
    )!;
    assert.equal(answer.header, `permessage-deflate; ${refused}`);
    assert.equal(
      answer.parameters.serverNoContextTakeover,
      side === "server",
    );
    assert.equal(
      answer.parameters.clientNoContextTakeover,
      side === "client",
    );
  }
  // Without the option, neither direction keeps it.
  const plain = negotiateDeflate("permessage-deflate")!.parameters;
  assert.equal(plain.serverNoContextTakeover, true);
  assert.equal(plain.clientNoContextTakeover, true);

  const client = acceptDeflateResponse("permessage-deflate", takeover)!;
  assert.equal(client.serverNoContextTakeover, false);
  assert.equal(client.clientNoContextTakeover, false);
  assert.equal(
    acceptDeflateResponse(
      "permessage-deflate; client_no_context_takeover",
      takeover,
    )!.clientNoContextTakeover,
    true,
  );
  // DEFLATE_OFFER had client_no_context_takeover: it binds the client even
  // when the answer leaves it out (RFC 7692 section 7.1.1.2).
  assert.equal(
    acceptDeflateResponse("permessage-deflate; server_no_context_takeover")!
      .clientNoContextTakeover,
    true,
  );
  assert.throws(
    () => acceptDeflateResponse("permessage-deflate"),
    /"server_no_context_takeover" is missing/,
  );
});

/** The next message the raw peer reads: RSV1 of its first frame, its payload. */
async function nextMessage(
  reader: FrameReader,
): Promise<{ rsv: number; payload: Uint8Array }> {
  const first = (await reader.next())!;
  const payloads = [first.payload];
  for (let frame = first; !frame.fin;) {
    frame = (await reader.next())!;
    payloads.push(frame.payload);
  }
  return { rsv: first.rsv, payload: concat(...payloads) };
}

for (const role of ROLES) {
  Deno.test(`${role}: compresses with context takeover, across an idle pause, a level change, a streamed and a prepared message`, async () => {
    const { conn, remote, reader } = compressedPeer(role, {
      compression: takeoverParameters(role),
    });
    const peer = takeoverInflater();
    const text = jsonText(5000);
    const sizes: number[] = [];
    const receive = async () => {
      const { rsv, payload } = await nextMessage(reader);
      assert.equal(rsv, 4, "the message was not compressed");
      sizes.push(payload.length);
      assert.equal(await peer.inflate(payload), text);
    };
    await conn.writeMessage(MESSAGE_TYPE.Text, text);
    await receive();
    await conn.writeMessage(MESSAGE_TYPE.Text, text);
    await receive();
    // Past the sweep (1-2 s idle): the zlib state is freed, the history kept.
    await new Promise((resolve) => setTimeout(resolve, 2500));
    await conn.writeMessage(MESSAGE_TYPE.Text, text);
    await receive();
    conn.setCompressionLevel(1);
    await conn.writeMessage(MESSAGE_TYPE.Text, text);
    await receive();
    const writer = conn.nextWriter(MESSAGE_TYPE.Text);
    await writer.write(text.slice(0, 2000));
    await writer.write(text.slice(2000));
    await writer.close();
    await receive();
    await conn.writePreparedMessage(
      new PreparedMessage(MESSAGE_TYPE.Text, text),
    );
    await receive();
    // Every later copy refers back to the first (on its own, each would
    // compress to as much as the first did).
    assert.ok(
      sizes.slice(1).every((size) => size < sizes[0] / 2),
      String(sizes),
    );
    peer.close();
    conn.close();
    remote.close();
  });
}

for (const role of ROLES) {
  Deno.test(`${role}: inflates a peer's context takeover, across an idle pause that frees the inflater`, async () => {
    const { conn, remote, send } = compressedPeer(role, {
      compression: takeoverParameters(role),
    });
    const peer = takeoverDeflater();
    const text = jsonText(5000);
    const sizes: number[] = [];
    for (let i = 0; i < 3; i++) {
      const payload = await peer.compress(text);
      sizes.push(payload.length);
      await send({ opcode: OP.text, rsv1: true, payload });
      assert.equal(decoder.decode((await conn.readMessage()).data), text);
      // Past the sweep (1-2 s idle): the zlib state is freed, the window kept.
      if (i === 1) await new Promise((resolve) => setTimeout(resolve, 2500));
    }
    // The later copies refer back to the first: a few bytes each.
    assert.ok(
      sizes[1] < sizes[0] / 10 && sizes[2] < sizes[0] / 10,
      String(sizes),
    );
    peer.close();
    conn.close();
    remote.close();
  });
}

Deno.test("with context takeover, a bomb is still refused with 1009 and corrupt data with 1007", async () => {
  const parameters = negotiateDeflate("permessage-deflate", {
    contextTakeover: true,
  })!.parameters;
  {
    const { conn, remote, send } = compressedPeer("server", {
      compression: parameters,
    });
    conn.setReadLimit(1 << 20);
    const bomb = deflate(new Uint8Array(64 << 20));
    assert.ok(bomb.length < 100_000, `${bomb.length} B`);
    await send({ opcode: OP.binary, rsv1: true, payload: bomb });
    const error = await conn.readMessage().catch((e) => e);
    assert.equal(error.code, 1009);
    conn.close();
    remote.close();
  }
  {
    const { conn, remote, send } = compressedPeer("server", {
      compression: parameters,
    });
    await send({
      opcode: OP.text,
      rsv1: true,
      payload: new Uint8Array([0xff, 0xff, 0xff, 0xff, 0x00]),
    });
    const error = await conn.readMessage().catch((e) => e);
    assert.equal(error.code, 1007);
    conn.close();
    remote.close();
  }
});

Deno.test("ws in its default mode (context takeover) echoes through an Upgrader and a Dialer with contextTakeover", async () => {
  const text = jsonText(3000);
  // ws client -> our server.
  await withServer(
    new Upgrader({ enableCompression: true, contextTakeover: true }),
    async (url, accepted) => {
      const ws = new NodeWebSocket(url, { perMessageDeflate: true });
      const echoing = accepted.then(echo);
      await new Promise((resolve) => ws.once("open", resolve));
      for (let i = 0; i < 5; i++) {
        // Past the sweep: both our zlib streams are rebuilt from history.
        if (i === 3) await new Promise((resolve) => setTimeout(resolve, 2500));
        const reply = new Promise<string>((resolve) =>
          ws.once(
            "message",
            (data: Uint8Array) => resolve(decoder.decode(data)),
          )
        );
        ws.send(text);
        assert.equal(await reply, text);
      }
      const { compression } = await accepted;
      assert.equal(compression?.clientNoContextTakeover, false);
      assert.equal(compression?.serverNoContextTakeover, false);
      const closed = new Promise((resolve) => ws.once("close", resolve));
      ws.close(1000);
      await closed;
      await echoing;
    },
  );
  // Our client -> ws server (which then compresses with takeover).
  const wss = new WebSocketServer({
    host: "127.0.0.1",
    port: 0,
    perMessageDeflate: true,
  });
  await new Promise((resolve) => wss.once("listening", resolve));
  wss.on(
    "connection",
    (socket: NodeWebSocket) =>
      socket.on(
        "message",
        (data: Uint8Array, binary: boolean) => socket.send(data, { binary }),
      ),
  );
  try {
    const port = (wss.address() as { port: number }).port;
    const { conn } = await new Dialer({
      enableCompression: true,
      contextTakeover: true,
    })
      .dial(`ws://127.0.0.1:${port}/`);
    assert.equal(conn.compression?.serverNoContextTakeover, false);
    assert.equal(conn.compression?.clientNoContextTakeover, false);
    for (let i = 0; i < 5; i++) {
      await conn.writeMessage(MESSAGE_TYPE.Text, text);
      assert.equal(decoder.decode((await conn.readMessage()).data), text);
    }
    await conn.closeGracefully(1000, "", { timeout: 2000 });
  } finally {
    await new Promise((resolve) => wss.close(resolve));
  }
});
