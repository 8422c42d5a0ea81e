/**
 * The RFC 6455 frame codec: opcodes, message types, close codes, frame
 * headers, masking and close payloads, and the errors a connection ends
 * with ({@linkcode CloseError}, {@linkcode ProtocolError} and the rest). It
 * does no I/O and decides nothing about what is legal on a connection; a
 * `Conn` does that.
 *
 * @example Encode a masked text frame and parse it back
 * ```ts title="Round trip of a frame header"
 * import { encodeHeader, mask, OPCODE, parseHeader } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * const payload = new TextEncoder().encode("hi");
 * const key = new Uint8Array([1, 2, 3, 4]);
 * const frame = new Uint8Array(6 + payload.length);
 * const headerLength = encodeHeader(frame, {
 *   fin: true,
 *   opcode: OPCODE.Text,
 *   length: payload.length,
 *   maskKey: key,
 * });
 * frame.set(payload, headerLength);
 * mask(frame.subarray(headerLength), key);
 *
 * const header = parseHeader(frame)!;
 * assert.equal(header.opcode, OPCODE.Text);
 * assert.equal(header.length, 2);
 * const body = frame.subarray(header.headerLength);
 * mask(body, header.maskKey);
 * assert.equal(new TextDecoder().decode(body), "hi");
 * ```
 *
 * @module
 */

import { maskInPlace } from "./_mask.ts";
import { Utf8Validator } from "./_utf8.ts";

/**
 * Frame opcodes (RFC 6455 section 5.2).
 *
 * @example Read the opcode of a frame
 * ```ts title="Opcodes"
 * import { OPCODE, parseHeader } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * assert.equal(parseHeader(new Uint8Array([0x89, 0x00]))!.opcode, OPCODE.Ping);
 * ```
 */
export const OPCODE = {
  Continuation: 0x0,
  Text: 0x1,
  Binary: 0x2,
  Close: 0x8,
  Ping: 0x9,
  Pong: 0xa,
} as const;

/** A defined frame opcode. */
export type Opcode = typeof OPCODE[keyof typeof OPCODE];

/**
 * Message types, as gorilla/websocket numbers them (equal to the opcodes of
 * the frames that start them).
 *
 * @example Message types match opcodes
 * ```ts title="Message types"
 * import { MESSAGE_TYPE, OPCODE } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * assert.equal(MESSAGE_TYPE.Text, OPCODE.Text);
 * assert.equal(MESSAGE_TYPE.Close, 8);
 * ```
 */
export const MESSAGE_TYPE = {
  /** A UTF-8 text data message. */
  Text: 1,
  /** A binary data message. */
  Binary: 2,
  /** A close control message. */
  Close: 8,
  /** A ping control message. */
  Ping: 9,
  /** A pong control message. */
  Pong: 10,
} as const;

/** A message type: one of {@linkcode MESSAGE_TYPE}'s values. */
export type MessageType = typeof MESSAGE_TYPE[keyof typeof MESSAGE_TYPE];

/** A data message type (text or binary). */
export type DataMessageType =
  | typeof MESSAGE_TYPE.Text
  | typeof MESSAGE_TYPE.Binary;

/** A control message type (close, ping or pong). */
export type ControlMessageType =
  | typeof MESSAGE_TYPE.Close
  | typeof MESSAGE_TYPE.Ping
  | typeof MESSAGE_TYPE.Pong;

/**
 * Close status codes (RFC 6455 section 7.4.1 and the IANA registry).
 *
 * @example Close with "going away"
 * ```ts title="Close codes"
 * import { CLOSE_CODE, formatCloseMessage } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * const payload = formatCloseMessage(CLOSE_CODE.GoingAway, "restart");
 * assert.equal((payload[0] << 8) | payload[1], 1001);
 * ```
 */
export const CLOSE_CODE = {
  NormalClosure: 1000,
  GoingAway: 1001,
  ProtocolError: 1002,
  UnsupportedData: 1003,
  NoStatusReceived: 1005,
  AbnormalClosure: 1006,
  InvalidFramePayloadData: 1007,
  PolicyViolation: 1008,
  MessageTooBig: 1009,
  MandatoryExtension: 1010,
  InternalServerErr: 1011,
  ServiceRestart: 1012,
  TryAgainLater: 1013,
  TLSHandshake: 1015,
} as const;

