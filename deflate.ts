/**
 * permessage-deflate (RFC 7692): negotiating the extension in the opening
 * handshake. `Upgrader` and `Dialer` do this for you when `enableCompression`
 * is set; the functions here are for code that runs its own handshake and
 * builds a `Conn` with the negotiated {@linkcode DeflateParameters}.
 *
 * Messages are compressed with the web-standard `CompressionStream` and
 * inflated with `DecompressionStream`, by default with no context takeover in
 * either direction (RFC 7692 section 7.1.1): every message is compressed on
 * its own, so no sender keeps a compression window between messages. With
 * `contextTakeover`, each direction the peer agrees to keeps its window
 * (browsers and ws do by default), through one node:zlib stream per
 * connection and direction: later messages refer back into earlier ones and
 * compress better. The inflated size of a received message is bounded by the
 * connection's read limit while it is inflated, so a decompression bomb is
 * refused (close 1009) without being expanded, with either engine.
 *
 * `CompressionStream` has no level and always uses a 32 KiB window. With a
 * compression level set (`compressionLevel`, `conn.setCompressionLevel()`), or
 * when the peer allows only a smaller window (`server_max_window_bits` or
 * `client_max_window_bits` from 9 to 14), messages are compressed with
 * node:zlib instead, which honours both. A peer that allows only 8 bits gets
 * every message uncompressed, which RFC 7692 section 6 allows: zlib widens a
 * raw 8-bit window to 9.
 *
 * @example Negotiating on both sides
 * ```ts title="A server and a client agree on permessage-deflate"
 * import assert from "node:assert/strict";
 * import { acceptDeflateResponse, DEFLATE_OFFER, negotiateDeflate } from "@denows/websocket";
 *
 * // The client sends DEFLATE_OFFER in Sec-WebSocket-Extensions...
 * const negotiated = negotiateDeflate(DEFLATE_OFFER);
 * assert.ok(negotiated);
 * // ...the server answers with negotiated.header...
 * const parameters = acceptDeflateResponse(negotiated.header);
 * // ...and both sides build their Conn with the same parameters.
 * assert.deepEqual(parameters, negotiated.parameters);
 * ```
 *
 * @module
 */

import { TOKEN, TOKEN_CHAR } from "./_http.ts";

/** The registered name of the extension (RFC 7692 section 5). */
const EXTENSION_NAME = "permessage-deflate";

/**
 * What the client offers in `Sec-WebSocket-Extensions` (RFC 7692 section 5):
 * permessage-deflate with no context takeover in either direction, and
 * `client_max_window_bits` without a value: the server may limit the
 * client's window (section 7.1.2.2).
 *
 * @example Offering compression in a handshake request
 * ```ts title="The offer in a request's headers"
 * import assert from "node:assert/strict";
 * import { DEFLATE_OFFER } from "@denows/websocket";
 *
 * const headers = new Headers({ "Sec-WebSocket-Extensions": DEFLATE_OFFER });
 * assert.match(headers.get("sec-websocket-extensions")!, /^permessage-deflate;/);
 * ```
 */
export const DEFLATE_OFFER =
  "permessage-deflate; server_no_context_takeover; client_no_context_takeover; client_max_window_bits";

/**
 * What the client offers with `contextTakeover`: both ends may compress with
 * context takeover (RFC 7692 section 7.1.1); the client does unless the
 * server answers `client_no_context_takeover`.
 *
 * @example The offer of a Dialer with contextTakeover
 * ```ts title="No *_no_context_takeover in it"
 * import assert from "node:assert/strict";
 * import { DEFLATE_TAKEOVER_OFFER } from "@denows/websocket";
 *
 * assert.doesNotMatch(DEFLATE_TAKEOVER_OFFER, /no_context_takeover/);
 * ```
 */
export const DEFLATE_TAKEOVER_OFFER =
  "permessage-deflate; client_max_window_bits";

