// Tunnels to the server through a proxy (HTTP CONNECT, SOCKS5) and the
// choice of proxy from the environment, as Go's net/http makes it.

import type { ConnectAddress } from "@denows/websocket";
import { readResponse, withErrorBody } from "./_response.ts";
import { writeAll } from "./_io.ts";
import { encodeBase64 } from "./_handshake.ts";

const encoder = new TextEncoder();

/**
 * A proxy refused to open the tunnel. For an HTTP proxy `status` is its HTTP
 * status (407 when it wants credentials) and `response` its answer; for a
 * SOCKS5 proxy `status` is the SOCKS reply code and `response` is absent.
 *
 * @example Reading a proxy's refusal
 * ```ts title="ProxyError"
 * import assert from "node:assert/strict";
 * import { Dialer, ProxyError } from "@denows/websocket";
 *
 * const proxy = Deno.serve(
 *   { hostname: "127.0.0.1", port: 0, onListen() {} },
 *   () => new Response(null, { status: 407 }),
 * );
 * const dialer = new Dialer({
 *   proxy: () => `http://127.0.0.1:${proxy.addr.port}`,
 * });
 * const error = await dialer.dial("ws://example.com/").catch((e) => e);
 * assert.ok(error instanceof ProxyError);
 * assert.equal(error.status, 407);
 * await proxy.shutdown();
 * ```
 */
export class ProxyError extends Error {
  /** The proxy's HTTP status, or the SOCKS5 reply code. */
  readonly status: number;
  /** The HTTP proxy's answer (up to 1 KiB of body); absent for SOCKS5. */
  readonly response: Response | undefined;

  /**
   * Creates the error for a proxy's refusal.
   *
   * @param message What the proxy refused.
   * @param status The proxy's HTTP status or SOCKS5 reply code.
   * @param response The HTTP proxy's answer, if any.
   * @param options The usual error options.
   */
  constructor(
    message: string,
    status: number,
    response?: Response,
    options?: ErrorOptions,
  ) {
    super(message, options);
    this.name = "ProxyError";
    this.status = status;
    this.response = response;
  }
}

/** Default ports of the schemes a dialer connects to. */
const PROXY_PORTS = new Map([
  ["http:", 80],
  ["https:", 443],
  ["socks5:", 1080],
  ["socks5h:", 1080],
]);

/**
 * The proxy a proxy function chose, checked: a string is parsed (`host:port`
 * alone is an `http:` proxy, as in Go), and the scheme must be one we speak.
 */
export function proxyUrlOf(chosen: string | URL): URL {
  const proxy = chosen instanceof URL ? chosen : parseProxyUrl(chosen);
  if (!PROXY_PORTS.has(proxy.protocol)) {
    throw new TypeError(
      `Cannot dial through the proxy ${
        redact(proxy)
      }: its scheme is not http:, https:, socks5: or socks5h:`,
    );
  }
  return proxy;
}

function parseProxyUrl(value: string): URL {
  try {
    const url = new URL(value);
    if (PROXY_PORTS.has(url.protocol)) return url;
  } catch {
    // Fall through: Go reads a bare "host:port" as an http proxy.
  }
  try {
    return new URL(`http://${value}`);
  } catch (cause) {
    throw new TypeError(
      `Cannot dial through the proxy ${
        JSON.stringify(value)
      }: it is not a valid URL`,
      { cause },
    );
  }
}

/** The URL with any password replaced, fit for an error message. */
export function redact(url: URL): string {
  if (url.password === "") return url.href;
  const copy = new URL(url);
  copy.password = "xxxxx";
  return copy.href;
}

/** A URL's hostname without the brackets of an IPv6 literal. */
export function unbracket(hostname: string): string {
  return hostname.startsWith("[") ? hostname.slice(1, -1) : hostname;
}

/** The TCP address of a URL, with the scheme's default port. */
export function addressOf(url: URL): ConnectAddress {
  const port = url.port !== ""
    ? Number(url.port)
    : url.protocol === "wss:"
    ? 443
    : url.protocol === "ws:"
    ? 80
    : PROXY_PORTS.get(url.protocol)!;
  return { hostname: unbracket(url.hostname), port };
}

/** `host:port` for a CONNECT request (RFC 9110 section 9.3.6). */
function authorityOf(address: ConnectAddress): string {
  const host = address.hostname.includes(":")
    ? `[${address.hostname}]`
    : address.hostname;
  return `${host}:${address.port}`;
}

