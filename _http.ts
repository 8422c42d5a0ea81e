// HTTP/1.1 message heads (RFC 9112): reading one off a connection and parsing
// it, shared by the server (requests) and the dialer (the 101 response).
//
// Every byte here comes from a peer that may be hostile, so parsing is strict:
// lines end in CRLF, field names are tokens, obs-fold and control characters
// are refused, and every refusal carries the HTTP status to answer with.

/** Anything a head can be read from: `Deno.Conn`, a `Transport`. */
export interface HeadReader {
  read(buffer: Uint8Array): Promise<number | null>;
}

/** Options for {@linkcode readHead}. */
export interface ReadHeadOptions {
  /** Most bytes the head may take, blank line included; more is a 431. */
  maxHeadBytes: number;
  /** Aborting rejects the read with the signal's reason. */
  signal?: AbortSignal;
  /**
   * Bytes already read from the connection that come before anything else
   * (the `rest` of the previous message on a keep-alive connection).
   */
  buffered?: Uint8Array;
}

/** A head read off a connection. */
export interface ReadHeadResult {
  /** The head, from the start line up to and including the blank line. */
  head: Uint8Array;
  /** Bytes that arrived behind the head (a body, a pipelined request, frames). */
  rest: Uint8Array;
}

/**
 * A request's header fields by lowercase name, a repeated field's values
 * joined with ", " (RFC 9110 section 5.3): what `Headers.get()` would give.
 * A null-prototype object, so any field name is safe as a key; a Request
 * takes it as a record for about a third of the garbage of copying a
 * `Headers`, which every request's construction would pay.
 */
export type Fields = Record<string, string>;

/** A parsed request head (RFC 9112 section 3). */
export interface RequestHead {
  method: string;
  target: string;
  version: "HTTP/1.0" | "HTTP/1.1";
  fields: Fields;
}

/** A parsed response head (RFC 9112 section 4). */
export interface ResponseHead {
  status: number;
  statusText: string;
  version: "HTTP/1.0" | "HTTP/1.1";
  headers: Headers;
}

/** Limits for {@linkcode parseRequestHead}. */
export interface ParseRequestOptions {
  /** Most bytes the request line may take, CRLF excluded; more is a 414. */
  maxRequestLineBytes?: number;
  /** Most header fields; more is a 431. */
  maxHeaders?: number;
}

/** Default limit on the request line (CRLF excluded). */
export const DEFAULT_MAX_REQUEST_LINE_BYTES = 8192;
/** Default limit on the number of header fields. */
export const DEFAULT_MAX_HEADERS = 100;

/**
 * A malformed or oversized HTTP message, with the status a server answers it
 * with (400, 414, 431, 505, ...).
 */
export class HttpError extends Error {
  /** The HTTP status that describes the problem. */
  readonly status: number;

  constructor(status: number, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "HttpError";
    this.status = status;
  }
}

const CR = 0x0d;
const LF = 0x0a;
/**
 * The first read of a head: most heads (a WebSocket upgrade, a fetch) fit,
 * and every pending read of an idle keep-alive connection and every head
 * read by a connection storm holds this much, garbage or not.
 */
const FIRST_READ = 1024;
/** Later reads, for the rest of a larger head. */
const READ_SIZE = 4096;

/**
 * Reads one message head: everything up to and including the first empty
 * line. Empty lines before the start line are skipped (RFC 9112 section 2.2).
 *
 * Resolves `null` when the connection ends before any byte of a head (a
 * keep-alive connection closed between requests). Rejects with an
 * {@linkcode HttpError} when the head exceeds `maxHeadBytes` (431) or the
 * connection ends in the middle of it (400), and with the signal's reason on
 * abort. Read errors of the connection itself are passed through.
 */
