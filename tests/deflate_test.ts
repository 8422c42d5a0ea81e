import assert from "node:assert/strict";
import zlib from "node:zlib";
import { NodeWebSocket, WebSocketServer } from "./_ws.ts";
import { computeAcceptKey } from "../_handshake.ts";
import { encodeHeader, mask, OPCODE, parseHeader } from "../frame.ts";
import {
  acceptDeflateResponse,
  DEFLATE_OFFER,
  type DeflateParameters,
  ExtensionNegotiationError,
  negotiateDeflate,
} from "../deflate.ts";
import {
  compressMessage,
  DEFAULT_COMPRESSION_THRESHOLD,
  deflateSettings,
  InflateError,
  MessageDeflater,
  MessageInflater,
  STREAM_DEFLATE,
} from "../_deflate_stream.ts";
import { concat, concatAll, utf8 } from "./_frames.ts";
import { jsonText, runJsonScript, writeAll } from "./_helpers.ts";

const ANSWER =
  "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
const TAIL = new Uint8Array([0x00, 0x00, 0xff, 0xff]);
const encoder = new TextEncoder();

/** {@linkcode jsonText} as UTF-8 bytes. */
function jsonBytes(size: number): Uint8Array {
  return utf8(jsonText(size));
}

/** Incompressible bytes of any size (getRandomValues caps at 64 KiB). */
function randomBytes(size: number): Uint8Array {
  const result = new Uint8Array(size);
  for (let i = 0; i < size; i += 65536) {
    crypto.getRandomValues(result.subarray(i, Math.min(size, i + 65536)));
  }
  return result;
}

/** What a zlib peer (ws, Python, browsers) sends: sync flush, tail removed. */
function zlibCompress(data: Uint8Array): Uint8Array {
  const out = zlib.deflateRawSync(data, {
    finishFlush: zlib.constants.Z_SYNC_FLUSH,
  });
  assert.deepEqual(out.subarray(-4), Buffer.from(TAIL));
  return new Uint8Array(out.subarray(0, -4));
}

/** How a zlib peer inflates our payload (RFC 7692 section 7.2.2). */
function zlibInflate(payload: Uint8Array): Uint8Array {
  return new Uint8Array(
    zlib.inflateRawSync(concat(payload, TAIL), {
      finishFlush: zlib.constants.Z_SYNC_FLUSH,
    }),
  );
}

async function inflateAll(
  inflater: MessageInflater,
  pieces: Uint8Array[],
  limit = Infinity,
): Promise<Uint8Array> {
  const out: Uint8Array[] = [];
  for (let i = 0; i < pieces.length; i++) {
    const final = i === pieces.length - 1;
    out.push(...await inflater.inflate(pieces[i], { final, limit }));
  }
  return concatAll(out);
}

async function inflateOnce(
  payload: Uint8Array,
  limit = Infinity,
): Promise<Uint8Array> {
  const inflater = new MessageInflater();
  try {
    return await inflateAll(inflater, [payload], limit);
  } finally {
    inflater.close();
  }
}

/** Splits data at random points into pieces of 0 to `max` bytes. */
function randomSplit(data: Uint8Array, max: number): Uint8Array[] {
  const pieces: Uint8Array[] = [];
  let offset = 0;
  while (offset < data.length) {
    const size = Math.floor(Math.random() * (max + 1));
    pieces.push(data.subarray(offset, offset + size));
    offset += size;
  }
  pieces.push(data.subarray(offset));
  return pieces;
}

// ---------------------------------------------------------------------------
// Server negotiation

Deno.test("negotiateDeflate() accepts the plain offer and asks for no context takeover", () => {
  const result = negotiateDeflate("permessage-deflate");
  assert.deepEqual(result, {
    header: ANSWER,
    parameters: {
      serverNoContextTakeover: true,
      clientNoContextTakeover: true,
      serverMaxWindowBits: 15,
      clientMaxWindowBits: 15,
    },
  });
});

Deno.test("negotiateDeflate() returns undefined without an offer", () => {
  assert.equal(negotiateDeflate(null), undefined);
  assert.equal(negotiateDeflate(""), undefined);
  assert.equal(negotiateDeflate(" , ,"), undefined);
  assert.equal(negotiateDeflate("x-webkit-deflate-frame"), undefined);
});

Deno.test("negotiateDeflate() accepts every combination of valid parameters", () => {
  const options = [
    ["server_no_context_takeover"],
    ["client_no_context_takeover"],
    [
      "client_max_window_bits",
      "client_max_window_bits=8",
      "client_max_window_bits=15",
    ],
    ["server_max_window_bits=15", "server_max_window_bits=9"],
  ];
  // Every subset of the four parameters, with every value of each.
  const combinations: string[][] = [[]];
  for (const choices of options) {
    for (const combination of [...combinations]) {
      for (const choice of choices) combinations.push([...combination, choice]);
    }
  }
  assert.equal(combinations.length, 2 * 2 * 4 * 3);
  for (const combination of combinations) {
    const offer = ["permessage-deflate", ...combination].join("; ");
    const result = negotiateDeflate(offer);
    assert.ok(result, offer);
    const server = combination.find((p) => p.startsWith("server_max"));
    const bits = server === undefined ? 15 : Number(server.split("=")[1]);
    assert.equal(
      result.header,
      server === undefined ? ANSWER : `${ANSWER}; ${server}`,
      offer,
    );
    assert.equal(result.parameters.serverMaxWindowBits, bits, offer);
    assert.equal(result.parameters.clientMaxWindowBits, 15, offer);
  }
});