/** A close code named in {@linkcode CLOSE_CODE}. */
export type CloseCode = typeof CLOSE_CODE[keyof typeof CLOSE_CODE];

/** Largest payload of a control frame (RFC 6455 section 5.5). */
export const MAX_CONTROL_PAYLOAD = 125;

/** Largest header: 2 bytes, 8 of extended length and 4 of masking key. */
export const MAX_HEADER_LENGTH = 14;

/**
 * A frame violates the protocol; `code` is the close code the connection is
 * failed with (RFC 6455 section 7.4.1).
 *
 * @example Inspect the close code of a protocol error
 * ```ts title="A protocol error carries its close code"
 * import { parseClosePayload, ProtocolError } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * assert.throws(
 *   () => parseClosePayload(new Uint8Array([3])),
 *   (e) => e instanceof ProtocolError && e.code === 1002,
 * );
 * ```
 */
export class ProtocolError extends Error {
  /** The close code sent to the peer for this error. */
  readonly code: number;

  /**
   * Creates a protocol error.
   *
   * @param message What the peer did wrong.
   * @param code The close code to fail the connection with.
   * @param options The error's `cause`.
   */
  constructor(message: string, code: number, options?: ErrorOptions) {
    super(message, options);
    this.name = "ProtocolError";
    this.code = code;
  }
}

/**
 * The peer sent a close frame (or the connection died: code 1006,
 * abnormal closure, which never appears on the wire).
 *
 * @example Recognise a close
 * ```ts title="A CloseError carries the code and reason"
 * import { CloseError, isCloseError } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * const error = new CloseError(1001, "going away");
 * assert.equal(error.code, 1001);
 * assert.equal(error.text, "going away");
 * assert.equal(isCloseError(error, 1000, 1001), true);
 * ```
 */
export class CloseError extends Error {
  /** The close code. */
  readonly code: number;
  /** The close reason. */
  readonly text: string;

  /**
   * Creates a close error.
   *
   * @param code The close code.
   * @param text The close reason.
   * @param options The error's `cause`.
   */
  constructor(code: number, text = "", options?: ErrorOptions) {
    super(`Connection closed: ${code}${text ? ` ${text}` : ""}`, options);
    this.name = "CloseError";
    this.code = code;
    this.text = text;
  }
}

/**
 * A data or close frame was written after a close frame was already sent
 * (gorilla's `ErrCloseSent`).
 *
 * @example Writing after closing
 * ```ts title="Writes after a close frame reject"
 * import { CloseSentError, Conn, MESSAGE_TYPE } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * const [socket, peer] = await Promise.all([
 *   listener.accept(),
 *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
 * ]);
 * const conn = new Conn(socket, { role: "server" });
 * await conn.writeControl(MESSAGE_TYPE.Close, new Uint8Array([3, 232]));
 * await assert.rejects(conn.writeMessage(MESSAGE_TYPE.Text, "late"), CloseSentError);
 * conn.close();
 * peer.close();
 * ```
 */
export class CloseSentError extends Error {
  /**
   * Creates the error.
   *
   * @param message What was attempted.
   */
  constructor(message = "Cannot write: a close frame was already sent") {
    super(message);
    this.name = "CloseSentError";
  }
}

/**
 * A message exceeded the read limit; the connection was failed with close
 * code 1009 (gorilla's `ErrReadLimit`). For a compressed message the limit
 * bounds its inflated size.
 *
 * @example The error carries code 1009
 * ```ts title="A read limit error"
 * import { ReadLimitError } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * const error = new ReadLimitError(10);
 * assert.equal(error.code, 1009);
 * assert.equal(error.limit, 10);
 * ```
 */
export class ReadLimitError extends ProtocolError {
  /** The limit that was exceeded, in bytes. */
  readonly limit: number;

  /**
   * Creates the error.
   *
   * @param limit The read limit in bytes.
   * @param options The underlying cause, if any.
   */
  constructor(limit: number, options?: ErrorOptions) {
    super(
      `Cannot read message: it exceeds the read limit of ${limit} bytes`,
      CLOSE_CODE.MessageTooBig,
      options,
    );
    this.name = "ReadLimitError";
    this.limit = limit;
  }
}

