// The read engine on its own: frames go in as bytes, messages and close
// reasons come out, and what it asks of the rest of the connection (replies,
// failing the connection, closing) is recorded through its hooks. No Conn,
// no writer, no socket.

import assert from "node:assert/strict";
import { constants, deflateRawSync } from "node:zlib";
import { CloseError, ProtocolError, ReadLimitError } from "../frame.ts";
import { type Message, Reader, type ReaderHooks } from "../_reader.ts";
import {
  closePayload,
  concat,
  frame,
  OP,
  type RawFrame,
  utf8,
} from "./_frames.ts";

/** What the reader asked of its connection. */
interface Asked {
  controls: [number, string][];
  closes: [number, string][];
  failures: number[];
  closed: number;
}

/**
 * A reader of a server (it expects masked frames) fed `bytes` in pieces of
 * at most `piece` bytes, then EOF.
 */
function readerOf(
  bytes: Uint8Array,
  options: { piece?: number; compression?: boolean; client?: boolean } = {},
): { reader: Reader; asked: Asked } {
  const piece = options.piece ?? Infinity;
  let offset = 0;
  const transport = {
    read(buffer: Uint8Array): Promise<number | null> {
      if (offset === bytes.length) return Promise.resolve(null);
      const n = Math.min(buffer.length, piece, bytes.length - offset);
      buffer.set(bytes.subarray(offset, offset + n));
      offset += n;
      return Promise.resolve(n);
    },
  };
  const asked: Asked = { controls: [], closes: [], failures: [], closed: 0 };
  const decode = (data: Uint8Array) => new TextDecoder().decode(data);
  const hooks: ReaderHooks = {
    control: (opcode, payload) => {
      asked.controls.push([opcode, decode(payload)]);
    },
    closeReceived: (code, reason) => {
      asked.closes.push([code, reason]);
    },
    fail: (error) => {
      asked.failures.push(error.code);
    },
    close: () => {
      asked.closed++;
    },
    burst: () => {},
    uncork: () => {},
  };
  const reader = new Reader(transport, {
    client: options.client ?? false,
    bufferSize: 4096,
    compression: options.compression ?? false,
    contextTakeover: false,
  }, hooks);
  return { reader, asked };
}

/** Masked as a client sends it. */
function masked(spec: RawFrame): Uint8Array {
  return frame({ ...spec, mask: true });
}

/** A message's type and a copy of its bytes. */
type Received = Pick<Message, "type" | "data">;

/** Reads messages until the read side fails; returns both. */
async function readAll(
  reader: Reader,
): Promise<{ messages: Received[]; error: unknown }> {
  const messages: Received[] = [];
  while (true) {
    try {
      const { type, data } = await reader.readMessage(undefined);
      messages.push({ type, data: data.slice() });
    } catch (error) {
      return { messages, error };
    }
  }
}

const text = (message: Received) => new TextDecoder().decode(message.data);

/** RFC 7692 section 7.2.1: DEFLATE with the final 00 00 ff ff removed. */
function compressed(data: string): Uint8Array {
  const out = deflateRawSync(utf8(data), {
    finishFlush: constants.Z_SYNC_FLUSH,
  });
  return new Uint8Array(out.subarray(0, out.length - 4));
}

const PIECES = [Infinity, 7, 1];

for (const piece of PIECES) {
  Deno.test(`reader: whole, fragmented and interleaved messages in pieces of ${piece}`, async () => {
    const bytes = concat(
      masked({ opcode: OP.text, payload: "hello" }),
      masked({ opcode: OP.binary, payload: new Uint8Array([1, 2, 3]) }),
      masked({ opcode: OP.text, fin: false, payload: "frag" }),
      masked({ opcode: OP.ping, payload: "p" }),
      masked({ opcode: OP.cont, fin: false, payload: "men" }),
      masked({ opcode: OP.cont, payload: "ted" }),
      masked({ opcode: OP.text, payload: "" }),
      masked({ opcode: OP.close, payload: closePayload(1000, "bye") }),
    );
    const { reader, asked } = readerOf(bytes, { piece });
    const { messages, error } = await readAll(reader);
    assert.deepEqual(messages.map(text), [
      "hello",
      "\x01\x02\x03",
      "fragmented",
      "",
    ]);
    assert.deepEqual(messages.map((m) => m.type), [1, 2, 1, 1]);
    assert.deepEqual(asked.controls, [[OP.ping, "p"]]);
    assert.deepEqual(asked.closes, [[1000, "bye"]]);
    assert.ok(error instanceof CloseError);
    assert.equal(error.code, 1000);
    assert.equal(error.text, "bye");
    assert.equal(reader.closeReceived, true);
    assert.equal(reader.error, error);
    assert.deepEqual(asked.failures, []);
  });

  Deno.test(`reader: a compressed message in two fragments is inflated, in pieces of ${piece}`, async () => {
    const message = "compress me, ".repeat(50);
    const deflated = compressed(message);
    const half = deflated.length >> 1;
    const bytes = concat(
      masked({
        opcode: OP.text,
        rsv1: true,
        fin: false,
        payload: deflated.subarray(0, half),
      }),
      masked({ opcode: OP.cont, payload: deflated.subarray(half) }),
      masked({ opcode: OP.binary, payload: "plain" }),
    );
    const { reader } = readerOf(bytes, { piece, compression: true });
    const { messages, error } = await readAll(reader);
    assert.deepEqual(messages.map(text), [message, "plain"]);
    assert.ok(error instanceof CloseError);
    assert.equal(error.code, 1006); // EOF after the last message
  });
}

