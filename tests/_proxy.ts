// Proxies for the dialer tests: an HTTP CONNECT proxy (RFC 9110 section
// 9.3.6, optionally over TLS and with Basic credentials) and a SOCKS5 proxy
// (RFC 1928 / RFC 1929). Both listen on 127.0.0.1 port 0, remember what they
// were asked for, and close every socket they own on close().

import { closeQuietly, writeAll } from "./_helpers.ts";

/** A running test proxy. */
export interface TestProxy {
  /** The proxy's URL, e.g. `http://127.0.0.1:41234`. */
  url: string;
  /** Targets the proxy was asked to reach, as `host:port`. */
  targets: string[];
  /** `Proxy-Authorization` values (HTTP) or `user:pass` (SOCKS5) received. */
  credentials: string[];
  /** Stops listening and closes every connection. */
  close(): Promise<void>;
}

/** Options for {@linkcode startHttpProxy}. */
export interface HttpProxyOptions {
  /** `user:password` the proxy demands; answers 407 otherwise. */
  credentials?: string;
  /** Answer every CONNECT with this status (and a short body) instead. */
  refuse?: number;
  /** Serve the proxy over TLS (an `https:` proxy). */
  tls?: { cert: string; key: string };
}

/** Options for {@linkcode startSocks5Proxy}. */
export interface Socks5ProxyOptions {
  /** `user:password` the proxy demands (RFC 1929). */
  credentials?: string;
  /** Answer every CONNECT with this SOCKS5 reply code instead. */
  refuse?: number;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Starts an HTTP CONNECT proxy. */
export function startHttpProxy(options: HttpProxyOptions = {}): TestProxy {
  return startProxy(
    options.tls === undefined ? "http" : "https",
    (conn, proxy) => handleConnect(conn, proxy, options),
    options.tls,
  );
}

/** Starts a SOCKS5 proxy. */
export function startSocks5Proxy(options: Socks5ProxyOptions = {}): TestProxy {
  return startProxy(
    "socks5",
    (conn, proxy) => handleSocks5(conn, proxy, options),
  );
}

interface ProxyState {
  targets: string[];
  credentials: string[];
  conns: Set<Deno.Conn>;
}

function startProxy(
  scheme: string,
  handle: (conn: Deno.Conn, state: ProxyState) => Promise<void>,
  tls?: { cert: string; key: string },
): TestProxy {
  const listener = tls === undefined
    ? Deno.listen({ hostname: "127.0.0.1", port: 0 })
    : Deno.listenTls({ hostname: "127.0.0.1", port: 0, ...tls });
  const state: ProxyState = { targets: [], credentials: [], conns: new Set() };
  const handlers = new Set<Promise<void>>();
  const accepting = (async () => {
    try {
      for await (const conn of listener) {
        state.conns.add(conn);
        const handler = handle(conn, state)
          .catch(() => {})
          .finally(() => {
            closeQuietly(conn);
            state.conns.delete(conn);
            handlers.delete(handler);
          });
        handlers.add(handler);
      }
    } catch {
      // The listener was closed.
    }
  })();
  const { port } = listener.addr as Deno.NetAddr;
  return {
    url: `${scheme}://127.0.0.1:${port}`,
    targets: state.targets,
    credentials: state.credentials,
    async close() {
      closeQuietly(listener);
      await accepting;
      for (const conn of state.conns) closeQuietly(conn);
      await Promise.all(handlers);
    },
  };
}

async function handleConnect(
  conn: Deno.Conn,
  state: ProxyState,
  options: HttpProxyOptions,
): Promise<void> {
  const { head, rest } = await readHeadBytes(conn);
  const [requestLine, ...fieldLines] = head.split("\r\n");
  const [method, target] = requestLine.split(" ");
  const auth = fieldLines.find((line) =>
    line.toLowerCase().startsWith("proxy-authorization:")
  )?.slice("proxy-authorization:".length).trim();
  if (auth !== undefined) state.credentials.push(auth);
  if (method !== "CONNECT") {
    await answer(conn, 405, "Method Not Allowed", "CONNECT only");
    return;
  }
  state.targets.push(target);
  if (
    options.credentials !== undefined &&
    auth !== `Basic ${btoa(options.credentials)}`
  ) {
    await answer(
      conn,
      407,
      "Proxy Authentication Required",
      "credentials needed",
      'Proxy-Authenticate: Basic realm="test"\r\n',
    );
    return;
  }
  if (options.refuse !== undefined) {
    await answer(conn, options.refuse, "Refused", "refused by policy");
    return;
  }
  const upstream = await dialTarget(target, state);
  if (upstream === undefined) {
    await answer(conn, 502, "Bad Gateway", "cannot reach the target");
    return;
  }
  await writeAll(
    conn,
    encoder.encode("HTTP/1.1 200 Connection Established\r\n\r\n"),
  );
  await writeAll(upstream, rest);
  await splice(conn, upstream);
}

async function handleSocks5(
  conn: Deno.Conn,
  state: ProxyState,
  options: Socks5ProxyOptions,
): Promise<void> {
  const reader = new Reader(conn);
  const [, methodCount] = await reader.bytes(2);
  const methods = [...await reader.bytes(methodCount)];
  const wanted = options.credentials === undefined ? 0 : 2;
  if (!methods.includes(wanted)) {
    await writeAll(conn, Uint8Array.of(5, 0xff));
    return;
  }
  await writeAll(conn, Uint8Array.of(5, wanted));
  if (wanted === 2) {
    await reader.bytes(1);
    const user = decoder.decode(await reader.bytes((await reader.bytes(1))[0]));
    const pass = decoder.decode(await reader.bytes((await reader.bytes(1))[0]));
    state.credentials.push(`${user}:${pass}`);
    const ok = `${user}:${pass}` === options.credentials;
    await writeAll(conn, Uint8Array.of(1, ok ? 0 : 1));
    if (!ok) return;
  }
  const [, , , type] = await reader.bytes(4);
  let host: string;
  if (type === 1) host = [...await reader.bytes(4)].join(".");
  else if (type === 3) {
    host = decoder.decode(await reader.bytes((await reader.bytes(1))[0]));
  } else {
    const b = await reader.bytes(16);
    const words = [];
    for (let i = 0; i < 16; i += 2) {
      words.push(((b[i] << 8) | b[i + 1]).toString(16));
    }
    host = `[${words.join(":")}]`;
  }
  const [high, low] = await reader.bytes(2);
  const target = `${host}:${(high << 8) | low}`;
  state.targets.push(target);
  const reply = (code: number) =>
    writeAll(conn, Uint8Array.of(5, code, 0, 1, 0, 0, 0, 0, 0, 0));
  if (options.refuse !== undefined) {
    await reply(options.refuse);
    return;
  }
  const upstream = await dialTarget(target, state);
  if (upstream === undefined) {
    await reply(5);
    return;
  }
  await reply(0);
  await splice(conn, upstream);
}

async function dialTarget(
  target: string,
  state: ProxyState,
): Promise<Deno.Conn | undefined> {
  const match = /^\[?(.*?)\]?:(\d+)$/.exec(target);
  if (match === null) return undefined;
  try {
    const upstream = await Deno.connect({
      // The test proxy "resolves" every name to loopback, so tests can dial
      // names that are never proxied otherwise (localhost) or do not exist.
      hostname: /^[\d.]+$|:/.test(match[1]) ? match[1] : "127.0.0.1",
      port: Number(match[2]),
    });
    state.conns.add(upstream);
    return upstream;
  } catch {
    return undefined;
  }
}

/** Copies bytes both ways until either side ends, then closes both. */
async function splice(a: Deno.Conn, b: Deno.Conn): Promise<void> {
  const pump = async (from: Deno.Conn, to: Deno.Conn) => {
    const buffer = new Uint8Array(16 * 1024);
    try {
      for (;;) {
        const n = await from.read(buffer);
        if (n === null) break;
        await writeAll(to, buffer.subarray(0, n));
      }
    } catch {
      // A reset or a close from the other pump.
    }
    closeQuietly(a);
    closeQuietly(b);
  };
  await Promise.all([pump(a, b), pump(b, a)]);
}

async function answer(
  conn: Deno.Conn,
  status: number,
  reason: string,
  body: string,
  extra = "",
): Promise<void> {
  await writeAll(
    conn,
    encoder.encode(
      `HTTP/1.1 ${status} ${reason}\r\n${extra}Content-Length: ${body.length}\r\n\r\n${body}`,
    ),
  );
}

async function readHeadBytes(
  conn: Deno.Conn,
): Promise<{ head: string; rest: Uint8Array }> {
  let bytes = new Uint8Array(0);
  for (;;) {
    const text = decoder.decode(bytes);
    const end = text.indexOf("\r\n\r\n");
    if (end !== -1) {
      return {
        head: text.slice(0, end),
        rest: bytes.subarray(encoder.encode(text.slice(0, end + 4)).length),
      };
    }
    const buffer = new Uint8Array(4096);
    const n = await conn.read(buffer);
    if (n === null) throw new Error("Proxy client closed before its head");
    const joined = new Uint8Array(bytes.length + n);
    joined.set(bytes);
    joined.set(buffer.subarray(0, n), bytes.length);
    bytes = joined;
  }
}

class Reader {
  #conn: Deno.Conn;
  constructor(conn: Deno.Conn) {
    this.#conn = conn;
  }
  async bytes(length: number): Promise<Uint8Array> {
    const out = new Uint8Array(length);
    for (let offset = 0; offset < length;) {
      const n = await this.#conn.read(out.subarray(offset));
      if (n === null) throw new Error("SOCKS5 client closed mid-request");
      offset += n;
    }
    return out;
  }
}
