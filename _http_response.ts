// Response encoding for serve(): a Response turned into HTTP/1.1 bytes on the
// socket (RFC 9112 sections 4-7), with Content-Length when the body is ready
// at once and chunked when it streams.

import { headerHasToken } from "./_handshake.ts";
import { type RequestHead, STATUS_TEXT } from "./_http.ts";
import { concat, writeAll } from "./_io.ts";

const encoder = new TextEncoder();
/** A body no larger than this is sent in one write with its head. */
const COALESCE_BYTES = 64 * 1024;
const CRLF = new Uint8Array([0x0d, 0x0a]);
const LAST_CHUNK = encoder.encode("0\r\n\r\n");

/** What a response is written to. */
export interface Writer {
  write(data: Uint8Array): Promise<number>;
}

/** What writing a response needs to know of its request and connection. */
export interface ResponseContext {
  /** The request's head: its method and HTTP version shape the response. */
  head: RequestHead;
  /** The response to send instead when the body fails before any byte. */
  fallback(error: unknown): Promise<Response>;
  /** The client went away, or the body failed, in the middle of it. */
  onBroken(): void;
}

/**
 * Writes `response`; resolves whether the connection can stay open. The
 * body is sent with Content-Length when it is complete before the event
 * loop turns (strings, bytes, small blobs), chunked when it streams.
 */
export async function writeResponse(
  conn: Writer,
  response: Response,
  keepAlive: boolean,
  context: ResponseContext,
): Promise<boolean> {
  const { head } = context;
  const status = response.status;
  const noBody = head.method.toUpperCase() === "HEAD" || status === 204 ||
    status === 304;
  const headers = response.headers;
  if (headerHasToken(headers, "connection", "close")) keepAlive = false;
  const declared = headers.get("content-length");
  let length: number | undefined = declared !== null &&
      /^\d{1,15}$/.test(declared)
    ? Number(declared)
    : undefined;

  let reader: ReadableStreamDefaultReader<Uint8Array> | undefined;
  let collected: Uint8Array[] = [];
  let ended = response.body === null;
  let next: Promise<ReadableStreamReadResult<Uint8Array>> | undefined;
  try {
    // getReader() throws for a body that is locked or already read.
    reader = response.body?.getReader();
    if (reader !== undefined && length === undefined) {
      ({ collected, ended, next } = await collectReady(reader));
      if (ended) length = collected.reduce((n, c) => n + c.length, 0);
    }
  } catch (error) {
    // The body failed before anything was sent: answer as for a throw.
    const fallback = await context.fallback(error);
    return writeResponse(conn, fallback, false, context);
  }
  if (status === 204 || status === 304) length = undefined;
  const chunked = !noBody && length === undefined &&
    head.version === "HTTP/1.1";
  if (!noBody && length === undefined && !chunked) keepAlive = false;

  let text = `HTTP/1.1 ${status} ${
    response.statusText || STATUS_TEXT[status] || ""
  }\r\n`;
  for (const [name, value] of headers) {
    if (
      name === "connection" || name === "transfer-encoding" ||
      name === "content-length" || name === "keep-alive"
    ) continue;
    text += `${name}: ${value}\r\n`;
  }
  if (!headers.has("date")) text += `date: ${httpDate()}\r\n`;
  if (length !== undefined && (status !== 204 && status !== 304)) {
    text += `content-length: ${length}\r\n`;
  }
  if (chunked) text += "transfer-encoding: chunked\r\n";
  if (!keepAlive) text += "connection: close\r\n";
  else if (head.version === "HTTP/1.0") text += "connection: keep-alive\r\n";
  text += "\r\n";

  const headBytes = encodeLatin1(text);
  if (noBody || reader === undefined) {
    if (reader !== undefined) reader.cancel().catch(() => {});
    await writeAll(conn, headBytes);
    return keepAlive;
  }
  try {
    let sent = 0;
    // Frames body pieces (cut to a declared length, chunked when needed)
    // behind `out` and writes them all at once.
    const send = async (out: Uint8Array[], pieces: Uint8Array[]) => {
      for (let piece of pieces) {
        if (length !== undefined) {
          piece = piece.subarray(0, length - sent);
          sent += piece.length;
        }
        if (piece.length === 0) continue;
        if (chunked) {
          out.push(
            encoder.encode(`${piece.length.toString(16)}\r\n`),
            piece,
            CRLF,
          );
        } else out.push(piece);
      }
      await writePieces(conn, out);
    };
    await send([headBytes], collected);
    while (!ended) {
      const result = await (next ?? reader.read());
      next = undefined;
      if (result.done) break;
      await send([], [result.value]);
    }
    if (chunked) await writeAll(conn, LAST_CHUNK);
    // A declared Content-Length the body did not fill leaves the client
    // waiting for bytes that never come: end the connection instead.
    if (length !== undefined && sent !== length) return false;
    return keepAlive;
  } catch (error) {
    // The client is gone (or the body failed): stop the handler's work.
    context.onBroken();
    reader.cancel(error).catch(() => {});
    return false;
  }
}