/**
 * Opens a tunnel with HTTP CONNECT (RFC 9110 section 9.3.6), with Basic
 * credentials (RFC 7617) from the proxy URL's user info.
 */
export async function connectThroughHttpProxy(
  conn: Deno.Conn,
  proxy: URL,
  address: ConnectAddress,
  signal: AbortSignal,
): Promise<void> {
  const authority = authorityOf(address);
  const lines = [`CONNECT ${authority} HTTP/1.1`, `Host: ${authority}`];
  if (proxy.username !== "" || proxy.password !== "") {
    const credentials = `${decodeURIComponent(proxy.username)}:${
      decodeURIComponent(proxy.password)
    }`;
    lines.push(
      `Proxy-Authorization: Basic ${encodeBase64(encoder.encode(credentials))}`,
    );
  }
  await writeAll(conn, encoder.encode(lines.join("\r\n") + "\r\n\r\n"));
  const { response, rest } = await readResponse(conn, "proxy");
  if (response.status < 200 || response.status > 299) {
    throw new ProxyError(
      `Cannot connect through the proxy ${
        redact(proxy)
      }: it answered ${response.status}${
        response.statusText ? ` ${response.statusText}` : ""
      }`,
      response.status,
      await withErrorBody(response, conn, rest, signal),
    );
  }
  if (rest.length > 0) {
    // The server has not been spoken to yet, so nothing can follow the
    // proxy's answer; bytes here mean the proxy is not a CONNECT tunnel.
    throw new Deno.errors.InvalidData(
      `Cannot connect through the proxy ${
        redact(proxy)
      }: it sent ${rest.length} unexpected bytes after its answer`,
    );
  }
}

/** SOCKS5 reply codes (RFC 1928 section 6). */
const SOCKS5_REPLIES: Record<number, string> = {
  1: "general SOCKS server failure",
  2: "connection not allowed by ruleset",
  3: "network unreachable",
  4: "host unreachable",
  5: "connection refused",
  6: "TTL expired",
  7: "command not supported",
  8: "address type not supported",
};

/**
 * Opens a tunnel through a SOCKS5 proxy (RFC 1928), with username/password
 * authentication (RFC 1929) from the proxy URL's user info. The target's
 * host name is always sent to the proxy to resolve, for `socks5:` as for
 * `socks5h:`, so a name never leaks to the local resolver.
 */
export async function connectThroughSocks5(
  conn: Deno.Conn,
  proxy: URL,
  address: ConnectAddress,
): Promise<void> {
  const reader = new ExactReader(conn, proxy);
  const username = encoder.encode(decodeURIComponent(proxy.username));
  const password = encoder.encode(decodeURIComponent(proxy.password));
  const withAuth = username.length > 0 || password.length > 0;
  if (username.length > 255 || password.length > 255) {
    throw new TypeError(
      "Cannot use the SOCKS5 proxy: its username and password must each be at most 255 bytes",
    );
  }
  // Greeting: version 5, the methods we support (0 = none, 2 = password).
  await writeAll(conn, Uint8Array.of(5, 1, withAuth ? 2 : 0));
  const [version, method] = await reader.read(2);
  if (version !== 5) {
    throw new Deno.errors.InvalidData(
      `Cannot connect through the proxy ${
        redact(proxy)
      }: it does not speak SOCKS5`,
    );
  }
  if (method === 2 && withAuth) {
    await writeAll(
      conn,
      Uint8Array.of(
        1,
        username.length,
        ...username,
        password.length,
        ...password,
      ),
    );
    const [, authStatus] = await reader.read(2);
    if (authStatus !== 0) {
      throw new ProxyError(
        `Cannot connect through the proxy ${
          redact(proxy)
        }: it refused the username and password`,
        authStatus,
      );
    }
  } else if (method !== 0) {
    throw new ProxyError(
      `Cannot connect through the proxy ${
        redact(proxy)
      }: it accepts none of the offered authentication methods`,
      method,
    );
  }
  await writeAll(conn, socks5ConnectRequest(address));
  const [, reply, , addressType] = await reader.read(4);
  if (reply !== 0) {
    throw new ProxyError(
      `Cannot connect through the proxy ${redact(proxy)}: it answered ${
        SOCKS5_REPLIES[reply] ?? `reply code ${reply}`
      }`,
      reply,
    );
  }
  // Skip the bound address the proxy reports: IPv4, a name, or IPv6.
  const addressLength = addressType === 1
    ? 4
    : addressType === 4
    ? 16
    : (await reader.read(1))[0];
  await reader.read(addressLength + 2);
}

