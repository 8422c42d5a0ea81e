// Reading an HTTP response on the client side (the WebSocket handshake's and
// an HTTP proxy's): the final head past interim answers, and up to 1 KiB of a
// refusal's body for the caller to read.

import { TimeoutSignal } from "./_deadline.ts";
import { headerHasToken } from "./_handshake.ts";
import { HttpError, parseResponseHead, readHead } from "./_http.ts";
import { closeQuietly, concat } from "./_io.ts";

/** Most bytes a response head (handshake or proxy) may take. */
const MAX_RESPONSE_HEAD_BYTES = 64 * 1024;
/** Most body bytes kept from a refusal, as gorilla does. */
const MAX_ERROR_BODY_BYTES = 1024;
/**
 * How long a refusal's body is waited for after its head: a server may keep
 * the connection open without saying how long the body is.
 */
const ERROR_BODY_WAIT_MS = 1000;

const decoder = new TextDecoder();

/**
 * Reads the final response head, skipping interim 1xx answers other than
 * 101 (RFC 9110 section 15.2), and returns it with the bytes behind it.
 * `what` names the answer in errors ("handshake", "proxy").
 */
export async function readResponse(
  conn: Deno.Conn,
  what: string,
): Promise<{ response: Response; rest: Uint8Array<ArrayBuffer> }> {
  let buffered: Uint8Array | undefined;
  for (;;) {
    let read;
    try {
      read = await readHead(conn, {
        maxHeadBytes: MAX_RESPONSE_HEAD_BYTES,
        buffered,
      });
    } catch (cause) {
      if (!(cause instanceof HttpError)) throw cause;
      throw new Deno.errors.InvalidData(
        `Cannot read the ${what} response: ${cause.message}`,
        { cause },
      );
    }
    if (read === null) {
      throw new Deno.errors.UnexpectedEof(
        `Cannot read the ${what} response: the connection closed before any answer`,
      );
    }
    const response = toResponse(read.head, what);
    if (response !== undefined) {
      return { response, rest: read.rest.slice() };
    }
    buffered = read.rest;
  }
}

/**
 * Parses a response head into a `Response` without a body, or undefined for
 * an interim 1xx answer that the caller skips.
 */
function toResponse(head: Uint8Array, what: string): Response | undefined {
  let parsed;
  try {
    parsed = parseResponseHead(head);
  } catch (cause) {
    throw new Deno.errors.InvalidData(
      `Cannot read the ${what} response: ${(cause as Error).message}`,
      { cause },
    );
  }
  const { status, statusText, headers } = parsed;
  if (status >= 100 && status < 200 && status !== 101) return undefined;
  if (status > 599) {
    throw new Deno.errors.InvalidData(
      `Cannot read the ${what} response: the status ${status} is not an HTTP status`,
    );
  }
  try {
    return new Response(null, { status, statusText, headers });
  } catch {
    // A reason phrase the Response constructor refuses is only cosmetic.
    return new Response(null, { status, headers });
  }
}

/**
 * Returns `response` with up to 1 KiB of the body the server sent behind it,
 * as gorilla keeps it "to aid application debugging". Waits at most
 * {@linkcode ERROR_BODY_WAIT_MS} for it.
 */
export async function withErrorBody(
  response: Response,
  conn: Deno.Conn,
  rest: Uint8Array,
  signal: AbortSignal,
): Promise<Response> {
  const { status, headers } = response;
  if (status === 101 || status === 204 || status === 205 || status === 304) {
    return response;
  }
  const length = headers.get("content-length");
  const chunked = headerHasToken(headers, "transfer-encoding", "chunked");
  // How many raw bytes to read: the declared length, or for chunked and
  // close-delimited bodies enough to hold 1 KiB plus chunk framing.
  const wanted = chunked
    ? 8 * MAX_ERROR_BODY_BYTES
    : length !== null && /^\d+$/.test(length)
    ? Math.min(Number(length), MAX_ERROR_BODY_BYTES)
    : MAX_ERROR_BODY_BYTES;
  let raw: Uint8Array<ArrayBuffer> = rest.slice(0, wanted);
  const done = () =>
    raw.length >= wanted ||
    (chunked && decodeChunked(raw).complete);
  const wait = new TimeoutSignal(
    ERROR_BODY_WAIT_MS,
    signal,
    "Cannot read the refusal's body: it took too long",
  );
  const stop = () => closeQuietly(conn);
  wait.signal.addEventListener("abort", stop, { once: true });
  try {
    while (!done() && !wait.signal.aborted) {
      const buffer = new Uint8Array(wanted - raw.length);
      const n = await conn.read(buffer);
      if (n === null) break;
      const joined = new Uint8Array(raw.length + n);
      joined.set(raw);
      joined.set(buffer.subarray(0, n), raw.length);
      raw = joined;
    }
  } catch {
    // Whatever arrived is kept: a reset or the wait ending is not the error
    // the caller is about to see.
  } finally {
    wait.signal.removeEventListener("abort", stop);
    wait.clear();
  }
  const body = chunked ? decodeChunked(raw).body : raw;
  return new Response(body.subarray(0, MAX_ERROR_BODY_BYTES), {
    status,
    statusText: response.statusText,
    headers,
  });
}

/**
 * Decodes as much of a chunked body (RFC 9112 section 7.1) as `raw` holds,
 * up to 1 KiB. `complete` says whether nothing more is needed.
 */
function decodeChunked(
  raw: Uint8Array,
): { body: Uint8Array<ArrayBuffer>; complete: boolean } {
  const parts: Uint8Array[] = [];
  let size = 0;
  let offset = 0;
  for (;;) {
    const lineEnd = raw.indexOf(0x0a, offset);
    if (lineEnd === -1) break;
    const line = decoder.decode(raw.subarray(offset, lineEnd)).trim();
    const chunkSize = parseInt(line.split(";")[0], 16);
    if (!(chunkSize >= 0)) return { body: concat(parts), complete: true };
    if (chunkSize === 0) return { body: concat(parts), complete: true };
    const start = lineEnd + 1;
    const chunk = raw.subarray(start, Math.min(start + chunkSize, raw.length));
    parts.push(chunk);
    size += chunk.length;
    if (size >= MAX_ERROR_BODY_BYTES) {
      return { body: concat(parts), complete: true };
    }
    if (start + chunkSize + 2 > raw.length) break;
    offset = start + chunkSize + 2;
  }
  return { body: concat(parts), complete: false };
}