/** Options of {@linkcode negotiateDeflate} and {@linkcode acceptDeflateResponse}. */
export interface DeflateNegotiationOptions {
  /**
   * Use context takeover (RFC 7692 section 7.1.1) in each direction the
   * peer does not refuse: a message may refer back into the ones before
   * it, which makes small, similar messages much smaller. It costs memory:
   * per direction a 32 KiB window for the connection's life, and while
   * messages flow the zlib state (about 250 KiB to compress at 15 window
   * bits, 20-40 KiB to inflate), freed after a second of idleness and rebuilt
   * from the window. A prepared message is then compressed for each
   * connection rather than once. Default false: no context takeover either
   * way.
   */
  contextTakeover?: boolean;
}

/**
 * The permessage-deflate parameters both ends agreed on in the handshake
 * (RFC 7692 section 7.1): what `Conn` needs to compress and inflate.
 *
 * @example Parameters of a peer that limits the server's window
 * ```ts title="server_max_window_bits=10: the server compresses with a 1 KiB window"
 * import assert from "node:assert/strict";
 * import { type DeflateParameters, negotiateDeflate } from "@denows/websocket";
 *
 * const parameters: DeflateParameters | undefined = negotiateDeflate(
 *   "permessage-deflate; server_max_window_bits=10",
 * )?.parameters;
 * assert.equal(parameters?.serverMaxWindowBits, 10);
 * assert.equal(parameters?.clientMaxWindowBits, 15);
 * ```
 */
export interface DeflateParameters {
  /** The server compresses each message on its own (section 7.1.1.1). */
  readonly serverNoContextTakeover: boolean;
  /** The client compresses each message on its own (section 7.1.1.2). */
  readonly clientNoContextTakeover: boolean;
  /**
   * Base-2 logarithm of the largest LZ77 window the server compresses with,
   * 8 to 15 (section 7.1.2.1). At 8 the server sends uncompressed.
   */
  readonly serverMaxWindowBits: number;
  /**
   * Base-2 logarithm of the largest LZ77 window the client compresses with,
   * 8 to 15 (section 7.1.2.2). At 8 the client sends uncompressed.
   */
  readonly clientMaxWindowBits: number;
}

/**
 * The server's outcome of {@linkcode negotiateDeflate}.
 *
 * @example Writing the answer into the 101 response
 * ```ts title="The header goes into Sec-WebSocket-Extensions"
 * import assert from "node:assert/strict";
 * import { type DeflateNegotiation, negotiateDeflate } from "@denows/websocket";
 *
 * const negotiation: DeflateNegotiation | undefined = negotiateDeflate(
 *   "permessage-deflate",
 * );
 * const headers = new Headers({ Upgrade: "websocket" });
 * if (negotiation) headers.set("Sec-WebSocket-Extensions", negotiation.header);
 * assert.ok(headers.get("sec-websocket-extensions")?.startsWith("permessage-deflate"));
 * ```
 */
export interface DeflateNegotiation {
  /** What the connection uses: pass it to `Conn` as `compression`. */
  parameters: DeflateParameters;
  /** The `Sec-WebSocket-Extensions` value to send in the 101 response. */
  header: string;
}

/**
 * The server's `Sec-WebSocket-Extensions` answer could not be accepted by the
 * client: the handshake must fail (RFC 6455 section 4.1, RFC 7692 section
 * 5).
 *
 * @example Telling a refused answer apart
 * ```ts title="Catching the error"
 * import assert from "node:assert/strict";
 * import { acceptDeflateResponse, ExtensionNegotiationError } from "@denows/websocket";
 *
 * try {
 *   acceptDeflateResponse("x-unknown-extension");
 *   assert.fail("the answer was accepted");
 * } catch (error) {
 *   assert.ok(error instanceof ExtensionNegotiationError);
 *   assert.equal(error.name, "ExtensionNegotiationError");
 *   assert.match(error.message, /"x-unknown-extension" was not offered/);
 * }
 * ```
 */
export class ExtensionNegotiationError extends Error {
  /**
   * Creates the error.
   *
   * @param message What was wrong with the answer.
   * @param options The underlying cause, if any.
   */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ExtensionNegotiationError";
  }
}