/**
 * The connection was closed locally with `Conn.close()` while a read
 * or write was pending, or used after it.
 *
 * @example Reading after close()
 * ```ts title="Reads after close() reject"
 * import { Conn, ConnectionClosedError } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * const [socket, peer] = await Promise.all([
 *   listener.accept(),
 *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
 * ]);
 * const conn = new Conn(socket, { role: "server" });
 * conn.close();
 * await assert.rejects(conn.readMessage(), ConnectionClosedError);
 * peer.close();
 * ```
 */
export class ConnectionClosedError extends Error {
  /**
   * Creates the error.
   *
   * @param message What was attempted.
   * @param options The error's `cause`.
   */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ConnectionClosedError";
  }
}

/**
 * Whether `error` is a {@linkcode CloseError} with one of `codes` (any code
 * when none are given, where gorilla's `IsCloseError` would say false).
 *
 * @param error Anything caught.
 * @param codes Close codes to accept.
 * @returns True for a matching close error.
 *
 * @example Checking for a normal closure
 * ```ts title="isCloseError"
 * import { CloseError, isCloseError } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * assert.equal(isCloseError(new CloseError(1000), 1000, 1001), true);
 * assert.equal(isCloseError(new Error("boom")), false);
 * ```
 */
export function isCloseError(error: unknown, ...codes: number[]): boolean {
  return error instanceof CloseError &&
    (codes.length === 0 || codes.includes(error.code));
}

/**
 * Whether `error` is a {@linkcode CloseError} whose code is not one of
 * `expectedCodes`.
 *
 * @param error Anything caught.
 * @param expectedCodes Close codes that are expected.
 * @returns True for a close error with another code.
 *
 * @example Spotting an abnormal closure
 * ```ts title="isUnexpectedCloseError"
 * import { CloseError, isUnexpectedCloseError } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * assert.equal(isUnexpectedCloseError(new CloseError(1006), 1000, 1001), true);
 * assert.equal(isUnexpectedCloseError(new CloseError(1001), 1000, 1001), false);
 * ```
 */
export function isUnexpectedCloseError(
  error: unknown,
  ...expectedCodes: number[]
): boolean {
  return error instanceof CloseError && !expectedCodes.includes(error.code);
}

/** A parsed frame header (RFC 6455 section 5.2). */
export interface FrameHeader {
  /** Whether this is the final fragment of its message. */
  fin: boolean;
  /** RSV1 (used by permessage-deflate, RFC 7692). */
  rsv1: boolean;
  /** RSV2 (reserved). */
  rsv2: boolean;
  /** RSV3 (reserved). */
  rsv3: boolean;
  /** The 4-bit opcode as sent, defined or not. */
  opcode: number;
  /** Whether the payload is masked. */
  masked: boolean;
  /** Payload length in bytes. */
  length: number;
  /** The masking key; its content is meaningful only when `masked`. */
  maskKey: Uint8Array;
  /** Number of header bytes (2 to 14). */
  headerLength: number;
}

/** What {@linkcode encodeHeader} writes. */
export interface FrameHeaderInit {
  /** Whether this is the final fragment of its message. */
  fin: boolean;
  /** RSV1 bit (default false). */
  rsv1?: boolean;
  /** RSV2 bit (default false). */
  rsv2?: boolean;
  /** RSV3 bit (default false). */
  rsv3?: boolean;
  /** The opcode (0-15). */
  opcode: number;
  /** Payload length in bytes. */
  length: number;
  /** The 4-byte masking key; absent for an unmasked frame. */
  maskKey?: Uint8Array;
}

/**
 * Returns how many header bytes a frame with this payload length needs.
 *
 * @param length The payload length.
 * @param masked Whether the frame carries a masking key.
 * @returns The header length, 2 to 14.
 *
 * @example Header lengths at the size boundaries
 * ```ts title="7-, 16- and 64-bit lengths"
 * import { headerLength } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * assert.equal(headerLength(125, false), 2);
 * assert.equal(headerLength(126, false), 4);
 * assert.equal(headerLength(65536, true), 14);
 * ```
 */
export function headerLength(length: number, masked: boolean): number {
  const base = length < 126 ? 2 : length < 65536 ? 4 : 10;
  return masked ? base + 4 : base;
}

