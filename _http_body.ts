// Request bodies (RFC 9112 section 6): how one is delimited, refusing what a
// front end and a back end could read differently, and decoding it, plain or
// chunked, from the connection's buffered bytes.

import { HttpError, type RequestHead } from "./_http.ts";

/** How a request body is delimited (RFC 9112 section 6.3). */
export type Framing =
  | { kind: "length"; remaining: number }
  | {
    kind: "chunked";
    state: "size" | "data" | "crlf" | "done";
    remaining: number;
  };

/** Where a body's bytes come from: the connection, past the request head. */
export interface BodySource {
  /** Up to `max` bytes, or null at EOF. */
  take(max: number): Promise<Uint8Array | null>;
  /** One CRLF-terminated line, without the CRLF. */
  readLine(): Promise<string>;
  /** Most bytes the trailer fields of a chunked body may take. */
  readonly maxTrailerBytes: number;
}

/**
 * How the request body is delimited (RFC 9112 section 6.3). Anything a
 * front end and a back end could read differently is refused, because that
 * disagreement is what request smuggling exploits.
 */
export function bodyFraming(head: RequestHead): Framing {
  const transferEncoding = head.fields["transfer-encoding"] ?? null;
  const contentLength = head.fields["content-length"] ?? null;
  if (transferEncoding !== null) {
    if (contentLength !== null) {
      throw new HttpError(
        400,
        "Cannot read the request: it has both Content-Length and Transfer-Encoding",
      );
    }
    if (head.version === "HTTP/1.0") {
      throw new HttpError(
        400,
        "Cannot read the request: Transfer-Encoding is not allowed in HTTP/1.0",
      );
    }
    const codings = transferEncoding.split(",").map((c) =>
      c.trim().toLowerCase()
    );
    const chunkedAt = codings.indexOf("chunked");
    if (chunkedAt !== codings.length - 1 || codings.length === 0) {
      throw new HttpError(
        400,
        `Cannot read the request: Transfer-Encoding ${
          JSON.stringify(transferEncoding.slice(0, 64))
        } does not end with a single chunked`,
      );
    }
    if (codings.length > 1) {
      throw new HttpError(
        501,
        `Cannot read the request: Transfer-Encoding ${
          JSON.stringify(transferEncoding.slice(0, 64))
        } is not supported`,
      );
    }
    return { kind: "chunked", state: "size", remaining: 0 };
  }
  if (contentLength === null) return { kind: "length", remaining: 0 };
  // Repeated fields arrive joined with ", "; equal copies are tolerated.
  const values = new Set(contentLength.split(",").map((v) => v.trim()));
  const [value] = values;
  if (values.size !== 1 || !/^\d{1,15}$/.test(value)) {
    throw new HttpError(
      400,
      `Cannot read the request: Content-Length ${
        JSON.stringify(contentLength.slice(0, 64))
      } is not a single decimal length`,
    );
  }
  return { kind: "length", remaining: Number(value) };
}

/** Whether every byte of the body has been read. */
export function bodyFinished(framing: Framing): boolean {
  return framing.kind === "length"
    ? framing.remaining === 0
    : framing.state === "done";
}

export function truncatedBody(): HttpError {
  return new HttpError(
    400,
    "Cannot read the request body: the connection closed before its end",
  );
}

/**
 * The next piece of a request body, or null at its end, read from `source`
 * as `framing` says; `framing` keeps the decoder's place between calls.
 */
export async function nextBodyPiece(
  framing: Framing,
  source: BodySource,
): Promise<Uint8Array | null> {
  if (framing.kind === "length") {
    if (framing.remaining === 0) return null;
    const piece = await source.take(framing.remaining);
    if (piece === null) throw truncatedBody();
    framing.remaining -= piece.length;
    return piece;
  }
  for (;;) {
    switch (framing.state) {
      case "done":
        return null;
      case "size": {
        const line = await source.readLine();
        // chunk-size [ chunk-ext ] (RFC 9112 section 7.1); extensions are
        // ignored but must not hold control characters.
        const match = /^([0-9A-Fa-f]{1,13})[\t ]*(?:;[\t\x20-\x7e\x80-\xff]*)?$/
          .exec(line);
        if (match === null) {
          throw new HttpError(
            400,
            `Cannot read the request body: bad chunk size line ${
              JSON.stringify(line.slice(0, 32))
            }`,
          );
        }
        framing.remaining = parseInt(match[1], 16);
        if (framing.remaining === 0) {
          await skipTrailers(source);
          framing.state = "done";
          return null;
        }
        framing.state = "data";
        break;
      }
      case "data": {
        const piece = await source.take(framing.remaining);
        if (piece === null) throw truncatedBody();
        framing.remaining -= piece.length;
        if (framing.remaining === 0) framing.state = "crlf";
        return piece;
      }
      case "crlf": {
        const line = await source.readLine();
        if (line !== "") {
          throw new HttpError(
            400,
            "Cannot read the request body: a chunk is longer than its size",
          );
        }
        framing.state = "size";
        break;
      }
    }
  }
}

/** Trailer fields end a chunked body; they are read and ignored. */
async function skipTrailers(source: BodySource): Promise<void> {
  let total = 0;
  for (;;) {
    const line = await source.readLine();
    if (line === "") return;
    total += line.length + 2;
    if (total > source.maxTrailerBytes) {
      throw new HttpError(
        431,
        "Cannot read the request body: its trailer fields are too large",
      );
    }
  }
}
