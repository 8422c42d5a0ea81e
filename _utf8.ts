// Streaming UTF-8 validation for text messages (RFC 6455 section 8.1): a
// message may be split into frames at any byte, even inside a character, and
// an invalid message must fail on the frame where its bytes become invalid,
// not at the end. TextDecoder with `fatal` rejects every invalid form
// (overlong, surrogates, above U+10FFFF, truncated) and with `stream` keeps an
// incomplete sequence for the next chunk; `ignoreBOM` keeps it from silently
// eating a leading BOM. Pure ASCII needs no decoder state, so it is skipped
// with a plain scan and the decoder only sees input from the first non-ASCII
// byte on.

/** From this length the ASCII scan reads 32-bit words. */
const WORD_SCAN = 64;

/**
 * Returns the length of the ASCII prefix of `bytes`: a byte loop for short
 * input, then 32-bit words (4 bytes per test of the high bits), which is
 * several times faster than TextDecoder on ASCII, the common case for text.
 */
function asciiPrefix(bytes: Uint8Array): number {
  const n = bytes.length;
  let i = 0;
  if (n >= WORD_SCAN) {
    const head = (4 - (bytes.byteOffset & 3)) & 3;
    for (; i < head; i++) if (bytes[i] >= 0x80) return i;
    const count = (n - i) >>> 2;
    const words = new Int32Array(bytes.buffer, bytes.byteOffset + i, count);
    let j = 0;
    for (; j < count; j++) if ((words[j] & 0x80808080) !== 0) break;
    i += j << 2;
  }
  while (i < n && bytes[i] < 0x80) i++;
  return i;
}

/** Validates one text message at a time, chunk by chunk. */
export class Utf8Validator {
  #decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
  /** True once the decoder holds state for the current message. */
  #decoding = false;

  /**
   * Checks the next chunk of the current message; `final` marks its last
   * chunk (then a truncated sequence is invalid too). Returns false when
   * the bytes so far cannot be valid UTF-8; the validator is then reset.
   */
  push(chunk: Uint8Array, final: boolean): boolean {
    let from = 0;
    if (!this.#decoding) {
      from = asciiPrefix(chunk);
      if (from === chunk.length) return true;
      this.#decoding = true;
    }
    try {
      this.#decoder.decode(from === 0 ? chunk : chunk.subarray(from), {
        stream: !final,
      });
    } catch {
      this.reset();
      return false;
    }
    if (final) this.#decoding = false;
    return true;
  }

  /** Forgets any partial sequence, ready for a new message. */
  reset(): void {
    if (!this.#decoding) return;
    this.#decoding = false;
    this.#decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
  }
}