/**
 * Parses a frame header at `offset` of `bytes`.
 *
 * @param bytes Buffered input.
 * @param offset Where the header starts (default 0).
 * @param into A header object to fill and return instead of a new one (the
 * parser in `Conn` reuses one per connection).
 * @returns The header, or `null` when `bytes` does not hold all of it yet.
 * @throws {ProtocolError} The 64-bit length has its most significant bit set
 * (1002) or exceeds 2^53 - 1 (1009).
 *
 * @example Parse an unmasked binary frame header
 * ```ts title="Parsing a header"
 * import { parseHeader } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * const header = parseHeader(new Uint8Array([0x82, 0x7e, 0x01, 0x00]))!;
 * assert.equal(header.fin, true);
 * assert.equal(header.opcode, 2);
 * assert.equal(header.length, 256);
 * assert.equal(parseHeader(new Uint8Array([0x82, 0x7e])), null);
 * ```
 */
export function parseHeader(
  bytes: Uint8Array,
  offset = 0,
  into?: FrameHeader,
): FrameHeader | null {
  const available = bytes.length - offset;
  if (available < 2) return null;
  const b0 = bytes[offset];
  const b1 = bytes[offset + 1];
  const masked = (b1 & 0x80) !== 0;
  let length = b1 & 0x7f;
  let size = 2;
  if (length === 126) {
    size = 4;
    if (available < 4) return null;
    length = (bytes[offset + 2] << 8) | bytes[offset + 3];
  } else if (length === 127) {
    size = 10;
    if (available < 10) return null;
    const high = ((bytes[offset + 2] << 24) | (bytes[offset + 3] << 16) |
      (bytes[offset + 4] << 8) | bytes[offset + 5]) >>> 0;
    const low = ((bytes[offset + 6] << 24) | (bytes[offset + 7] << 16) |
      (bytes[offset + 8] << 8) | bytes[offset + 9]) >>> 0;
    // RFC 6455 section 5.2: the most significant bit MUST be 0.
    if (high >= 0x80000000) {
      throw new ProtocolError("Invalid frame length: the top bit is set", 1002);
    }
    if (high > 0x1fffff) {
      throw new ProtocolError(
        "Frame too large: the length exceeds 2^53 - 1 bytes",
        1009,
      );
    }
    length = high * 0x100000000 + low;
  }
  if (masked) {
    if (available < size + 4) return null;
  }
  const header = into ?? {
    fin: false,
    rsv1: false,
    rsv2: false,
    rsv3: false,
    opcode: 0,
    masked: false,
    length: 0,
    maskKey: new Uint8Array(4),
    headerLength: 0,
  };
  header.fin = (b0 & 0x80) !== 0;
  header.rsv1 = (b0 & 0x40) !== 0;
  header.rsv2 = (b0 & 0x20) !== 0;
  header.rsv3 = (b0 & 0x10) !== 0;
  header.opcode = b0 & 0x0f;
  header.masked = masked;
  header.length = length;
  if (masked) {
    const key = header.maskKey;
    key[0] = bytes[offset + size];
    key[1] = bytes[offset + size + 1];
    key[2] = bytes[offset + size + 2];
    key[3] = bytes[offset + size + 3];
    size += 4;
  }
  header.headerLength = size;
  return header;
}

/**
 * Writes a frame header into `target` at `offset`.
 *
 * @param target Where to write; needs {@linkcode headerLength} bytes free.
 * @param header The header fields.
 * @param offset Where to start writing (default 0).
 * @returns The number of bytes written.
 * @throws {RangeError} The opcode is not 0-15, the length is not a safe
 * non-negative integer, the key is not 4 bytes, or `target` is too short.
 *
 * @example Encode a 16-bit length header
 * ```ts title="Encoding a header"
 * import { encodeHeader, OPCODE } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * const target = new Uint8Array(4);
 * const n = encodeHeader(target, { fin: true, opcode: OPCODE.Binary, length: 300 });
 * assert.equal(n, 4);
 * assert.deepEqual([...target], [0x82, 126, 1, 44]);
 * ```
 */