export async function readHead(
  reader: HeadReader,
  options: ReadHeadOptions,
): Promise<ReadHeadResult | null> {
  const { maxHeadBytes, signal } = options;
  signal?.throwIfAborted();
  // Grown one read at a time; the limit is checked before every read, so a
  // head can never make it larger than maxHeadBytes plus two reads.
  const buffered = options.buffered ?? new Uint8Array(0);
  let readSize = FIRST_READ;
  let buffer = new Uint8Array(buffered.length + readSize);
  buffer.set(buffered);
  let length = buffered.length;
  let start = 0; // where the head starts, past leading empty lines
  let scanned = 0; // bytes already searched for the blank line
  for (;;) {
    while (
      start + 1 < length && buffer[start] === CR && buffer[start + 1] === LF
    ) {
      start += 2;
      scanned = Math.max(scanned, start);
    }
    // A start line begins with a token (a method, or "HTTP"); anything else
    // is not HTTP, most often a TLS handshake sent to a plain port, which
    // gets its answer now rather than after the head timeout.
    if (
      start < length && buffer[start] !== CR &&
      !TOKEN_CHAR.test(String.fromCharCode(buffer[start]))
    ) {
      throw new HttpError(
        400,
        `Cannot read the HTTP head: byte 0x${
          buffer[start].toString(16).padStart(2, "0")
        } cannot start one (is the peer speaking TLS to a plain port?)`,
      );
    }
    const end = findBlankLine(buffer, Math.max(start, scanned - 3), length);
    if (end !== -1) {
      if (end - start > maxHeadBytes) throw headTooLarge(maxHeadBytes);
      return {
        head: buffer.subarray(start, end),
        rest: buffer.subarray(end, length),
      };
    }
    scanned = length;
    if (length - start > maxHeadBytes) throw headTooLarge(maxHeadBytes);
    if (buffer.length - length < readSize) {
      buffer = grow(buffer, length + readSize);
    }
    const n = await readWithSignal(
      reader,
      buffer.subarray(length, length + readSize),
      signal,
    );
    readSize = READ_SIZE;
    if (n === null) {
      if (length === start) return null;
      throw new HttpError(
        400,
        `Cannot read the HTTP head: the connection closed after ${
          length - start
        } bytes of it`,
      );
    }
    length += n;
  }
}

function headTooLarge(maxHeadBytes: number): HttpError {
  return new HttpError(
    431,
    `Cannot read the HTTP head: it is larger than the limit of ${maxHeadBytes} bytes`,
  );
}

/** Returns a buffer of at least `size` bytes holding `buffer`'s bytes. */
function grow(
  buffer: Uint8Array<ArrayBuffer>,
  size: number,
): Uint8Array<ArrayBuffer> {
  if (buffer.length >= size) return buffer;
  const bigger = new Uint8Array(Math.max(size, buffer.length * 2));
  bigger.set(buffer);
  return bigger;
}

/** Index just past the first CRLF CRLF at or after `from`, or -1. */
function findBlankLine(buffer: Uint8Array, from: number, to: number): number {
  for (let i = buffer.indexOf(LF, from); i !== -1 && i < to;) {
    if (
      i + 2 < to && buffer[i - 1] === CR && buffer[i + 1] === CR &&
      buffer[i + 2] === LF
    ) {
      return i + 3;
    }
    i = buffer.indexOf(LF, i + 1);
  }
  return -1;
}

/**
 * One read that an abort interrupts. The abandoned read is still observed so
 * it can never reject unhandled; the caller closes the connection anyway.
 */
function readWithSignal(
  reader: HeadReader,
  into: Uint8Array,
  signal: AbortSignal | undefined,
): Promise<number | null> {
  const read = reader.read(into);
  if (signal === undefined) return read;
  read.catch(() => {});
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    if (signal.aborted) return onAbort();
    signal.addEventListener("abort", onAbort, { once: true });
    read.then(resolve, reject).finally(() =>
      signal.removeEventListener("abort", onAbort)
    );
  });
}