Deno.test("reader: nextReader() streams a fragmented message as it arrives", async () => {
  const bytes = concat(
    masked({
      opcode: OP.binary,
      fin: false,
      payload: new Uint8Array(10).fill(1),
    }),
    masked({ opcode: OP.cont, payload: new Uint8Array(5).fill(2) }),
  );
  const { reader } = readerOf(bytes, { piece: 3 });
  const { type, reader: stream } = await reader.nextReader(undefined);
  assert.equal(type, OP.binary);
  const received: number[] = [];
  const buffer = new Uint8Array(4);
  for (let n; (n = await stream.read(buffer)) !== null;) {
    received.push(...buffer.subarray(0, n));
  }
  assert.deepEqual(received, [
    ...new Array(10).fill(1),
    ...new Array(5).fill(2),
  ]);
});

/** Frames that fail the connection, and the close code each must get. */
const REFUSED: [
  string,
  Uint8Array,
  number,
  { limit?: number; compression?: boolean; client?: boolean }?,
][] = [
  [
    "invalid UTF-8 in a whole text message",
    masked({ opcode: OP.text, payload: new Uint8Array([0x68, 0xff]) }),
    1007,
  ],
  [
    "invalid UTF-8 split across fragments",
    concat(
      masked({
        opcode: OP.text,
        fin: false,
        payload: new Uint8Array([0xe2, 0x82]),
      }),
      masked({ opcode: OP.cont, payload: new Uint8Array([0x41]) }),
    ),
    1007,
  ],
  [
    "a message over the read limit",
    masked({ opcode: OP.binary, payload: new Uint8Array(11) }),
    1009,
    { limit: 10 },
  ],
  [
    "fragments adding up past the read limit",
    concat(
      masked({ opcode: OP.binary, fin: false, payload: new Uint8Array(6) }),
      masked({ opcode: OP.cont, payload: new Uint8Array(6) }),
    ),
    1009,
    { limit: 10 },
  ],
  [
    "a compressed message inflating past the read limit",
    masked({
      opcode: OP.binary,
      rsv1: true,
      payload: compressed("a".repeat(100_000)),
    }),
    1009,
    { limit: 1000, compression: true },
  ],
  [
    "compressed bytes that are not DEFLATE",
    masked({
      opcode: OP.binary,
      rsv1: true,
      payload: new Uint8Array([0xff, 0xff, 0xff]),
    }),
    1007,
    { compression: true },
  ],
  [
    "RSV1 without the extension",
    masked({ opcode: OP.text, rsv1: true, payload: "x" }),
    1002,
  ],
  ["RSV2", masked({ opcode: OP.text, rsv2: true, payload: "x" }), 1002],
  ["a fragmented ping", masked({ opcode: OP.ping, fin: false }), 1002],
  [
    "a ping of 126 bytes",
    masked({ opcode: OP.ping, payload: new Uint8Array(126) }),
    1002,
  ],
  ["a reserved opcode", masked({ opcode: 3 }), 1002],
  [
    "a continuation with no message open",
    masked({ opcode: OP.cont, payload: "x" }),
    1002,
  ],
  [
    "a new message inside a fragmented one",
    concat(
      masked({ opcode: OP.text, fin: false, payload: "a" }),
      masked({ opcode: OP.text, payload: "b" }),
    ),
    1002,
  ],
  [
    "an unmasked frame from a client",
    frame({ opcode: OP.text, payload: "x" }),
    1002,
  ],
  [
    "a masked frame from a server",
    masked({ opcode: OP.text, payload: "x" }),
    1002,
    { client: true },
  ],
  [
    "a close frame with a 1-byte payload",
    masked({ opcode: OP.close, payload: new Uint8Array([3]) }),
    1002,
  ],
  [
    "a close frame with code 1005",
    masked({ opcode: OP.close, payload: closePayload(1005) }),
    1002,
  ],
];

for (const [name, bytes, code, options] of REFUSED) {
  Deno.test(`reader: ${name} fails the connection with ${code}`, async () => {
    const { reader, asked } = readerOf(bytes, options);
    if (options?.limit !== undefined) reader.setLimit(options.limit);
    const { messages, error } = await readAll(reader);
    assert.deepEqual(messages, []);
    assert.ok(error instanceof ProtocolError, String(error));
    assert.equal(error.code, code);
    if (code === 1009) assert.ok(error instanceof ReadLimitError);
    assert.deepEqual(asked.failures, [code]);
    assert.deepEqual(asked.closes, []);
    // The read side stays failed with the same error.
    await assert.rejects(reader.readMessage(undefined), (e) => e === error);
  });
}

Deno.test("reader: EOF in the middle of a frame is an abnormal closure (1006)", async () => {
  const whole = masked({ opcode: OP.binary, payload: new Uint8Array(100) });
  const { reader, asked } = readerOf(whole.subarray(0, 50));
  const { messages, error } = await readAll(reader);
  assert.deepEqual(messages, []);
  assert.ok(error instanceof CloseError);
  assert.equal(error.code, 1006);
  assert.equal(asked.closed, 1);
  assert.deepEqual(asked.failures, []);
});

Deno.test("reader: close(error) makes every later read reject with it", async () => {
  const { reader } = readerOf(masked({ opcode: OP.text, payload: "unread" }));
  const error = new Error("closed");
  reader.close(error);
  await assert.rejects(reader.readMessage(undefined), (e) => e === error);
});
