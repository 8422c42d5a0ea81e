// Run by chaos_test.ts with --v8-flags=--expose-gc: how much memory a server
// Conn keeps alive while it assembles a message cut into one-byte fragments.
// Arguments: the payload size, then "deflate" to send it as a compressed
// message (permessage-deflate, each fragment one byte of DEFLATE data).
// Prints one JSON line {"count", "retained", "ok"}: `count` fragments,
// `retained` the heap and external memory still reachable (after forcing GC)
// once every fragment but the last has been read; `ok` says whether the
// message then arrived intact.

import { Conn, type ConnOptions } from "../../conn.ts";
import type { DeflateParameters } from "../../deflate.ts";
import { constants as zlib, deflateRawSync } from "node:zlib";
import { createPipe } from "../../_pipe.ts";
import { frame } from "../_frames.ts";

const size = Number(Deno.args[0] ?? 100_000);
const deflate = Deno.args[1] === "deflate";
const gc = (globalThis as { gc?: () => void }).gc;
if (gc === undefined) throw new Error("Run with --v8-flags=--expose-gc");

async function used(): Promise<number> {
  for (let i = 0; i < 4; i++) {
    gc!();
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  const { heapUsed, external } = Deno.memoryUsage();
  return heapUsed + external;
}

// Random bytes, so that the compressed form is about as long.
const content = new Uint8Array(size);
for (let i = 0; i < size; i += 65536) {
  crypto.getRandomValues(content.subarray(i, i + 65536));
}
let payload = content;
if (deflate) {
  const out = deflateRawSync(content, { finishFlush: zlib.Z_SYNC_FLUSH });
  payload = new Uint8Array(out.subarray(0, out.length - 4));
}
const count = payload.length;

const [local, remote] = createPipe();
// `compression` is typed loosely: conn.ts declares it once deflate is
// wired in (ARCHITECTURE.md, "Conn construction").
const options: ConnOptions & { compression?: DeflateParameters } = {
  role: "server",
};
if (deflate) {
  options.compression = {
    serverNoContextTakeover: true,
    clientNoContextTakeover: true,
    serverMaxWindowBits: 15,
    clientMaxWindowBits: 15,
  };
}
const conn = new Conn(local, options);
conn.setReadLimit(1024 * 1024);
const frameSize = 7; // 2 header bytes, 4 mask bytes, 1 payload byte
const wire = new Uint8Array(count * frameSize);
for (let i = 0; i < count; i++) {
  wire.set(
    frame({
      opcode: i === 0 ? 2 : 0,
      rsv1: deflate && i === 0,
      fin: i === count - 1,
      payload: payload.subarray(i, i + 1),
      mask: true,
    }),
    i * frameSize,
  );
}
const last = wire.length - frameSize;
const before = await used();
const reading = conn.readMessage();
// Written in pieces, as a socket delivers them.
for (let offset = 0; offset < last; offset += 64 * 1024) {
  await remote.write(wire.slice(offset, Math.min(offset + 64 * 1024, last)));
}
while (local.buffered > 0) {
  await new Promise((resolve) => setTimeout(resolve, 5));
}
const during = await used();
await remote.write(wire.slice(last));
const { data } = await reading;
const ok = data.length === size && data.every((b, i) => b === content[i]);
conn.close();
remote.close();
console.log(JSON.stringify({ count, retained: during - before, ok }));