/**
 * Parses a request head read by {@linkcode readHead}. Checks the request line
 * (RFC 9112 section 3), the field lines (section 5) and that an HTTP/1.1
 * request has exactly one `Host` (section 3.2).
 *
 * @throws {HttpError} 400 for any malformed line, 414 for a long request line,
 * 431 for too many fields, 505 for an HTTP version other than 1.0 or 1.1.
 */
export function parseRequestHead(
  head: Uint8Array,
  options: ParseRequestOptions = {},
): RequestHead {
  const maxLine = options.maxRequestLineBytes ??
    DEFAULT_MAX_REQUEST_LINE_BYTES;
  const lines = splitLines(head);
  const line = lines[0];
  if (line.length > maxLine) {
    throw new HttpError(
      414,
      `Cannot parse the request line: it is longer than the limit of ${maxLine} bytes`,
    );
  }
  const match = REQUEST_LINE.exec(line);
  if (match === null) {
    throw new HttpError(
      400,
      `Cannot parse the request line ${
        quote(line)
      }: expected a method, a target and an HTTP version`,
    );
  }
  const version = checkVersion(match[3]);
  const fields: Fields = Object.create(null);
  let hosts = 0;
  parseFields(
    lines,
    options.maxHeaders ?? DEFAULT_MAX_HEADERS,
    (name, value) => {
      const key = name.toLowerCase();
      if (key === "host") hosts++;
      const seen = fields[key];
      fields[key] = seen === undefined ? value : `${seen}, ${value}`;
    },
  );
  if (version === "HTTP/1.1" && hosts !== 1) {
    throw new HttpError(
      400,
      `Cannot accept the request: it has ${hosts} Host headers where HTTP/1.1 requires exactly one`,
    );
  }
  if (hosts > 1) {
    throw new HttpError(
      400,
      `Cannot accept the request: it has ${hosts} Host headers`,
    );
  }
  return { method: match[1], target: match[2], version, fields };
}

/**
 * Parses a response head read by {@linkcode readHead} (RFC 9112 section 4).
 *
 * @throws {HttpError} 400 for a malformed status line or field line, 505 for
 * an HTTP version other than 1.0 or 1.1.
 */
export function parseResponseHead(head: Uint8Array): ResponseHead {
  const lines = splitLines(head);
  const match = /^(HTTP\/\d\.\d) (\d{3})(?: ([\t\x20-\x7e\x80-\xff]*))?$/.exec(
    lines[0],
  );
  if (match === null) {
    throw new HttpError(
      400,
      `Cannot parse the status line ${
        quote(lines[0])
      }: expected an HTTP version, a three-digit status and a reason`,
    );
  }
  const version = checkVersion(match[1]);
  const headers = new Headers();
  parseFields(lines, Infinity, (name, value) => headers.append(name, value));
  return {
    status: Number(match[2]),
    statusText: match[3] ?? "",
    version,
    headers,
  };
}

function checkVersion(version: string): "HTTP/1.0" | "HTTP/1.1" {
  if (version === "HTTP/1.1" || version === "HTTP/1.0") return version;
  throw new HttpError(
    505,
    `Cannot accept the message: HTTP version ${version} is not supported`,
  );
}

/**
 * Splits a head into its lines (without the blank line). Bytes are kept one
 * per character (latin1) so nothing is lost or replaced; a bare CR or LF is
 * refused because parsers that disagree on line ends enable request
 * smuggling (RFC 9112 section 2.2).
 */
function splitLines(head: Uint8Array): string[] {
  const text = latin1(head);
  if (!text.endsWith("\r\n\r\n")) {
    throw new HttpError(
      400,
      "Cannot parse the HTTP head: it does not end with an empty line",
    );
  }
  const lines = text.slice(0, -4).split("\r\n");
  for (const line of lines) {
    if (line.includes("\r") || line.includes("\n")) {
      throw new HttpError(
        400,
        `Cannot parse the HTTP head: the line ${
          quote(line)
        } holds a bare CR or LF`,
      );
    }
  }
  return lines;
}

/** Decodes ASCII: on it UTF-8 and latin1 agree, and decoding is one call. */
const ascii = new TextDecoder();