Deno.test("negotiateDeflate() echoes a server_max_window_bits below 15; the server compresses within it, or not at all at 8", () => {
  const result = negotiateDeflate(
    "permessage-deflate; server_max_window_bits=10",
  );
  assert.equal(result?.header, `${ANSWER}; server_max_window_bits=10`);
  assert.equal(result?.parameters.serverMaxWindowBits, 10);
  assert.deepEqual(deflateSettings(result!.parameters, "server", undefined), {
    level: undefined,
    windowBits: 10,
    contextTakeover: false,
  });
  assert.deepEqual(deflateSettings(result!.parameters, "client", 1), {
    level: 1,
    windowBits: 15,
    contextTakeover: false,
  });
  const eight = negotiateDeflate(
    "permessage-deflate; server_max_window_bits=8",
  );
  assert.equal(
    deflateSettings(eight!.parameters, "server", undefined),
    undefined,
  );
});

Deno.test("negotiateDeflate() reads quoted values, any case and any whitespace", () => {
  const offers = [
    'permessage-deflate; server_max_window_bits="12"',
    "PerMessage-Deflate;Server_Max_Window_Bits=12",
    "permessage-deflate \t;\t server_max_window_bits \t= \t12 \t",
    '  permessage-deflate ; server_max_window_bits = "1\\2" ',
    "permessage-deflate; server_max_window_bits=012",
  ];
  for (const offer of offers) {
    assert.equal(
      negotiateDeflate(offer)?.header,
      `${ANSWER}; server_max_window_bits=12`,
      offer,
    );
  }
});

Deno.test("negotiateDeflate() declines an invalid offer and takes the next one", () => {
  const invalid = [
    "permessage-deflate; foo",
    "permessage-deflate; foo=1",
    "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
    "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
    "permessage-deflate; server_no_context_takeover=1",
    'permessage-deflate; client_no_context_takeover=""',
    "permessage-deflate; server_max_window_bits",
    "permessage-deflate; server_max_window_bits=7",
    "permessage-deflate; server_max_window_bits=16",
    "permessage-deflate; server_max_window_bits=1e1",
    "permessage-deflate; server_max_window_bits=-9",
    'permessage-deflate; server_max_window_bits="1 0"',
    'permessage-deflate; server_max_window_bits=""',
    "permessage-deflate; client_max_window_bits=0",
    "permessage-deflate; client_max_window_bits=16",
  ];
  for (const offer of invalid) {
    assert.equal(negotiateDeflate(offer), undefined, offer);
    const fallback = `${offer}, permessage-deflate; server_max_window_bits=11`;
    assert.equal(
      negotiateDeflate(fallback)?.header,
      `${ANSWER}; server_max_window_bits=11`,
      fallback,
    );
  }
});

Deno.test("negotiateDeflate() skips malformed elements without losing the others", () => {
  const malformed = [
    "permessage-deflate;",
    "permessage-deflate;;server_no_context_takeover",
    "permessage-deflate; =1",
    "permessage-deflate; a=",
    "permessage-deflate; a=b=c",
    "permessage-deflate server_no_context_takeover",
    "permessage-deflate; a=@",
    '"permessage-deflate"',
    "; permessage-deflate",
    'permessage-deflate; a="b,permessage-deflate; server_max_window_bits=9"',
  ];
  for (const element of malformed) {
    assert.equal(negotiateDeflate(element), undefined, element);
    const header = `${element}, permessage-deflate; server_max_window_bits=13`;
    assert.equal(
      negotiateDeflate(header)?.header,
      `${ANSWER}; server_max_window_bits=13`,
      header,
    );
  }
  // An unterminated quote swallows the rest of the header.
  assert.equal(
    negotiateDeflate('permessage-deflate; a="b, permessage-deflate'),
    undefined,
  );
});

Deno.test("negotiateDeflate() ignores other extensions before and after the offer", () => {
  const header =
    'x-foo; bar="a, b", x-webkit-deflate-frame;no_context_takeover,permessage-deflate;client_max_window_bits, permessage-deflate';
  assert.equal(negotiateDeflate(header)?.header, ANSWER);
});

// ---------------------------------------------------------------------------
// Client offer and answer