/**
 * Picks the first permessage-deflate offer in a client's
 * `Sec-WebSocket-Extensions` header that this library can honour (RFC 7692
 * section 5). Offers with an unknown or repeated parameter, a missing or
 * invalid value, or a malformed syntax are declined and the next one is tried;
 * other extensions are ignored.
 *
 * Without `contextTakeover` the answer asks for no context takeover in both
 * directions; with it, only for those the client asked for. An offer's
 * `server_max_window_bits` is echoed as section 7.1.2.1 requires, and the
 * server compresses within it (see the module docs).
 *
 * @param offers The request's `Sec-WebSocket-Extensions` value (several header
 * lines joined with commas, as `Headers.get` does), or null when absent.
 * @param options `contextTakeover`: both ends may keep their window (the
 * answer then leaves out the `*_no_context_takeover` the client did not
 * offer).
 * @returns The parameters and the response header, or undefined when no offer
 * can be accepted (the 101 then carries no `Sec-WebSocket-Extensions`).
 *
 * @example Accepting a browser's offer
 * ```ts title="The first acceptable offer wins"
 * import assert from "node:assert/strict";
 * import { negotiateDeflate } from "@denows/websocket";
 *
 * const result = negotiateDeflate(
 *   "permessage-deflate; client_max_window_bits, x-webkit-deflate-frame",
 * );
 * assert.equal(
 *   result?.header,
 *   "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
 * );
 * assert.equal(result?.parameters.serverMaxWindowBits, 15);
 * assert.equal(negotiateDeflate("permessage-deflate; x=1"), undefined);
 * ```
 */
export function negotiateDeflate(
  offers: string | null,
  options?: DeflateNegotiationOptions,
): DeflateNegotiation | undefined {
  if (offers === null) return undefined;
  const takeover = options?.contextTakeover ?? false;
  for (const extension of parseExtensions(offers)) {
    if (extension === undefined || extension.name !== EXTENSION_NAME) continue;
    const offer = readParameters(extension.params);
    if (typeof offer === "string") continue; // declined: try the next offer
    const serverMaxWindowBits = offer.serverMaxWindowBits ?? 15;
    // Either *_no_context_takeover may always be answered (sections 7.1.1.1
    // and 7.1.1.2); with takeover allowed, only what the client offered is.
    const serverNoContextTakeover = !takeover || offer.serverNoContextTakeover;
    const clientNoContextTakeover = !takeover || offer.clientNoContextTakeover;
    let header = EXTENSION_NAME;
    if (serverNoContextTakeover) header += "; server_no_context_takeover";
    if (clientNoContextTakeover) header += "; client_no_context_takeover";
    if (offer.serverMaxWindowBits !== undefined) {
      header += `; server_max_window_bits=${serverMaxWindowBits}`;
    }
    // client_max_window_bits is left out of the answer: we inflate any window,
    // so the client keeps whatever it announced (section 7.1.2.2).
    return {
      parameters: {
        serverNoContextTakeover,
        clientNoContextTakeover,
        serverMaxWindowBits,
        clientMaxWindowBits: 15,
      },
      header,
    };
  }
  return undefined;
}