/**
 * Bytes as characters of the same codes. An ASCII head, the usual one, is
 * decoded at once: spreading bytes into `fromCharCode` arguments costs tens
 * of bytes of garbage per byte, on every request.
 */
function latin1(bytes: Uint8Array): string {
  if (bytes.every((byte) => byte < 0x80)) return ascii.decode(bytes);
  let text = "";
  for (let i = 0; i < bytes.length; i += 8192) {
    text += String.fromCharCode(...bytes.subarray(i, i + 8192));
  }
  return text;
}

const TCHAR = "[!#$%&'*+\\-.^_`|~0-9A-Za-z]";
/** RFC 9110 section 5.6.2 tchar: one character of a token. */
export const TOKEN_CHAR = new RegExp(TCHAR);
/** RFC 9110 section 5.6.2 token (methods, field names, subprotocols). */
export const TOKEN = new RegExp(`^${TCHAR}+$`);
// RFC 9112 section 3: method SP request-target SP HTTP-version.
const REQUEST_LINE = new RegExp(
  `^(${TCHAR}+) ([\\x21-\\x7e\\x80-\\xff]+) (HTTP/\\d\\.\\d)$`,
);
const FIELD_LINE = new RegExp(`^(${TCHAR}+):[\\t ]*(.*?)[\\t ]*$`);
// Field values: visible characters, SP, HTAB and obs-text (RFC 9110 5.5).
const FIELD_VALUE = /^[\t\x20-\x7e\x80-\xff]*$/;

/** Checks the field lines of a head and passes each field to `add`. */
function parseFields(
  lines: string[],
  maxHeaders: number,
  add: (name: string, value: string) => void,
): void {
  if (lines.length - 1 > maxHeaders) {
    throw new HttpError(
      431,
      `Cannot accept the HTTP head: it has ${
        lines.length - 1
      } header fields, more than the limit of ${maxHeaders}`,
    );
  }
  for (let i = 1; i < lines.length; i++) {
    const line = lines[i];
    if (line[0] === " " || line[0] === "\t") {
      // RFC 9112 section 5.2: obs-fold is refused with 400 by a server.
      throw new HttpError(
        400,
        `Cannot parse the header line ${
          quote(line)
        }: obsolete line folding is not accepted`,
      );
    }
    const match = FIELD_LINE.exec(line);
    if (match === null || !FIELD_VALUE.test(match[2])) {
      throw new HttpError(
        400,
        `Cannot parse the header line ${
          quote(line)
        }: expected a token name, a colon and a value without control characters`,
      );
    }
    add(match[1], match[2]);
  }
}

/** Quotes a line for an error message, shortened so errors stay readable. */
function quote(line: string): string {
  const short = line.length > 64 ? line.slice(0, 64) + "..." : line;
  return JSON.stringify(short);
}

/** Reason phrases for the statuses this server and most handlers send. */
export const STATUS_TEXT: Readonly<Record<number, string>> = {
  100: "Continue",
  200: "OK",
  201: "Created",
  202: "Accepted",
  204: "No Content",
  206: "Partial Content",
  301: "Moved Permanently",
  302: "Found",
  303: "See Other",
  304: "Not Modified",
  307: "Temporary Redirect",
  308: "Permanent Redirect",
  400: "Bad Request",
  401: "Unauthorized",
  403: "Forbidden",
  404: "Not Found",
  405: "Method Not Allowed",
  408: "Request Timeout",
  409: "Conflict",
  410: "Gone",
  411: "Length Required",
  413: "Content Too Large",
  414: "URI Too Long",
  415: "Unsupported Media Type",
  426: "Upgrade Required",
  429: "Too Many Requests",
  431: "Request Header Fields Too Large",
  500: "Internal Server Error",
  501: "Not Implemented",
  502: "Bad Gateway",
  503: "Service Unavailable",
  504: "Gateway Timeout",
  505: "HTTP Version Not Supported",
};