Deno.test("DEFLATE_OFFER is accepted by negotiateDeflate() and its answer by acceptDeflateResponse()", () => {
  assert.equal(DEFLATE_OFFER, `${ANSWER}; client_max_window_bits`);
  const negotiated = negotiateDeflate(DEFLATE_OFFER);
  assert.ok(negotiated);
  assert.deepEqual(
    acceptDeflateResponse(negotiated.header),
    negotiated.parameters,
  );
});

Deno.test("acceptDeflateResponse() returns undefined when the server declined", () => {
  assert.equal(acceptDeflateResponse(null), undefined);
  assert.equal(acceptDeflateResponse(""), undefined);
  assert.equal(acceptDeflateResponse(null, { offered: false }), undefined);
});

Deno.test("acceptDeflateResponse() accepts every answer it can honour", () => {
  const cases: [string, Partial<DeflateParameters>][] = [
    // DEFLATE_OFFER's client_no_context_takeover binds the client even when
    // the answer leaves it out (RFC 7692 section 7.1.1.2).
    ["permessage-deflate; server_no_context_takeover", {
      clientNoContextTakeover: true,
    }],
    [ANSWER, { clientNoContextTakeover: true }],
    [`${ANSWER}; server_max_window_bits=9`, { serverMaxWindowBits: 9 }],
    [
      'PERMESSAGE-DEFLATE ;SERVER_NO_CONTEXT_TAKEOVER; server_max_window_bits="15"',
      {
        serverMaxWindowBits: 15,
      },
    ],
    // The client offered client_max_window_bits: any limit 8-15 is kept.
    [`${ANSWER}; client_max_window_bits=9`, { clientMaxWindowBits: 9 }],
    [`${ANSWER}; client_max_window_bits=15`, { clientMaxWindowBits: 15 }],
    [
      "permessage-deflate; server_no_context_takeover; client_max_window_bits=12; server_max_window_bits=10",
      { clientMaxWindowBits: 12, serverMaxWindowBits: 10 },
    ],
  ];
  for (const [header, expected] of cases) {
    const parameters = acceptDeflateResponse(header);
    assert.ok(parameters, header);
    assert.equal(parameters.serverNoContextTakeover, true);
    assert.equal(
      parameters.clientMaxWindowBits,
      expected.clientMaxWindowBits ?? 15,
    );
    for (const [key, value] of Object.entries(expected)) {
      assert.equal(parameters[key as keyof DeflateParameters], value, header);
    }
    assert.ok(deflateSettings(parameters, "client", undefined));
  }
});

Deno.test("acceptDeflateResponse() refuses answers it did not ask for or cannot honour", () => {
  const cases: [string, RegExp][] = [
    ["permessage-deflate", /"server_no_context_takeover" is missing/],
    [
      `${ANSWER}; client_max_window_bits`,
      /"client_max_window_bits" needs a value in an answer/,
    ],
    [`${ANSWER}; client_max_window_bits=7`, /outside 8 to 15/],
    [`${ANSWER}; foo`, /"foo" is unknown/],
    [`${ANSWER}; server_no_context_takeover`, /appears more than once/],
    [`${ANSWER}; server_max_window_bits=16`, /needs a value from 8 to 15/],
    [`${ANSWER}; server_max_window_bits`, /needs a value from 8 to 15/],
    [`${ANSWER}=1`, /takes no value/],
    [`${ANSWER}, ${ANSWER}`, /appears more than once/],
    [`x-foo, ${ANSWER}`, /extension "x-foo" was not offered/],
    [`${ANSWER}, x-foo`, /extension "x-foo" was not offered/],
    [`${ANSWER};`, /malformed/],
    [`${ANSWER}; a="b`, /malformed/],
  ];
  for (const [header, message] of cases) {
    assert.throws(() => acceptDeflateResponse(header), (error: unknown) => {
      assert.ok(error instanceof ExtensionNegotiationError, header);
      assert.equal(error.name, "ExtensionNegotiationError");
      assert.match(
        error.message,
        /^Cannot accept the server's Sec-WebSocket-Extensions/,
      );
      assert.match(error.message, message, header);
      assert.doesNotMatch(error.message, /\.$/);
      return true;
    });
  }
});

Deno.test("acceptDeflateResponse() refuses any extension when none was offered", () => {
  assert.throws(
    () => acceptDeflateResponse(ANSWER, { offered: false }),
    /extension "permessage-deflate" was not offered/,
  );
});

// ---------------------------------------------------------------------------
// The Deno behaviours the recipe relies on

async function rawWrites(
  stream: CompressionStream | DecompressionStream,
  inputs: Uint8Array[],
  close: boolean,
): Promise<Uint8Array[]> {
  const writer = stream.writable.getWriter();
  const reader = stream.readable.getReader();
  const outputs: Uint8Array[] = [];
  for (const input of inputs) {
    const read = reader.read();
    read.catch(() => {}); // the write below reports the same error
    await writer.write(input as Uint8Array<ArrayBuffer>);
    // Exactly one chunk per write, already enqueued when the write resolves.
    const result = await Promise.race([read, Promise.resolve("pending")]);
    assert.notEqual(result, "pending", "a write yielded no chunk");
    outputs.push((result as ReadableStreamReadResult<Uint8Array>).value!);
  }
  if (close) {
    const rest = reader.read();
    await writer.close();
    for (let r = await rest; !r.done; r = await reader.read()) {
      outputs.push(r.value);
    }
  } else {
    await reader.cancel();
  }
  return outputs;
}