/**
 * Checks the server's `Sec-WebSocket-Extensions` answer against
 * {@linkcode DEFLATE_OFFER}: it may hold permessage-deflate once, with
 * `server_no_context_takeover` (which we asked for and rely on), optionally
 * `client_no_context_takeover`, `server_max_window_bits` and
 * `client_max_window_bits` with a value (the client then compresses within
 * that window), and nothing else.
 *
 * @param response The response's `Sec-WebSocket-Extensions` value, or null.
 * @param options `offered: false` when the request carried no offer: any
 * extension in the answer is then refused (default true).
 * `contextTakeover`: the offer was {@linkcode DEFLATE_TAKEOVER_OFFER}, so
 * an answer without `server_no_context_takeover` is accepted, and the client
 * keeps its window unless the answer has `client_no_context_takeover`.
 * @returns The negotiated parameters, or undefined when the server declined
 * compression (no extension in the answer).
 * @throws {ExtensionNegotiationError} When the answer is malformed, names an
 * extension or parameter that was not offered, or leaves out
 * `server_no_context_takeover`.
 *
 * @example Validating an answer
 * ```ts title="Good and bad answers"
 * import assert from "node:assert/strict";
 * import { acceptDeflateResponse, ExtensionNegotiationError } from "@denows/websocket";
 *
 * const parameters = acceptDeflateResponse(
 *   "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
 * );
 * assert.equal(parameters?.clientMaxWindowBits, 15);
 * assert.equal(acceptDeflateResponse(null), undefined);
 * assert.equal(
 *   acceptDeflateResponse(
 *     "permessage-deflate; server_no_context_takeover; client_max_window_bits=10",
 *   )?.clientMaxWindowBits,
 *   10,
 * );
 * assert.throws(
 *   () => acceptDeflateResponse("permessage-deflate; client_max_window_bits=10"),
 *   ExtensionNegotiationError,
 * );
 * ```
 */
export function acceptDeflateResponse(
  response: string | null,
  options?: { offered?: boolean } & DeflateNegotiationOptions,
): DeflateParameters | undefined {
  if (response === null) return undefined;
  const offered = options?.offered ?? true;
  const fail = (reason: string) =>
    new ExtensionNegotiationError(
      `Cannot accept the server's Sec-WebSocket-Extensions "${response}": ${reason}`,
    );
  let result: DeflateParameters | undefined;
  for (const extension of parseExtensions(response)) {
    if (extension === undefined) throw fail("the header is malformed");
    if (!offered || extension.name !== EXTENSION_NAME) {
      throw fail(`extension "${extension.name}" was not offered`);
    }
    if (result !== undefined) {
      throw fail(`extension "${EXTENSION_NAME}" appears more than once`);
    }
    const answer = readParameters(extension.params);
    if (typeof answer === "string") throw fail(answer);
    if (answer.clientMaxWindowBits === null) {
      throw fail(
        'parameter "client_max_window_bits" needs a value in an answer',
      );
    }
    const takeover = options?.contextTakeover ?? false;
    if (!answer.serverNoContextTakeover && !takeover) {
      throw fail('parameter "server_no_context_takeover" is missing');
    }
    result = {
      serverNoContextTakeover: answer.serverNoContextTakeover,
      // Without takeover the offer had client_no_context_takeover, which
      // binds the client whatever the answer (section 7.1.1.2).
      clientNoContextTakeover: answer.clientNoContextTakeover || !takeover,
      serverMaxWindowBits: answer.serverMaxWindowBits ?? 15,
      clientMaxWindowBits: answer.clientMaxWindowBits ?? 15,
    };
  }
  return result;
}

/** One element of an extension list: its name and parameters, in order. */
interface Extension {
  name: string; // lower-cased
  params: [name: string, value: string | undefined][]; // names lower-cased
}

/** The permessage-deflate parameters of one offer or answer, as sent. */
interface RawParameters {
  serverNoContextTakeover: boolean;
  clientNoContextTakeover: boolean;
  serverMaxWindowBits?: number;
  /** null: present without a value (allowed in offers, section 7.1.2.2). */
  clientMaxWindowBits?: number | null;
}

/**
 * Validates permessage-deflate parameters (RFC 7692 section 7.1). Returns the
 * reason as a string when they cannot be honoured: an unknown or repeated
 * name, a value where none belongs, or a window size outside 8 to 15.
 */
