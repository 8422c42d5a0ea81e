// permessage-deflate per-message cost: `deno bench -A bench/deflate_bench.ts`.
//
// What the engine in _deflate_stream.ts is measured against: the obvious
// pipeThrough recipe and a writer/reader drive that closes the stream, for
// compression; a fresh DecompressionStream per message, for inflation.
// node:zlib (synchronous, not allowed in the library) shows the floor.
//
// Deno 2.9.6, AMD EPYC, 2 cores shared with other jobs (so +-20%), average
// us per message:
//
//                                 100 B   2 KiB   64 KiB
//   compressMessage()              14.9*   20.1*   710
//   writer/reader + close()        18.4    23.6    623  (one 64 KiB write:
//                                                       unsafe past 32 KiB out)
//   pipeThrough + Response         35.3    48.3    721
//   node:zlib deflateRawSync       15.5    19.2    618
//   MessageInflater, reused         4.8     8.7     50
//   MessageInflater, fresh each     9.3    15.4     58
//   fresh stream, pipeThrough      68.4    33.3     84
//   node:zlib inflateRawSync        7.2    10.4     63
//   (* p75: the averages, 24.6 and 25.4, carry GC pauses of up to 18 ms)
//
// Stream set-up is most of the small-message cost: ~12 us for a fresh
// CompressionStream, ~5 us for a fresh DecompressionStream, which is why the
// inflater keeps its stream between messages. Ending the compressor with
// writer.close() is 5-10 us cheaper than reader.cancel() (which errors the
// writable side). A 2 KiB JSON echo costs ~25-30 us of deflate work, ~35k
// messages/s on one core. Below ~256 bytes the set-up buys a few dozen bytes
// at most: DEFAULT_COMPRESSION_THRESHOLD is 256.

import zlib from "node:zlib";
import {
  compressMessage,
  type DeflateSettings,
  MessageInflater,
  STREAM_DEFLATE,
} from "../_deflate_stream.ts";
import { ContextDeflater } from "../_deflate_context.ts";

function jsonText(size: number): Uint8Array {
  let text = "";
  for (let i = 0; text.length < size; i++) {
    text += JSON.stringify({ id: i, user: `user${i % 97}`, on: i % 3 === 0 });
  }
  return new TextEncoder().encode(text.slice(0, size));
}

async function compressClosing(data: Uint8Array): Promise<Uint8Array> {
  const stream = new CompressionStream("deflate-raw");
  const writer = stream.writable.getWriter();
  const reader = stream.readable.getReader();
  writer.write(data as Uint8Array<ArrayBuffer>).catch(() => {});
  writer.close().catch(() => {});
  const chunks: Uint8Array[] = [];
  for (let r = await reader.read(); !r.done; r = await reader.read()) {
    chunks.push(r.value);
  }
  return chunks[0];
}

async function viaPipe(
  data: Uint8Array,
  stream: CompressionStream | DecompressionStream,
): Promise<Uint8Array> {
  const body = new Blob([data as Uint8Array<ArrayBuffer>]).stream()
    .pipeThrough(stream);
  return new Uint8Array(await new Response(body).arrayBuffer());
}

const SIZES = [
  ["32 B", 32],
  ["100 B", 100],
  ["2 KiB", 2048],
  ["64 KiB", 65536],
  ["1 MiB", 1 << 20],
] as const;
/** The node:zlib engine, as `compressionLevel` and small windows select it. */
const ZLIB_ENGINES = [
  ["level 1", { level: 1, windowBits: 15, contextTakeover: false }],
  ["level 6", { level: 6, windowBits: 15, contextTakeover: false }],
  [
    "level 1, 10-bit window",
    { level: 1, windowBits: 10, contextTakeover: false },
  ],
] as const;
/** Context takeover at level 1: one stream for every message of a bench. */
const TAKEOVER: DeflateSettings = {
  level: 1,
  windowBits: 15,
  contextTakeover: true,
};
const TAIL = new Uint8Array([0x00, 0x00, 0xff, 0xff]);
const inflater = new MessageInflater();
const options = { final: true, limit: Infinity };

// Warm up the JIT first, or whichever bench runs first pays for it.
for (let i = 0; i < 3000; i++) {
  const payload = await compressMessage(
    jsonText(100 + (i % 3000)),
    STREAM_DEFLATE,
  );
  await inflater.inflate(payload!, options);
}

for (const [label, size] of SIZES) {
  const data = jsonText(size);
  const payload = (await compressMessage(data, STREAM_DEFLATE))!;
  const withTail = new Uint8Array([...payload, ...TAIL]);
  const group = `compress ${label}`;
  Deno.bench("compressMessage()", { group, baseline: true }, async () => {
    await compressMessage(data, STREAM_DEFLATE);
  });
  Deno.bench("writer/reader + close()", { group }, async () => {
    await compressClosing(data);
  });
  Deno.bench("pipeThrough + Response", { group }, async () => {
    await viaPipe(data, new CompressionStream("deflate-raw"));
  });
  for (const [name, settings] of ZLIB_ENGINES) {
    Deno.bench(`compressMessage(), ${name}`, { group }, async () => {
      await compressMessage(data, settings);
    });
  }
  // The same message each time: after the first, a reference to it.
  const context = new ContextDeflater(TAKEOVER);
  Deno.bench(
    "compressMessage(), context takeover, level 1",
    { group },
    async () => {
      await compressMessage(data, TAKEOVER, context);
    },
  );
  Deno.bench("node:zlib deflateRawSync", { group }, () => {
    zlib.deflateRawSync(data, { finishFlush: zlib.constants.Z_SYNC_FLUSH });
  });

  const inflateGroup = `inflate ${label}`;
  Deno.bench(
    "MessageInflater, reused",
    { group: inflateGroup, baseline: true },
    async () => {
      await inflater.inflate(payload, options);
    },
  );
  Deno.bench(
    "MessageInflater, fresh each",
    { group: inflateGroup },
    async () => {
      const fresh = new MessageInflater();
      await fresh.inflate(payload, options);
      fresh.close();
    },
  );
  Deno.bench(
    "fresh stream, pipeThrough",
    { group: inflateGroup },
    async () => {
      await viaPipe(withTail, new DecompressionStream("deflate-raw"));
    },
  );
  Deno.bench("node:zlib inflateRawSync", { group: inflateGroup }, () => {
    zlib.inflateRawSync(withTail, { finishFlush: zlib.constants.Z_SYNC_FLUSH });
  });
}