export function encodeHeader(
  target: Uint8Array,
  header: FrameHeaderInit,
  offset = 0,
): number {
  const { length, maskKey, opcode } = header;
  if (!Number.isSafeInteger(length) || length < 0) {
    throw new RangeError(
      `Cannot encode frame header: length ${length} is not a safe non-negative integer`,
    );
  }
  if (!Number.isInteger(opcode) || opcode < 0 || opcode > 15) {
    throw new RangeError(
      `Cannot encode frame header: opcode ${opcode} is not 0-15`,
    );
  }
  if (maskKey !== undefined && maskKey.length !== 4) {
    throw new RangeError(
      `Cannot encode frame header: the masking key has ${maskKey.length} bytes, not 4`,
    );
  }
  const size = headerLength(length, maskKey !== undefined);
  if (target.length - offset < size) {
    throw new RangeError(
      `Cannot encode frame header: ${size} bytes needed, ${
        target.length - offset
      } available`,
    );
  }
  return writeHeader(
    target,
    offset,
    (header.fin ? 0x80 : 0) | (header.rsv1 ? 0x40 : 0) |
      (header.rsv2 ? 0x20 : 0) | (header.rsv3 ? 0x10 : 0) | opcode,
    length,
    maskKey,
  );
}

/**
 * Writes a header without validating anything: the fast path behind
 * {@linkcode encodeHeader} for callers that built the values themselves, as
 * `Conn` does for every frame it sends.
 *
 * @param target Where to write; needs {@linkcode headerLength} bytes free.
 * @param offset Where to start writing.
 * @param b0 The first byte: FIN (0x80), RSV1-3 (0x40, 0x20, 0x10), opcode.
 * @param length The payload length, a safe non-negative integer.
 * @param maskKey The 4-byte masking key, or `undefined` for none.
 * @returns The number of bytes written.
 *
 * @example Write a final text frame header
 * ```ts title="Unchecked header encoding"
 * import { writeHeader } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * const target = new Uint8Array(2);
 * assert.equal(writeHeader(target, 0, 0x81, 5, undefined), 2);
 * assert.deepEqual([...target], [0x81, 5]);
 * ```
 */
export function writeHeader(
  target: Uint8Array,
  offset: number,
  b0: number,
  length: number,
  maskKey: Uint8Array | undefined,
): number {
  const maskBit = maskKey === undefined ? 0 : 0x80;
  target[offset] = b0;
  let i = offset + 2;
  if (length < 126) {
    target[offset + 1] = maskBit | length;
  } else if (length < 65536) {
    target[offset + 1] = maskBit | 126;
    target[offset + 2] = length >>> 8;
    target[offset + 3] = length & 0xff;
    i = offset + 4;
  } else {
    target[offset + 1] = maskBit | 127;
    const high = Math.floor(length / 0x100000000);
    const low = length >>> 0;
    target[offset + 2] = high >>> 24;
    target[offset + 3] = (high >>> 16) & 0xff;
    target[offset + 4] = (high >>> 8) & 0xff;
    target[offset + 5] = high & 0xff;
    target[offset + 6] = low >>> 24;
    target[offset + 7] = (low >>> 16) & 0xff;
    target[offset + 8] = (low >>> 8) & 0xff;
    target[offset + 9] = low & 0xff;
    i = offset + 10;
  }
  if (maskKey !== undefined) {
    target[i] = maskKey[0];
    target[i + 1] = maskKey[1];
    target[i + 2] = maskKey[2];
    target[i + 3] = maskKey[3];
    i += 4;
  }
  return i - offset;
}

/**
 * Masks or unmasks `data` in place (the operation is its own inverse,
 * RFC 6455 section 5.3). To mask a payload split into pieces, pass the
 * offset returned for the previous piece.
 *
 * @param data The bytes to transform in place.
 * @param key The 4-byte masking key.
 * @param offset Position in the key of `data[0]`: the payload offset of
 * `data` modulo 4 (default 0).
 * @returns The key offset for the byte that follows `data`.
 * @throws {RangeError} The key is not 4 bytes.
 *
 * @example Unmask a payload in two pieces
 * ```ts title="Resumable masking"
 * import { mask } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * const key = new Uint8Array([0x37, 0xfa, 0x21, 0x3d]);
 * const data = new TextEncoder().encode("Hello");
 * mask(data, key);
 * const next = mask(data.subarray(0, 3), key);
 * mask(data.subarray(3), key, next);
 * assert.equal(new TextDecoder().decode(data), "Hello");
 * ```
 */