/** A SOCKS5 CONNECT request for `address`, by IP or by name. */
function socks5ConnectRequest(address: ConnectAddress): Uint8Array {
  const ip = parseIp(address.hostname);
  const port = [address.port >> 8, address.port & 0xff];
  if (ip !== null && isIpv4Mapped(ip) && !address.hostname.includes(":")) {
    return Uint8Array.of(5, 1, 0, 1, ...ip.subarray(12), ...port);
  }
  if (ip !== null) return Uint8Array.of(5, 1, 0, 4, ...ip, ...port);
  const name = encoder.encode(address.hostname);
  if (name.length > 255) {
    throw new TypeError(
      "Cannot connect through the SOCKS5 proxy: the host name is longer than 255 bytes",
    );
  }
  return Uint8Array.of(5, 1, 0, 3, name.length, ...name, ...port);
}

/** Reads exact byte counts off a connection, for the SOCKS5 exchange. */
class ExactReader {
  #conn: Deno.Conn;
  #proxy: URL;

  constructor(conn: Deno.Conn, proxy: URL) {
    this.#conn = conn;
    this.#proxy = proxy;
  }

  async read(length: number): Promise<Uint8Array> {
    const out = new Uint8Array(length);
    for (let offset = 0; offset < length;) {
      const n = await this.#conn.read(out.subarray(offset));
      if (n === null) {
        throw new Deno.errors.UnexpectedEof(
          `Cannot connect through the proxy ${
            redact(this.#proxy)
          }: it closed the connection mid-answer`,
        );
      }
      offset += n;
    }
    return out;
  }
}

// ---------------------------------------------------------------------------
// Proxies from the environment

/**
 * Picks the proxy for a WebSocket URL from the environment, as Go's
 * `http.ProxyFromEnvironment` does (gorilla's default): `HTTPS_PROXY` for
 * `wss:`, `HTTP_PROXY` for `ws:` (lower-case names too), unless `NO_PROXY`
 * matches the host. `NO_PROXY` is a comma-separated list of host names
 * (`example.com` also matches its subdomains, `.example.com` only them), IP
 * addresses, CIDR ranges, each optionally with `:port`, or `*` for all.
 * Loopback hosts are never proxied. Without `--allow-env` for these
 * variables it returns `null` (and never prompts).
 *
 * @param target The `ws:` or `wss:` URL to dial.
 * @returns The proxy URL, or `null` to connect directly.
 *
 * @example Reading the environment
 * ```ts title="proxyFromEnvironment()"
 * import assert from "node:assert/strict";
 * import { proxyFromEnvironment } from "@denows/websocket";
 *
 * // Loopback never goes through a proxy, whatever the environment says.
 * assert.equal(proxyFromEnvironment(new URL("ws://127.0.0.1:8080/")), null);
 * ```
 */
export function proxyFromEnvironment(target: URL): URL | null {
  const secure = target.protocol === "wss:" || target.protocol === "https:";
  // A CGI program gets HTTP_PROXY from the request's Proxy header
  // ("httpoxy"), so Go ignores it there; so do we.
  const value = secure
    ? readEnv("HTTPS_PROXY", "https_proxy")
    : readEnv("REQUEST_METHOD") === ""
    ? readEnv("HTTP_PROXY", "http_proxy")
    : "";
  if (value === "") return null;
  const hostname = unbracket(target.hostname).toLowerCase();
  if (hostname === "localhost") return null;
  const ip = parseIp(hostname);
  if (ip !== null && isLoopback(ip)) return null;
  const port = addressOf(target).port;
  if (noProxyMatches(readEnv("NO_PROXY", "no_proxy"), hostname, ip, port)) {
    return null;
  }
  try {
    return parseProxyUrl(value);
  } catch {
    return null;
  }
}

/**
 * The first of the variables that is set and readable. Permission is queried
 * first so a missing `--allow-env` never prompts.
 */
function readEnv(...names: string[]): string {
  for (const name of names) {
    let state;
    try {
      state = Deno.permissions.querySync({ name: "env", variable: name }).state;
    } catch {
      return "";
    }
    if (state !== "granted") continue;
    const value = Deno.env.get(name);
    if (value !== undefined && value !== "") return value;
  }
  return "";
}

