// Test helpers for raw RFC 6455 frames: build any frame, legal or not, and
// read frames back off a raw transport. They are written independently of
// frame.ts so that tests do not check the codec against itself.

/** What a raw frame holds; anything may be set to an illegal value. */
export interface RawFrame {
  /** FIN bit (default true). */
  fin?: boolean;
  rsv1?: boolean;
  rsv2?: boolean;
  rsv3?: boolean;
  /** The 4-bit opcode. */
  opcode: number;
  /** The payload (a string is sent as UTF-8; default empty). */
  payload?: Uint8Array | string;
  /**
   * Mask the payload: `true` with a fixed key, or the 4-byte key to use.
   * Default false.
   */
  mask?: boolean | Uint8Array;
  /** Length to declare instead of the payload's (for hostile lengths). */
  declaredLength?: number | bigint;
  /** Force the 16-bit (126) or 64-bit (127) length form. */
  lengthForm?: 126 | 127;
}

/** The opcodes, for readable tests. */
export const OP = {
  cont: 0,
  text: 1,
  binary: 2,
  close: 8,
  ping: 9,
  pong: 10,
} as const;

/**
 * Payload sizes at every edge of the three length forms of RFC 6455 section
 * 5.2 (7-bit, 16-bit, 64-bit), and 1 MiB.
 */
export const LENGTH_EDGES: readonly number[] = [
  0,
  1,
  2,
  124,
  125,
  126,
  127,
  128,
  129,
  65534,
  65535,
  65536,
  1 << 20,
];

/**
 * Close codes a close frame may carry (RFC 6455 section 7.4): the defined
 * ones and the edges of the registered and private ranges.
 */
export const VALID_CLOSE_CODES: readonly number[] = [
  1000,
  1001,
  1002,
  1003,
  1007,
  1008,
  1009,
  1010,
  1011,
  1012,
  1013,
  1014,
  3000,
  4999,
];

/**
 * Close codes a close frame must not carry: reserved (1004), meant for APIs
 * only (1005, 1006, 1015), unassigned, or out of range.
 */
export const INVALID_CLOSE_CODES: readonly number[] = [
  0,
  999,
  1004,
  1005,
  1006,
  1015,
  1016,
  2000,
  2999,
  5000,
  65535,
];

const FIXED_KEY = new Uint8Array([0x12, 0x34, 0x56, 0x78]);

/** UTF-8 of a string. */
export function utf8(text: string): Uint8Array {
  return new TextEncoder().encode(text);
}

/** Joins byte arrays. */
export function concat(...parts: Uint8Array[]): Uint8Array {
  return concatAll(parts);
}

