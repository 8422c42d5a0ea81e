// How a large message payload is assembled as it arrives (conn.ts): one
// buffer of the frame's size, allocated when the header arrives, against
// pieces that start at 64 KiB, double with what arrived and are joined at
// the end. Large ArrayBuffers are committed lazily (pages become resident
// when written), so the single buffer costs no more memory for a peer that
// claims a length it never sends.
// Run: deno bench -A bench/payload_bench.ts

const FIRST_PIECE = 64 * 1024;

/** Simulates reads of `read` bytes into one frame-sized buffer. */
function single(size: number, read: number): Uint8Array {
  const data = new Uint8Array(size);
  for (let at = 0; at < size; at += read) data[at] = 1;
  return data;
}

/** The same reads into doubling pieces joined at the end. */
function pieces(size: number, read: number): Uint8Array {
  const parts: Uint8Array[] = [];
  let total = 0;
  while (total < size) {
    const part = new Uint8Array(
      Math.min(size - total, Math.max(FIRST_PIECE, total)),
    );
    for (let at = 0; at < part.length; at += read) part[at] = 1;
    parts.push(part);
    total += part.length;
  }
  if (parts.length === 1) return parts[0];
  const data = new Uint8Array(total);
  let offset = 0;
  for (const part of parts) {
    data.set(part, offset);
    offset += part.length;
  }
  return data;
}

for (
  const [name, size] of [["256 KiB", 256 * 1024], ["1 MiB", 1 << 20]] as const
) {
  Deno.bench({
    name: `one frame-sized buffer ${name}`,
    group: name,
    baseline: true,
    fn() {
      single(size, 16 * 1024);
    },
  });
  Deno.bench({
    name: `doubling pieces joined ${name}`,
    group: name,
    fn() {
      pieces(size, 16 * 1024);
    },
  });
}