Deno.test("Deno pin: CompressionStream sync-flushes every write and close() appends an empty final block", async () => {
  const outputs = await rawWrites(
    new CompressionStream("deflate-raw"),
    [jsonBytes(1000), jsonBytes(5000), new Uint8Array(0)],
    true,
  );
  assert.equal(outputs.length, 4);
  for (const output of outputs.slice(0, 3)) {
    assert.deepEqual(output.subarray(-4), TAIL);
  }
  assert.deepEqual(outputs[2], new Uint8Array([0x00, 0x00, 0x00, 0xff, 0xff]));
  assert.deepEqual(outputs[3], new Uint8Array([0x03, 0x00]));
});

Deno.test("Deno pin: CompressionStream loses the marker when one write yields more than 32 KiB", async () => {
  // If this starts failing, Deno fixed the bug; the 16 KiB slicing can stay.
  const [output] = await rawWrites(
    new CompressionStream("deflate-raw"),
    [randomBytes(40_000)],
    false,
  );
  assert.notDeepEqual(output.subarray(-4), TAIL);
  const [sliced] = await rawWrites(
    new CompressionStream("deflate-raw"),
    [randomBytes(16 * 1024)],
    false,
  );
  assert.deepEqual(sliced.subarray(-4), TAIL);
});

Deno.test("Deno pin: DecompressionStream refuses bytes after a final block and corrupt data", async () => {
  const final = new Uint8Array(zlib.deflateRawSync(encoder.encode("Hello")));
  await assert.rejects(
    rawWrites(new DecompressionStream("deflate-raw"), [final, TAIL], false),
    { name: "TypeError", message: "failed to write whole buffer" },
  );
  await assert.rejects(
    rawWrites(new DecompressionStream("deflate-raw"), [
      new Uint8Array([0xff, 0xff, 0xff, 0xff]),
    ], false),
    { name: "TypeError", message: "corrupt deflate stream" },
  );
});

Deno.test("Deno pin: one DecompressionStream write yields its whole output as one chunk, even 8 MiB", async () => {
  // MessageInflater takes one chunk per write (see StreamDriver).
  const zeros = new Uint8Array(zlib.deflateRawSync(new Uint8Array(8 << 20), {
    finishFlush: zlib.constants.Z_SYNC_FLUSH,
  }));
  const [output] = await rawWrites(
    new DecompressionStream("deflate-raw"),
    [zeros],
    false,
  );
  assert.equal(output.length, 8 << 20);
});

Deno.test("Deno pin: DecompressionStream close() does not report a truncated stream", async () => {
  const payload = zlibCompress(jsonBytes(2000));
  const outputs = await rawWrites(
    new DecompressionStream("deflate-raw"),
    [payload.subarray(0, payload.length - 10)],
    true,
  );
  assert.ok(concatAll(outputs).length < 2000);
});

// ---------------------------------------------------------------------------
// Compressing

Deno.test("compressMessage() output inflates with zlib for sizes 0 B to 4 MiB", async () => {
  const sizes = [0, 1, 125, 126, 2048, 16384, 16385, 65535, 65536, 1 << 20];
  for (const size of sizes) {
    for (const data of [jsonBytes(size), randomBytes(size)]) {
      const payload = await compressMessage(data, STREAM_DEFLATE);
      assert.ok(payload, `${size}`);
      assert.notDeepEqual(payload.subarray(-4), TAIL);
      assert.deepEqual(zlibInflate(payload), data, `${size}`);
    }
  }
  const big = jsonBytes(4 << 20);
  const payload = await compressMessage(big, STREAM_DEFLATE);
  assert.ok(payload && payload.length < big.length / 4);
  assert.deepEqual(zlibInflate(payload), big);
});

Deno.test("compressMessage() compresses an empty message to a single 00 (RFC 7692 section 7.2.3.6)", async () => {
  assert.deepEqual(
    await compressMessage(new Uint8Array(0), STREAM_DEFLATE),
    new Uint8Array([0]),
  );
});

Deno.test("compressMessage() shrinks JSON above the default threshold", async () => {
  const data = jsonBytes(DEFAULT_COMPRESSION_THRESHOLD);
  const payload = await compressMessage(data, STREAM_DEFLATE);
  assert.ok(payload && payload.length < data.length * 0.75);
});