export function mask(data: Uint8Array, key: Uint8Array, offset = 0): number {
  if (key.length !== 4) {
    throw new RangeError(
      `Cannot mask: the masking key has ${key.length} bytes, not 4`,
    );
  }
  return maskInPlace(data, key, offset);
}

/**
 * Whether a peer may send this close code (RFC 6455 section 7.4): the
 * defined codes except 1004-1006 and 1015, and 3000-4999.
 *
 * @param code A close code from the wire.
 * @returns True when the code may appear in a close frame.
 *
 * @example Codes that may and may not be sent
 * ```ts title="Checking close codes"
 * import { isValidCloseCode } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * assert.equal(isValidCloseCode(1000), true);
 * assert.equal(isValidCloseCode(1005), false);
 * assert.equal(isValidCloseCode(4000), true);
 * ```
 */
export function isValidCloseCode(code: number): boolean {
  if (code >= 3000 && code <= 4999) return true;
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014);
}

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { ignoreBOM: true });

/**
 * Builds a close frame payload: the code in network byte order followed by
 * the UTF-8 reason. {@linkcode CLOSE_CODE.NoStatusReceived} gives an empty
 * payload, as in gorilla/websocket.
 *
 * @param code The close code.
 * @param text The reason (default empty).
 * @returns The payload for a close frame.
 * @throws {RangeError} The code is not an integer in 0-65535 or the payload
 * would exceed 125 bytes.
 *
 * @example Build a normal closure payload
 * ```ts title="A close payload"
 * import { CLOSE_CODE, formatCloseMessage } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * const payload = formatCloseMessage(CLOSE_CODE.NormalClosure, "bye");
 * assert.deepEqual([...payload], [0x03, 0xe8, 0x62, 0x79, 0x65]);
 * ```
 */
export function formatCloseMessage(code: number, text = ""): Uint8Array {
  if (code === CLOSE_CODE.NoStatusReceived) return new Uint8Array(0);
  if (!Number.isInteger(code) || code < 0 || code > 0xffff) {
    throw new RangeError(
      `Cannot format close message: code ${code} is not an integer in 0-65535`,
    );
  }
  const reason = encoder.encode(text);
  if (reason.length > MAX_CONTROL_PAYLOAD - 2) {
    throw new RangeError(
      `Cannot format close message: the reason is ${reason.length} bytes, over 123`,
    );
  }
  const payload = new Uint8Array(2 + reason.length);
  payload[0] = code >>> 8;
  payload[1] = code & 0xff;
  payload.set(reason, 2);
  return payload;
}

/** A parsed close frame payload. */
export interface ClosePayload {
  /** The close code, or 1005 (no status received) for an empty payload. */
  code: number;
  /** The UTF-8 reason, possibly empty. */
  reason: string;
}

/**
 * Parses and validates a received close frame payload (RFC 6455 section
 * 5.5.1): empty, or a code that may be sent followed by a UTF-8 reason.
 *
 * @param payload The unmasked close frame payload.
 * @returns The code (1005 for an empty payload) and reason.
 * @throws {ProtocolError} A 1-byte payload or a code that may not be sent
 * (1002), or a reason that is not UTF-8 (1007).
 *
 * @example Parse a close payload
 * ```ts title="Parsing a close payload"
 * import { parseClosePayload } from "@denows/websocket";
 * import assert from "node:assert/strict";
 *
 * const { code, reason } = parseClosePayload(new Uint8Array([0x03, 0xe9, 0x68]));
 * assert.equal(code, 1001);
 * assert.equal(reason, "h");
 * ```
 */
export function parseClosePayload(payload: Uint8Array): ClosePayload {
  if (payload.length === 0) {
    return { code: CLOSE_CODE.NoStatusReceived, reason: "" };
  }
  if (payload.length === 1) {
    throw new ProtocolError("Invalid close frame: the payload is 1 byte", 1002);
  }
  const code = (payload[0] << 8) | payload[1];
  if (!isValidCloseCode(code)) {
    throw new ProtocolError(
      `Invalid close frame: code ${code} may not be sent`,
      1002,
    );
  }
  const reason = payload.subarray(2);
  if (!new Utf8Validator().push(reason, true)) {
    throw new ProtocolError(
      "Invalid close frame: the reason is not valid UTF-8",
      1007,
    );
  }
  return { code, reason: decoder.decode(reason) };
}
