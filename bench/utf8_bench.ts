// UTF-8 validation of text messages (_utf8.ts): ASCII is scanned a word at a
// time and only input from the first non-ASCII byte on reaches the fatal
// TextDecoder, against decoding everything with that decoder.
// Run: deno bench -A bench/utf8_bench.ts

import { Utf8Validator } from "../_utf8.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

for (
  const [name, text] of [
    ["32 B ASCII", "a".repeat(32)],
    ["16 KiB ASCII", "a".repeat(16 * 1024)],
    ["16 KiB mixed", "héllo ✓ 😀 ".repeat(16 * 1024 / 16)],
  ] as const
) {
  const bytes = encoder.encode(text);
  const validator = new Utf8Validator();
  Deno.bench({
    name: `Utf8Validator ${name}`,
    group: name,
    baseline: true,
    fn() {
      if (!validator.push(bytes, true)) throw new Error("invalid");
    },
  });
  Deno.bench({
    name: `fatal TextDecoder ${name}`,
    group: name,
    fn() {
      decoder.decode(bytes);
    },
  });
}