Deno.test("MessageDeflater pieces form one message whatever the split", async () => {
  const data = concat(jsonBytes(70_000), randomBytes(20_000), jsonBytes(3));
  for (const max of [1, 1000, 40_000]) {
    const deflater = new MessageDeflater(STREAM_DEFLATE);
    const payloads: Uint8Array[] = [];
    for (const piece of randomSplit(data, max)) {
      const payload = await deflater.write(piece);
      assert.ok(payload);
      payloads.push(payload);
    }
    deflater.close();
    const payload = concatAll(payloads);
    assert.deepEqual(zlibInflate(payload), data);
    assert.deepEqual(await inflateOnce(payload), data);
  }
});

Deno.test("MessageDeflater returns undefined once its stream is closed", async () => {
  const deflater = new MessageDeflater(STREAM_DEFLATE);
  deflater.close();
  assert.equal(await deflater.write(jsonBytes(100)), undefined);
  assert.equal(await deflater.write(jsonBytes(100)), undefined);
});

// ---------------------------------------------------------------------------
// Inflating

Deno.test("MessageInflater inflates the RFC 7692 section 7.2.3 examples", async () => {
  const hello = encoder.encode("Hello");
  const examples = [
    [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], // 7.2.3.1
    [0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00], // 7.2.3.3
    [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00], // 7.2.3.4, BFINAL set
    [
      0xf2,
      0x48,
      0x05,
      0x00,
      0x00,
      0x00,
      0xff,
      0xff,
      0xca,
      0xc9,
      0xc9,
      0x07,
      0x00,
    ], // 7.2.3.5
  ];
  const inflater = new MessageInflater();
  for (const bytes of examples) {
    const payload = new Uint8Array(bytes);
    assert.deepEqual(await inflateOnce(payload), hello);
    // The same on one long-lived inflater, and byte by byte.
    assert.deepEqual(await inflateAll(inflater, [payload]), hello);
    assert.deepEqual(
      await inflateAll(inflater, randomSplit(payload, 1)),
      hello,
    );
  }
  assert.deepEqual(
    await inflateAll(inflater, [new Uint8Array([0x00])]),
    new Uint8Array(0),
  );
  inflater.close();
});

Deno.test("MessageInflater inflates zlib's messages of every size, whole and in pieces, one after another", async () => {
  const inflater = new MessageInflater();
  const sizes = [0, 1, 125, 126, 2048, 65535, 65536, 300_000];
  for (const size of sizes) {
    for (const data of [jsonBytes(size), randomBytes(size)]) {
      const payload = zlibCompress(data);
      assert.deepEqual(await inflateAll(inflater, [payload]), data);
      assert.deepEqual(
        await inflateAll(inflater, randomSplit(payload, 5000)),
        data,
      );
      assert.deepEqual(
        await inflateAll(inflater, [payload], data.length),
        data,
        "a message of exactly the limit is accepted",
      );
    }
  }
  inflater.close();
});

Deno.test("MessageInflater inflates messages that end in a final block and keeps going", async () => {
  const inflater = new MessageInflater();
  for (const size of [0, 5, 2048, 100_000]) {
    const data = jsonBytes(size);
    // zlib's Z_FINISH output: the last block has BFINAL set, no tail.
    const final = new Uint8Array(zlib.deflateRawSync(data));
    assert.deepEqual(await inflateAll(inflater, [final]), data);
    assert.deepEqual(
      await inflateAll(inflater, randomSplit(final, 3000)),
      data,
    );
    // Followed by the empty stored block RFC 7692 section 7.2.1 adds.
    const padded = concat(final, new Uint8Array([0x00]));
    assert.deepEqual(await inflateAll(inflater, [padded]), data);
    assert.deepEqual(
      await inflateAll(inflater, randomSplit(padded, 3000)),
      data,
    );
    // A normal message still works after each of them.
    assert.deepEqual(await inflateAll(inflater, [zlibCompress(data)]), data);
  }
  inflater.close();
});

Deno.test("MessageInflater inflates what compressMessage() produced", async () => {
  const inflater = new MessageInflater();
  for (const size of [0, 100, 2048, 65536, 1 << 20]) {
    const data = jsonBytes(size);
    const payload = await compressMessage(data, STREAM_DEFLATE);
    assert.ok(payload);
    assert.deepEqual(await inflateAll(inflater, [payload]), data);
  }
  inflater.close();
});

async function assertInflateError(
  promise: Promise<unknown>,
  code: 1007 | 1009,
  message: RegExp,
): Promise<void> {
  await assert.rejects(promise, (error: unknown) => {
    assert.ok(error instanceof InflateError);
    assert.equal(error.name, "InflateError");
    assert.equal(error.code, code);
    assert.match(error.message, /^Cannot inflate message: /);
    assert.match(error.message, message);
    return true;
  });
}

Deno.test("MessageInflater rejects corrupt data with code 1007", async () => {
  const corrupt = [
    new Uint8Array([0xff, 0xff, 0xff, 0xff]),
    new Uint8Array(0), // an empty message must be sent as 00
    new Uint8Array([0x07]), // reserved block type 11
  ];
  for (const payload of corrupt) {
    await assertInflateError(inflateOnce(payload), 1007, /not a valid DEFLATE/);
  }
});

