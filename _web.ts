// What the two web-standard shapes share (websocket.ts: WHATWG WebSocket;
// stream.ts: WebSocketStream): the URL and close() checks of the WHATWG
// WebSockets standard, with its DOMException names, and the extensions
// string that a socket reports.

import type { DeflateParameters } from "./deflate.ts";
import { CLOSE_CODE } from "./frame.ts";

const encoder = new TextEncoder();
/** RFC 6455 section 5.5: a control payload of 125 bytes, 2 of them the code. */
const MAX_REASON_BYTES = 123;

/**
 * WHATWG WebSockets § The WebSocket interface, constructor steps 1-8: the
 * URL parsed, `http:` and `https:` mapped to `ws:` and `wss:`, no fragment
 * (`ws+unix:` is kept for the Dialer). `what` names the API in errors.
 */
export function parseWebSocketUrl(url: string | URL, what: string): URL {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch (cause) {
    throw new DOMException(
      `Cannot open ${what}: ${JSON.stringify(String(url))} is not a valid URL${
        cause instanceof Error ? `: ${cause.message}` : ""
      }`,
      "SyntaxError",
    );
  }
  if (parsed.protocol === "http:") parsed.protocol = "ws:";
  else if (parsed.protocol === "https:") parsed.protocol = "wss:";
  if (!["ws:", "wss:", "ws+unix:"].includes(parsed.protocol)) {
    throw new DOMException(
      `Cannot open ${what}: the scheme must be ws:, wss:, http: or https:, not ${parsed.protocol}`,
      "SyntaxError",
    );
  }
  // An empty fragment ("#") leaves `hash` empty but is a fragment still.
  if (parsed.hash !== "" || String(url).includes("#")) {
    throw new DOMException(
      `Cannot open ${what}: a WebSocket URL has no fragment`,
      "SyntaxError",
    );
  }
  return parsed;
}

/**
 * WHATWG WebSockets § close() steps 1-2: the code, clamped as WebIDL
 * `[Clamp] unsigned short`, must be 1000 or 3000-4999 (`InvalidAccessError`);
 * the reason at most 123 bytes of UTF-8 (`SyntaxError`). `action` names what
 * was attempted in errors.
 */
export function checkClose(
  code: number | undefined,
  reason: string | undefined,
  action: string,
): { code: number | undefined; reason: string } {
  if (code !== undefined) {
    code = Math.min(Math.max(Math.round(Number(code) || 0), 0), 0xffff);
    if (code !== CLOSE_CODE.NormalClosure && !(code >= 3000 && code <= 4999)) {
      throw new DOMException(
        `Cannot ${action}: the close code must be 1000 or in 3000-4999, got ${code}`,
        "InvalidAccessError",
      );
    }
  }
  const text = reason === undefined ? "" : String(reason);
  const length = encoder.encode(text).length;
  if (length > MAX_REASON_BYTES) {
    throw new DOMException(
      `Cannot ${action}: the close reason is ${length} bytes, over ${MAX_REASON_BYTES}`,
      "SyntaxError",
    );
  }
  return { code, reason: text };
}

/** The `Sec-WebSocket-Extensions` value that gives these parameters. */
export function formatExtensions(
  parameters: DeflateParameters | undefined,
): string {
  if (parameters === undefined) return "";
  let header = "permessage-deflate";
  if (parameters.serverNoContextTakeover) {
    header += "; server_no_context_takeover";
  }
  if (parameters.clientNoContextTakeover) {
    header += "; client_no_context_takeover";
  }
  if (parameters.serverMaxWindowBits < 15) {
    header += `; server_max_window_bits=${parameters.serverMaxWindowBits}`;
  }
  if (parameters.clientMaxWindowBits < 15) {
    header += `; client_max_window_bits=${parameters.clientMaxWindowBits}`;
  }
  return header;
}
