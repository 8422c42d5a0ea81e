// Run by chaos_test.ts with --v8-flags=--expose-gc: how much memory a server
// Conn keeps alive while it assembles a message cut into one-byte fragments.
// Prints one JSON line {"count", "retained", "ok"}: `retained` is the heap and
// external memory still reachable (after forcing GC) once every fragment but
// the last has been read; `ok` says whether the message then arrived intact.

import { Conn } from "../../conn.ts";
import { createPipe } from "../../_pipe.ts";
import { frame } from "../_frames.ts";

const count = Number(Deno.args[0] ?? 100_000);
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

const [local, remote] = createPipe();
const conn = new Conn(local, { role: "server" });
conn.setReadLimit(1024 * 1024);
const size = 7; // 2 header bytes, 4 mask bytes, 1 payload byte
const wire = new Uint8Array(count * size);
for (let i = 0; i < count; i++) {
  wire.set(
    frame({
      opcode: i === 0 ? 2 : 0,
      fin: i === count - 1,
      payload: new Uint8Array([i & 0xff]),
      mask: true,
    }),
    i * size,
  );
}
const last = wire.length - size;
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
const ok = data.length === count && data.every((b, i) => b === (i & 0xff));
conn.close();
remote.close();
console.log(JSON.stringify({ count, retained: during - before, ok }));