/** Whether a `NO_PROXY` list exempts the host (Go's `httpproxy` rules). */
function noProxyMatches(
  list: string,
  hostname: string,
  ip: Uint8Array | null,
  port: number,
): boolean {
  for (let entry of list.split(",")) {
    entry = entry.trim().toLowerCase();
    if (entry === "") continue;
    if (entry === "*") return true;
    const slash = entry.indexOf("/");
    if (slash !== -1) {
      const network = parseIp(entry.slice(0, slash));
      const bits = Number(entry.slice(slash + 1));
      if (network === null || ip === null || !Number.isInteger(bits)) continue;
      const prefix = entry.includes(":") ? bits : bits + 96;
      if (prefixMatches(network, ip, prefix)) return true;
      continue;
    }
    let entryHost = entry;
    let entryPort = 0;
    const hostPort = /^(\[[^\]]*\]|[^:]*):(\d+)$/.exec(entry);
    if (hostPort !== null) {
      entryHost = hostPort[1];
      entryPort = Number(hostPort[2]);
    }
    entryHost = unbracket(entryHost);
    if (entryPort !== 0 && entryPort !== port) continue;
    const entryIp = parseIp(entryHost);
    if (entryIp !== null) {
      if (ip !== null && entryIp.every((byte, i) => byte === ip[i])) {
        return true;
      }
      continue;
    }
    if (entryHost.startsWith("*.")) entryHost = entryHost.slice(1);
    if (entryHost.startsWith(".")) {
      if (hostname.endsWith(entryHost)) return true;
    } else if (hostname === entryHost || hostname.endsWith(`.${entryHost}`)) {
      return true;
    }
  }
  return false;
}

function prefixMatches(
  network: Uint8Array,
  ip: Uint8Array,
  bits: number,
): boolean {
  if (bits < 0 || bits > 128) return false;
  for (let i = 0; i < 16 && bits > 0; i++, bits -= 8) {
    const mask = bits >= 8 ? 0xff : (0xff << (8 - bits)) & 0xff;
    if ((network[i] & mask) !== (ip[i] & mask)) return false;
  }
  return true;
}

/**
 * Parses an IPv4 or IPv6 literal into 16 bytes (IPv4 as `::ffff:a.b.c.d`, so
 * both forms compare equal, as in Go), or returns null.
 */
function parseIp(text: string): Uint8Array | null {
  const out = new Uint8Array(16);
  const v4 = parseIpv4(text);
  if (v4 !== null) {
    out[10] = out[11] = 0xff;
    out.set(v4, 12);
    return out;
  }
  if (!text.includes(":")) return null;
  // An IPv6 literal may end in dotted IPv4 (RFC 4291 section 2.2 item 3):
  // rewrite it as the two 16-bit groups it stands for.
  const lastColon = text.lastIndexOf(":");
  const last = text.slice(lastColon + 1);
  if (last.includes(".")) {
    const embedded = parseIpv4(last);
    if (embedded === null) return null;
    const high = ((embedded[0] << 8) | embedded[1]).toString(16);
    const low = ((embedded[2] << 8) | embedded[3]).toString(16);
    text = `${text.slice(0, lastColon + 1)}${high}:${low}`;
  }
  const halves = text.split("::");
  if (halves.length > 2) return null;
  const split = (half: string) => half === "" ? [] : half.split(":");
  const head = split(halves[0]);
  const tail = halves.length === 2 ? split(halves[1]) : [];
  const missing = 8 - head.length - tail.length;
  // "::" stands for at least one zero group; without it all 8 are written.
  if (halves.length === 2 ? missing < 1 : missing !== 0) return null;
  const groups = [...head, ...new Array(missing).fill("0"), ...tail];
  for (let i = 0; i < 8; i++) {
    if (!/^[0-9a-f]{1,4}$/i.test(groups[i])) return null;
    const word = parseInt(groups[i], 16);
    out[2 * i] = word >> 8;
    out[2 * i + 1] = word & 0xff;
  }
  return out;
}

function parseIpv4(text: string): number[] | null {
  const parts = text.split(".");
  if (parts.length !== 4) return null;
  const bytes = parts.map((part) =>
    /^(0|[1-9]\d{0,2})$/.test(part) ? Number(part) : 256
  );
  return bytes.every((byte) => byte < 256) ? bytes : null;
}

function isIpv4Mapped(ip: Uint8Array): boolean {
  return ip.subarray(0, 10).every((byte) => byte === 0) && ip[10] === 0xff &&
    ip[11] === 0xff;
}

function isLoopback(ip: Uint8Array): boolean {
  if (isIpv4Mapped(ip)) return ip[12] === 127;
  return ip.subarray(0, 15).every((byte) => byte === 0) && ip[15] === 1;
}