Deno.test("MessageInflater rejects a truncated message with code 1007", async () => {
  const payload = zlibCompress(jsonBytes(5000));
  for (const cut of [1, 2, 7, 100]) {
    const truncated = payload.subarray(0, payload.length - cut);
    const inflater = new MessageInflater();
    await assert.rejects(
      inflateAll(inflater, [truncated]),
      (error: unknown) => {
        assert.ok(error instanceof InflateError);
        assert.equal(error.code, 1007);
        return true;
      },
    );
    inflater.close();
  }
});

Deno.test("MessageInflater rejects data after a final block with code 1007", async () => {
  const final = new Uint8Array(zlib.deflateRawSync(jsonBytes(3000)));
  const payload = concat(final, new Uint8Array([0x00, 0x00, 0x00]));
  await assertInflateError(
    inflateOnce(payload),
    1007,
    /data follows the final DEFLATE block/,
  );
  const inflater = new MessageInflater();
  await assertInflateError(
    inflateAll(inflater, [final, new Uint8Array([0x00, 0x00, 0x00])]),
    1007,
    /data follows the final DEFLATE block/,
  );
  inflater.close();
});

Deno.test("MessageInflater rejects a message one byte over the limit with code 1009", async () => {
  for (const size of [100, 5000, 200_000]) {
    const payload = zlibCompress(jsonBytes(size));
    await assertInflateError(
      inflateOnce(payload, size - 1),
      1009,
      new RegExp(`exceeds the read limit of ${size - 1} bytes`),
    );
    const inflater = new MessageInflater();
    await assertInflateError(
      inflateAll(inflater, randomSplit(payload, 1000), size - 1),
      1009,
      /exceeds the read limit/,
    );
    inflater.close();
  }
});

Deno.test("MessageInflater is reusable after close()", async () => {
  const inflater = new MessageInflater();
  const data = jsonBytes(3000);
  const payload = zlibCompress(data);
  await inflater.inflate(payload.subarray(0, 100), {
    final: false,
    limit: Infinity,
  });
  inflater.close();
  assert.deepEqual(await inflateAll(inflater, [payload]), data);
  inflater.close();
});

Deno.test("MessageInflater closed during an inflate rejects only that call", async () => {
  const inflater = new MessageInflater();
  const payload = zlibCompress(randomBytes(200_000));
  const pending = inflater.inflate(payload, { final: true, limit: Infinity });
  inflater.close();
  await assertInflateError(pending, 1007, /closed during the call/);
  // Still usable for the next message.
  const data = jsonBytes(1000);
  assert.deepEqual(await inflateAll(inflater, [zlibCompress(data)]), data);
  inflater.close();
});

Deno.test("MessageInflater accepts a final block whose trailing 00 comes in its own frame before an empty final one", async () => {
  const data = jsonBytes(3000);
  const final = new Uint8Array(zlib.deflateRawSync(data));
  const inflater = new MessageInflater();
  const pieces = [final, new Uint8Array([0x00]), new Uint8Array(0)];
  assert.deepEqual(await inflateAll(inflater, pieces), data);
  assert.deepEqual(await inflateAll(inflater, [zlibCompress(data)]), data);
  inflater.close();
});

/**
 * A raw deflate bomb: `mebibytes` MiB of zeros in ~1 KiB per MiB. Each MiB is
 * compressed on its own and keeps its sync-flush marker, so the pieces chain
 * into one valid stream; the last marker is stripped as for any message.
 */
function zeroBomb(mebibytes: number): Uint8Array {
  const piece = new Uint8Array(
    zlib.deflateRawSync(new Uint8Array(1 << 20), {
      finishFlush: zlib.constants.Z_SYNC_FLUSH,
    }),
  );
  const bomb = concatAll(Array.from({ length: mebibytes }, () => piece));
  return bomb.subarray(0, bomb.length - TAIL.length);
}