/** Writes several pieces, coalescing small ones into one syscall. */
export async function writePieces(
  conn: Writer,
  pieces: Uint8Array[],
): Promise<void> {
  let total = 0;
  for (const piece of pieces) total += piece.length;
  if (pieces.length === 1 || total <= COALESCE_BYTES) {
    const joined = pieces.length === 1 ? pieces[0] : concat(pieces);
    if (joined.length > 0) await writeAll(conn, joined);
    return;
  }
  for (const piece of pieces) await writeAll(conn, piece);
}

/**
 * Reads the chunks a body stream already holds, stopping at its end, when
 * the next chunk is not ready before a macrotask (the body streams), or when
 * more than COALESCE_BYTES have come (a large body is sent as it comes).
 * `next` is the read still in flight, to be awaited later.
 */
async function collectReady(
  reader: ReadableStreamDefaultReader<Uint8Array>,
): Promise<{
  collected: Uint8Array[];
  ended: boolean;
  next?: Promise<ReadableStreamReadResult<Uint8Array>>;
}> {
  const collected: Uint8Array[] = [];
  let total = 0;
  // The first chunk is always awaited: the head needs to know whether the
  // body is empty, and a stream's first chunk is what a client waits for.
  const first = await reader.read();
  if (first.done) return { collected, ended: true };
  collected.push(first.value);
  total += first.value.length;
  for (;;) {
    const next = reader.read();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const tick = new Promise<undefined>((resolve) => {
      timer = setTimeout(() => resolve(undefined), 0);
    });
    const result = await Promise.race([next, tick]);
    clearTimeout(timer);
    if (result === undefined) {
      // Whoever awaits `next` later sees its failure; if the connection
      // fails first nobody will, and a rejection must never go unobserved.
      next.catch(() => {});
      return { collected, ended: false, next };
    }
    if (result.done) return { collected, ended: true };
    collected.push(result.value);
    total += result.value.length;
    if (total > COALESCE_BYTES) return { collected, ended: false };
  }
}

/**
 * Encodes a response head byte for byte: header values are ByteStrings
 * (characters up to U+00FF) that UTF-8 would turn into two bytes each.
 */
function encodeLatin1(text: string): Uint8Array {
  // deno-lint-ignore no-control-regex
  if (/^[\x00-\x7f]*$/.test(text)) return encoder.encode(text);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return bytes;
}

/** A plain-text response that says its status. */
export function plainResponse(status: number): Response {
  return new Response(`${status} ${STATUS_TEXT[status] ?? "Error"}`, {
    status,
  });
}

// The Date header (RFC 9110 section 6.6.1) changes once a second; format it
// once a second rather than per response.
let dateSecond = -1;
let dateText = "";
export function httpDate(): string {
  const now = Date.now();
  const second = Math.floor(now / 1000);
  if (second !== dateSecond) {
    dateSecond = second;
    dateText = new Date(now).toUTCString();
  }
  return dateText;
}

/** A bare status response that closes the connection, as bytes. */
export function encodeRefusal(status: number): Uint8Array {
  const text = `${status} ${STATUS_TEXT[status] ?? "Error"}`;
  return encoder.encode(
    `HTTP/1.1 ${text}\r\ndate: ${httpDate()}\r\n` +
      `content-type: text/plain;charset=UTF-8\r\n` +
      `content-length: ${text.length}\r\nconnection: close\r\n\r\n${text}`,
  );
}