/** Joins a list of byte arrays, however long (a spread has a size limit). */
export function concatAll(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

/** Encodes one frame, byte by byte as RFC 6455 section 5.2 draws it. */
export function frame(spec: RawFrame): Uint8Array {
  const payload = typeof spec.payload === "string"
    ? utf8(spec.payload)
    : spec.payload ?? new Uint8Array(0);
  const key = spec.mask === true
    ? FIXED_KEY
    : spec.mask instanceof Uint8Array
    ? spec.mask
    : undefined;
  const length = BigInt(spec.declaredLength ?? payload.length);
  const head: number[] = [
    ((spec.fin ?? true) ? 0x80 : 0) | (spec.rsv1 ? 0x40 : 0) |
    (spec.rsv2 ? 0x20 : 0) | (spec.rsv3 ? 0x10 : 0) | spec.opcode,
  ];
  const maskBit = key ? 0x80 : 0;
  const form = spec.lengthForm ??
    (length < 126n ? undefined : length < 65536n ? 126 : 127);
  if (form === undefined) {
    head.push(maskBit | Number(length));
  } else if (form === 126) {
    head.push(
      maskBit | 126,
      Number(length >> 8n) & 0xff,
      Number(length) & 0xff,
    );
  } else {
    head.push(maskBit | 127);
    for (let shift = 56n; shift >= 0n; shift -= 8n) {
      head.push(Number((length >> shift) & 0xffn));
    }
  }
  if (key) head.push(...key);
  const body = payload.slice();
  if (key) { for (let i = 0; i < body.length; i++) body[i] ^= key[i % 4]; }
  return concat(new Uint8Array(head), body);
}

/**
 * A final frame masked as a client sends it (RFC 6455 section 5.3): with a
 * fresh random key, so a server cannot get by on a fixed one.
 */
export function clientFrame(
  opcode: number,
  payload: Uint8Array | string,
): Uint8Array {
  const mask = crypto.getRandomValues(new Uint8Array(4));
  return frame({ opcode, payload, mask });
}

/** Encodes several frames back to back. */
export function frames(...specs: RawFrame[]): Uint8Array {
  return concat(...specs.map(frame));
}

/** A close frame payload: the code in network order, then the reason. */
export function closePayload(code: number, reason = ""): Uint8Array {
  return concat(new Uint8Array([code >> 8, code & 0xff]), utf8(reason));
}

/** A frame as read back off the wire, payload unmasked. */
export interface ReadFrame {
  fin: boolean;
  rsv: number;
  opcode: number;
  masked: boolean;
  payload: Uint8Array;
}

/** Something frames can be read from. */
export interface ByteSource {
  read(buffer: Uint8Array): Promise<number | null>;
}

/**
 * Reads frames from a raw byte source, one at a time, keeping any extra
 * bytes for the next call.
 */
export class FrameReader {
  #source: ByteSource;
  #buffer: Uint8Array = new Uint8Array(0);

  constructor(source: ByteSource) {
    this.#source = source;
  }

  async #need(count: number): Promise<boolean> {
    while (this.#buffer.length < count) {
      const chunk = new Uint8Array(64 * 1024);
      let n: number | null;
      try {
        n = await this.#source.read(chunk);
      } catch {
        n = null;
      }
      if (n === null) return false;
      this.#buffer = concat(this.#buffer, chunk.subarray(0, n));
    }
    return true;
  }

  #take(count: number): Uint8Array {
    const out = this.#buffer.slice(0, count);
    this.#buffer = this.#buffer.subarray(count);
    return out;
  }

  /** The next frame, or null at EOF (or a read error). */
  async next(): Promise<ReadFrame | null> {
    if (!await this.#need(2)) return null;
    const [b0, b1] = this.#take(2);
    let length = b1 & 0x7f;
    if (length === 126) {
      if (!await this.#need(2)) return null;
      const ext = this.#take(2);
      length = (ext[0] << 8) | ext[1];
    } else if (length === 127) {
      if (!await this.#need(8)) return null;
      const ext = this.#take(8);
      length = 0;
      for (const byte of ext) length = length * 256 + byte;
    }
    const masked = (b1 & 0x80) !== 0;
    let key: Uint8Array | undefined;
    if (masked) {
      if (!await this.#need(4)) return null;
      key = this.#take(4);
    }
    if (!await this.#need(length)) return null;
    const payload = this.#take(length);
    if (key) { for (let i = 0; i < length; i++) payload[i] ^= key[i % 4]; }
    return {
      fin: (b0 & 0x80) !== 0,
      rsv: (b0 >> 4) & 7,
      opcode: b0 & 0x0f,
      masked,
      payload,
    };
  }

  /** Every frame until EOF. */
  async all(): Promise<ReadFrame[]> {
    const out: ReadFrame[] = [];
    for (let f; (f = await this.next()) !== null;) out.push(f);
    return out;
  }
}

/** The code and UTF-8 reason of a close frame payload. */
export function parseClose(
  payload: Uint8Array,
): { code: number; reason: string } {
  if (payload.length < 2) return { code: 1005, reason: "" };
  return {
    code: (payload[0] << 8) | payload[1],
    reason: new TextDecoder().decode(payload.subarray(2)),
  };
}