function readParameters(
  params: Extension["params"],
): RawParameters | string {
  const result: RawParameters = {
    serverNoContextTakeover: false,
    clientNoContextTakeover: false,
  };
  const seen = new Set<string>();
  for (const [name, value] of params) {
    if (seen.has(name)) return `parameter "${name}" appears more than once`;
    seen.add(name);
    switch (name) {
      case "server_no_context_takeover":
      case "client_no_context_takeover":
        if (value !== undefined) return `parameter "${name}" takes no value`;
        if (name === "server_no_context_takeover") {
          result.serverNoContextTakeover = true;
        } else {
          result.clientNoContextTakeover = true;
        }
        break;
      case "server_max_window_bits": {
        const bits = value === undefined ? undefined : parseWindowBits(value);
        if (bits === undefined) {
          return `parameter "${name}" needs a value from 8 to 15`;
        }
        result.serverMaxWindowBits = bits;
        break;
      }
      case "client_max_window_bits": {
        // In an offer the value is optional: the client only announces that
        // it could honour a limit (section 7.1.2.2).
        const bits = value === undefined ? null : parseWindowBits(value);
        if (bits === undefined) {
          return `parameter "${name}" has a value outside 8 to 15`;
        }
        result.clientMaxWindowBits = bits;
        break;
      }
      default:
        return `parameter "${name}" is unknown`;
    }
  }
  return result;
}

/** A window size is 1*DIGIT in 8 to 15 (RFC 7692 section 7.1.2.1). */
function parseWindowBits(value: string): number | undefined {
  if (!/^[0-9]{1,3}$/.test(value)) return undefined;
  const bits = Number(value);
  return bits >= 8 && bits <= 15 ? bits : undefined;
}

/**
 * Parses an extension list (RFC 6455 section 9.1):
 *
 *     extension-list = 1#extension
 *     extension = extension-token *( ";" extension-param )
 *     extension-param = token [ "=" (token | quoted-string) ]
 *
 * with optional whitespace around the separators and empty list elements
 * allowed (RFC 9110 section 5.6.1). A malformed element yields undefined in
 * its place and parsing resumes after the next comma outside a quoted string,
 * so one bad offer does not hide the others.
 */
function parseExtensions(header: string): (Extension | undefined)[] {
  const result: (Extension | undefined)[] = [];
  let pos = 0;

  const skipSpace = () => {
    while (header[pos] === " " || header[pos] === "\t") pos++;
  };
  const readToken = (): string | undefined => {
    const start = pos;
    while (pos < header.length && TOKEN_CHAR.test(header[pos])) pos++;
    return pos > start ? header.slice(start, pos) : undefined;
  };
  // A quoted string's value after unescaping must itself be a token.
  const readQuoted = (): string | undefined => {
    let value = "";
    pos++; // opening quote
    while (pos < header.length) {
      const char = header[pos++];
      if (char === '"') return TOKEN.test(value) ? value : undefined;
      if (char === "\\") {
        if (pos >= header.length) return undefined;
        value += header[pos++];
      } else {
        value += char;
      }
    }
    return undefined; // unterminated
  };
  const readElement = (): Extension | undefined => {
    const name = readToken();
    if (name === undefined) return undefined;
    const extension: Extension = { name: name.toLowerCase(), params: [] };
    skipSpace();
    while (header[pos] === ";") {
      pos++;
      skipSpace();
      const param = readToken();
      if (param === undefined) return undefined;
      skipSpace();
      let value: string | undefined;
      if (header[pos] === "=") {
        pos++;
        skipSpace();
        value = header[pos] === '"' ? readQuoted() : readToken();
        if (value === undefined) return undefined;
        skipSpace();
      }
      extension.params.push([param.toLowerCase(), value]);
    }
    return pos === header.length || header[pos] === "," ? extension : undefined;
  };
  // Moves past the next comma that is not inside a quoted string.
  const skipElement = () => {
    let quoted = false;
    for (; pos < header.length; pos++) {
      const char = header[pos];
      if (quoted && char === "\\") pos++;
      else if (char === '"') quoted = !quoted;
      else if (char === "," && !quoted) return;
    }
  };

  while (pos < header.length) {
    skipSpace();
    if (pos >= header.length) break;
    if (header[pos] === ",") {
      pos++;
      continue;
    }
    const extension = readElement();
    if (extension === undefined) skipElement();
    result.push(extension);
    if (header[pos] === ",") pos++;
  }
  return result;
}