Deno.test("MessageInflater refuses a 256 MiB bomb of zeros with 1009 without inflating it", async () => {
  const bomb = zeroBomb(256);
  assert.ok(bomb.length < 300 * 1024);
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeFile(`${dir}/bomb.bin`, bomb);
    // A child process, so its peak RSS (VmHWM) is the inflater's alone.
    const script = `
      import { MessageInflater } from ${
      JSON.stringify(new URL("../_deflate_stream.ts", import.meta.url).href)
    };
      const peak = () => Number(/VmHWM:\\s+(\\d+)/.exec(Deno.readTextFileSync("/proc/self/status"))[1]) * 1024;
      const bomb = Deno.readFileSync(Deno.args[0]);
      const results = [];
      for (const pieceSize of [bomb.length, 65536]) {
        const inflater = new MessageInflater();
        // Warm up: JIT and the stream's own buffers are not the bomb's.
        await inflater.inflate(new Uint8Array([0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]), { final: true, limit: 1 << 20 });
        const before = peak();
        let code = 0, inflated = 0;
        try {
          for (let offset = 0; offset < bomb.length; offset += pieceSize) {
            const end = Math.min(bomb.length, offset + pieceSize);
            const chunks = await inflater.inflate(bomb.subarray(offset, end), { final: end === bomb.length, limit: 1 << 20 });
            for (const chunk of chunks) inflated += chunk.length;
          }
        } catch (error) {
          code = error.code;
        }
        inflater.close();
        results.push({ code, inflated, growth: peak() - before });
      }
      console.log(JSON.stringify(results));
    `;
    await Deno.writeTextFile(`${dir}/bomb.ts`, script);
    const results = await runJsonScript<
      { code: number; inflated: number; growth: number }[]
    >(`${dir}/bomb.ts`, [`${dir}/bomb.bin`], ["--no-check"]);
    for (const result of results) {
      assert.equal(result.code, 1009);
      assert.ok(result.inflated <= 1 << 20, `inflated ${result.inflated}`);
      // Beyond the 1 MiB limit, RSS is the allocator's and GC's (4-9 MiB
      // seen, by machine); 32 MiB is far below the bomb's 256 MiB.
      assert.ok(
        result.growth < 32 * 1024 * 1024,
        `peak RSS grew by ${result.growth} bytes`,
      );
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---------------------------------------------------------------------------
// Byte-level interop with the `ws` package: our negotiation and engine on a
// raw socket (Conn is not involved), ws's client and server on the other end.

/** Reads HTTP heads and WebSocket frames from a raw connection. */
class RawReader {
  #conn: Deno.Conn;
  #buffer: Uint8Array = new Uint8Array(0);

  constructor(conn: Deno.Conn) {
    this.#conn = conn;
  }

  async #fill(): Promise<void> {
    const chunk = new Uint8Array(65536);
    const n = await this.#conn.read(chunk);
    if (n === null) {
      throw new Error("Cannot read: the peer closed the connection");
    }
    this.#buffer = concat(this.#buffer, chunk.subarray(0, n));
  }

  async head(): Promise<{ status: string; headers: Headers }> {
    let end: number;
    while (
      (end = new TextDecoder().decode(this.#buffer).indexOf("\r\n\r\n")) < 0
    ) {
      await this.#fill();
    }
    const lines = new TextDecoder().decode(this.#buffer.subarray(0, end))
      .split("\r\n");
    this.#buffer = this.#buffer.subarray(end + 4);
    const headers = new Headers();
    for (const line of lines.slice(1)) {
      const colon = line.indexOf(":");
      headers.append(line.slice(0, colon), line.slice(colon + 1).trim());
    }
    return { status: lines[0], headers };
  }

  async frame(): Promise<
    { opcode: number; rsv1: boolean; payload: Uint8Array }
  > {
    for (;;) {
      const header = parseHeader(this.#buffer);
      if (
        header !== null &&
        this.#buffer.length >= header.headerLength + header.length
      ) {
        const end = header.headerLength + header.length;
        const payload = this.#buffer.slice(header.headerLength, end);
        if (header.masked) mask(payload, header.maskKey);
        this.#buffer = this.#buffer.subarray(end);
        assert.ok(header.fin, "ws sends these messages unfragmented");
        return { opcode: header.opcode, rsv1: header.rsv1, payload };
      }
      await this.#fill();
    }
  }
}

function encodeFrame(
  opcode: number,
  payload: Uint8Array,
  options: { rsv1?: boolean; masked: boolean },
): Uint8Array {
  const maskKey = options.masked
    ? crypto.getRandomValues(new Uint8Array(4))
    : undefined;
  const frame = new Uint8Array(14 + payload.length);
  const size = encodeHeader(frame, {
    fin: true,
    rsv1: options.rsv1,
    opcode,
    length: payload.length,
    maskKey,
  });
  frame.set(payload, size);
  if (maskKey) mask(frame.subarray(size, size + payload.length), maskKey);
  return frame.subarray(0, size + payload.length);
}

// Twice the same 2 KiB (the second copy would be a few bytes with context
// takeover, so it proves each side compressed it on its own), then a message
// under ws's 1024-byte threshold, which goes uncompressed.
const INTEROP_MESSAGES = [jsonBytes(2048), jsonBytes(2048), jsonBytes(100)];

/**
 * Checks the compressed sizes of INTEROP_MESSAGES as received (-1: sent
 * uncompressed): the repeat is as large as the first, so the peer honoured
 * the no context takeover we negotiated.
 */
function assertCompressedAlone(sizes: number[]): void {
  assert.equal(sizes.length, 3);
  assert.ok(sizes[0] > 0 && sizes[0] < 2048 / 2, `${sizes}`);
  assert.equal(sizes[1], sizes[0]);
  assert.equal(sizes[2], -1);
}

/** Ships one message: compressed with RSV1 when the peer may inflate it. */
async function sendMessage(
  conn: Deno.Conn,
  data: Uint8Array,
  masked: boolean,
): Promise<void> {
  const payload = data.length >= DEFAULT_COMPRESSION_THRESHOLD
    ? await compressMessage(data, STREAM_DEFLATE)
    : undefined;
  await writeAll(
    conn,
    encodeFrame(OPCODE.Text, payload ?? data, {
      rsv1: payload !== undefined,
      masked,
    }),
  );
}

for (
  const [label, options] of [
    ["defaults", true],
    ["context takeover disabled", {
      serverNoContextTakeover: true,
      clientNoContextTakeover: true,
    }],
  ] as const
) {
  Deno.test(`negotiateDeflate() and the engine interoperate with a ws client (${label})`, async () => {
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const server = (async () => {
      const conn = await listener.accept();
      try {
        const reader = new RawReader(conn);
        const { headers: request } = await reader.head();
        const negotiated = negotiateDeflate(
          request.get("sec-websocket-extensions"),
        );
        assert.ok(negotiated, "ws offered permessage-deflate");
        const accept = await computeAcceptKey(
          request.get("sec-websocket-key")!,
        );
        await writeAll(
          conn,
          encoder.encode(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n" +
              `Connection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n` +
              `Sec-WebSocket-Extensions: ${negotiated.header}\r\n\r\n`,
          ),
        );
        const inflater = new MessageInflater();
        const sizes: number[] = [];
        for (;;) {
          const { opcode, rsv1, payload } = await reader.frame();
          if (opcode === OPCODE.Close) {
            await writeAll(
              conn,
              encodeFrame(OPCODE.Close, payload, { masked: false }),
            );
            break;
          }
          sizes.push(rsv1 ? payload.length : -1);
          const data = rsv1
            ? await inflateAll(inflater, [payload], 1 << 20)
            : payload;
          await sendMessage(conn, data, false);
        }
        inflater.close();
        return sizes;
      } finally {
        conn.close();
      }
    })();

    const { port } = listener.addr as Deno.NetAddr;
    const client = new NodeWebSocket(`ws://127.0.0.1:${port}/`, {
      perMessageDeflate: options,
    });
    const received: Uint8Array[] = [];
    const closed = new Promise<void>((resolve, reject) => {
      client.on("error", reject);
      client.on("open", () => {
        for (const message of INTEROP_MESSAGES) {
          client.send(new TextDecoder().decode(message));
        }
      });
      client.on("message", (data: Buffer) => {
        received.push(new Uint8Array(data));
        if (received.length === INTEROP_MESSAGES.length) client.close();
      });
      client.on("close", () => resolve());
    });
    const [sizes] = await Promise.all([server, closed]).finally(() =>
      listener.close()
    );
    assertCompressedAlone(sizes);
    assert.deepEqual(received, INTEROP_MESSAGES);
  });

  Deno.test(`acceptDeflateResponse() and the engine interoperate with a ws server (${label})`, async () => {
    const wss = new WebSocketServer({
      host: "127.0.0.1",
      port: 0,
      perMessageDeflate: options,
    });
    const sizes: number[] = [];
    wss.on("connection", (socket: NodeWebSocket) => {
      socket.on("message", (data: Buffer, isBinary: boolean) => {
        socket.send(data, { binary: isBinary });
      });
    });
    await new Promise<void>((resolve) => wss.once("listening", resolve));
    const { port } = wss.address() as { port: number };
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    try {
      const reader = new RawReader(conn);
      await writeAll(
        conn,
        encoder.encode(
          "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n" +
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n" +
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" +
            `Sec-WebSocket-Extensions: ${DEFLATE_OFFER}\r\n\r\n`,
        ),
      );
      const { status, headers: response } = await reader.head();
      assert.match(status, / 101 /);
      const parameters = acceptDeflateResponse(
        response.get("sec-websocket-extensions"),
      );
      assert.ok(parameters, "ws accepted the offer");
      assert.ok(deflateSettings(parameters, "client", undefined));
      const inflater = new MessageInflater();
      const received: Uint8Array[] = [];
      for (const message of INTEROP_MESSAGES) {
        await sendMessage(conn, message, true);
        const { rsv1, payload } = await reader.frame();
        sizes.push(rsv1 ? payload.length : -1);
        received.push(
          rsv1 ? await inflateAll(inflater, [payload], 1 << 20) : payload,
        );
      }
      inflater.close();
      assert.deepEqual(received, INTEROP_MESSAGES);
      assertCompressedAlone(sizes);
      await writeAll(
        conn,
        encodeFrame(OPCODE.Close, new Uint8Array([0x03, 0xe8]), {
          masked: true,
        }),
      );
      assert.equal((await reader.frame()).opcode, OPCODE.Close);
    } finally {
      conn.close();
      await new Promise((resolve) => wss.close(resolve));
    }
  });
}
