// Masking kernels (RFC 6455 section 5.3): XOR each payload byte with the
// masking key byte at (position mod 4). Masking and unmasking are the same
// operation. Short payloads use an unrolled byte loop, because creating a
// 32-bit view costs more than it saves below ~128 bytes; longer payloads use
// one 32-bit XOR per 4 aligned bytes. Neither path allocates except the one
// word view, and both resume at any key offset so a payload split across
// reads can be masked piece by piece.

/** Whether the platform stores words little-endian (it decides word order). */
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Payload length from which the word loop beats the byte loop. */
const WORD_THRESHOLD = 128;

/**
 * XORs `data` in place with `key` (4 bytes), starting at key position
 * `offset` (0-3), and returns the key position for the byte after `data`.
 */
export function maskInPlace(
  data: Uint8Array,
  key: Uint8Array,
  offset: number,
): number {
  const n = data.length;
  const start = offset & 3;
  if (n < WORD_THRESHOLD) {
    const k0 = key[start];
    const k1 = key[(start + 1) & 3];
    const k2 = key[(start + 2) & 3];
    const k3 = key[(start + 3) & 3];
    let i = 0;
    for (const end = n - 3; i < end; i += 4) {
      data[i] ^= k0;
      data[i + 1] ^= k1;
      data[i + 2] ^= k2;
      data[i + 3] ^= k3;
    }
    if (i < n) {
      data[i] ^= k0;
      if (i + 1 < n) data[i + 1] ^= k1;
      if (i + 2 < n) data[i + 2] ^= k2;
    }
    return (start + n) & 3;
  }
  // Bytes up to the first 4-byte boundary of the underlying buffer, since a
  // 32-bit view must be aligned.
  let i = (4 - (data.byteOffset & 3)) & 3;
  for (let j = 0; j < i; j++) data[j] ^= key[(start + j) & 3];
  const s = (start + i) & 3;
  const b0 = key[s];
  const b1 = key[(s + 1) & 3];
  const b2 = key[(s + 2) & 3];
  const b3 = key[(s + 3) & 3];
  const word = LITTLE_ENDIAN
    ? b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)
    : (b0 << 24) | (b1 << 16) | (b2 << 8) | b3;
  const count = (n - i) >>> 2;
  const words = new Int32Array(data.buffer, data.byteOffset + i, count);
  for (let j = 0; j < count; j++) words[j] ^= word;
  i += count << 2;
  for (; i < n; i++) data[i] ^= key[(start + i) & 3];
  return (start + n) & 3;
}
