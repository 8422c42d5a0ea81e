// Streaming UTF-8 validation for text messages (RFC 6455 section 8.1): a
// message may be split into frames at any byte, even inside a character, and
// an invalid message must fail on the frame where its bytes become invalid,
// not at the end. TextDecoder with `fatal` rejects every invalid form
// (overlong, surrogates, above U+10FFFF, truncated) and with `stream` keeps an
// incomplete sequence for the next chunk; `ignoreBOM` keeps it from silently
// eating a leading BOM. Pure ASCII needs no decoder state, so it is skipped
// with a plain scan and the decoder only sees input from the first non-ASCII
// byte on.

/** Below this length a JavaScript scan for ASCII beats calling the decoder. */
const SCAN_LIMIT = 256;

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
      if (chunk.length <= SCAN_LIMIT) {
        while (from < chunk.length && chunk[from] < 0x80) from++;
        if (from === chunk.length) return true;
      }
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
