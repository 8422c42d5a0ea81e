// What the server and the client handshakes share (RFC 6455 section 4).

/** The GUID every `Sec-WebSocket-Accept` is derived with (RFC 6455 section 1.3). */
const ACCEPT_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/**
 * Computes the `Sec-WebSocket-Accept` value for a `Sec-WebSocket-Key`:
 * base64(SHA-1(key + GUID)) as RFC 6455 section 4.2.2 prescribes.
 */
export async function computeAcceptKey(key: string): Promise<string> {
  const digest = await crypto.subtle.digest(
    "SHA-1",
    new TextEncoder().encode(key + ACCEPT_GUID),
  );
  return encodeBase64(new Uint8Array(digest));
}

/** Encodes bytes as standard base64 with padding. */
export function encodeBase64(bytes: Uint8Array): string {
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary);
}

/** Returns 16 crypto-random bytes encoded as a `Sec-WebSocket-Key`. */
export function generateKey(): string {
  return encodeBase64(crypto.getRandomValues(new Uint8Array(16)));
}

/**
 * Reports whether a key is valid for RFC 6455 section 4.2.1 item 5: base64
 * that decodes to exactly 16 bytes.
 */
export function isValidKey(key: string): boolean {
  return /^[A-Za-z0-9+/]{22}==$/.test(key);
}

/**
 * Splits a comma-separated header value (RFC 9110 section 5.6.1) into its
 * trimmed, non-empty elements. Quoted strings are not special here: the
 * headers this is used on (`Connection`, `Upgrade`, `Sec-WebSocket-Protocol`)
 * hold tokens only.
 */
export function parseTokenList(value: string | null): string[] {
  if (value === null) return [];
  const tokens: string[] = [];
  for (const part of value.split(",")) {
    const token = part.trim();
    if (token !== "") tokens.push(token);
  }
  return tokens;
}

/** Reports whether a header's token list holds `token`, case-insensitively. */
export function headerHasToken(
  headers: Headers,
  name: string,
  token: string,
): boolean {
  return listHasToken(headers.get(name), token);
}

/** Reports whether a token list holds `token`, case-insensitively. */
export function listHasToken(
  value: string | null | undefined,
  token: string,
): boolean {
  const wanted = token.toLowerCase();
  return parseTokenList(value ?? null).some((t) => t.toLowerCase() === wanted);
}

/**
 * The opening handshake was refused: the request is not an acceptable
 * WebSocket handshake (or the application set `Sec-WebSocket-Extensions`).
 * By the time the upgrade rejects with it, the error response has been
 * written to the client and the connection closed.
 *
 * @example Catching a refused handshake
 * ```ts title="Catching a refused handshake"
 * import assert from "node:assert/strict";
 * import { HandshakeError, serve, Upgrader } from "@denows/websocket/upgrader";
 *
 * const upgrader = new Upgrader();
 * const refused = Promise.withResolvers<unknown>();
 * const server = serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (request) => {
 *   try {
 *     await upgrader.upgrade(request);
 *   } catch (error) {
 *     refused.resolve(error);
 *   }
 * });
 *
 * // A plain GET is no WebSocket handshake.
 * const response = await fetch(`http://127.0.0.1:${server.addr.port}/`);
 * assert.equal(response.status, 400);
 * assert.equal(await response.text(), "Bad Request\n");
 * const error = await refused.promise;
 * assert.ok(error instanceof HandshakeError);
 * assert.equal(error.status, 400);
 * await server.shutdown();
 * ```
 */
export class HandshakeError extends Error {
  /** The HTTP status of the error response (gorilla's statuses). */
  readonly status: number;

  /**
   * Creates a handshake error.
   *
   * @param message What went wrong, in sentence case.
   * @param options `status`: the HTTP status sent; `cause`: the underlying error.
   */
  constructor(message: string, options: { status: number; cause?: unknown }) {
    super(message, { cause: options.cause });
    this.name = "HandshakeError";
    this.status = options.status;
  }
}
