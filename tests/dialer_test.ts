import assert from "node:assert/strict";
import { WebSocketServer } from "./_ws.ts";
import {
  BadHandshakeError,
  type CookieJar,
  dial,
  Dialer,
  type DialerOptions,
  ProxyError,
} from "../dialer.ts";
import type { Conn } from "../conn.ts";
import { MESSAGE_TYPE } from "../frame.ts";
import { serve, Upgrader } from "../upgrader.ts";
import { computeAcceptKey } from "../_handshake.ts";
import { closeQuietly, drain, pattern, textOf, writeAll } from "./_helpers.ts";
import { startHttpProxy, startSocks5Proxy } from "./_proxy.ts";

const fixtures = new URL("./fixtures/", import.meta.url);
const CA = Deno.readTextFileSync(new URL("ca.pem", fixtures));
const CERT = Deno.readTextFileSync(new URL("cert.pem", fixtures));
const KEY = Deno.readTextFileSync(new URL("key.pem", fixtures));

const encoder = new TextEncoder();
const decoder = new TextDecoder();

// ---------------------------------------------------------------------------
// Servers

/** A Deno.serve echo server (Deno.upgradeWebSocket) that records requests. */
function denoEchoServer(
  options: { tls?: boolean; hostname?: string; protocol?: string } = {},
) {
  // Deno.serve empties a Request once it is answered: keep its headers.
  const requests: Headers[] = [];
  const server = Deno.serve({
    hostname: options.hostname ?? "127.0.0.1",
    port: 0,
    onListen() {},
    ...(options.tls ? { cert: CERT, key: KEY } : {}),
  }, (request) => {
    requests.push(new Headers(request.headers));
    const { socket, response } = Deno.upgradeWebSocket(request, {
      protocol: options.protocol,
    });
    socket.binaryType = "arraybuffer";
    socket.onmessage = (event) => socket.send(event.data);
    response.headers.append("set-cookie", "flavour=oat; Path=/");
    return response;
  });
  return { server, requests, port: server.addr.port };
}

// The parts of npm:ws's types the tests use (the package ships no types).
interface WsSocket {
  on(
    event: "message",
    listener: (data: unknown, isBinary: boolean) => void,
  ): void;
  send(data: unknown, options: { binary: boolean }): void;
}
interface WsRequest {
  headers: Record<string, string | string[] | undefined>;
}

/** A `ws` (npm) echo server that records request headers. */
async function wsEchoServer() {
  const headers: Record<string, string | string[] | undefined>[] = [];
  const wss = new WebSocketServer({
    host: "127.0.0.1",
    port: 0,
    handleProtocols: (protocols: Set<string>) =>
      protocols.has("v2") ? "v2" : false,
  });
  wss.on("headers", (lines: string[]) => lines.push("Set-Cookie: id=ws"));
  wss.on("connection", (socket: WsSocket, request: WsRequest) => {
    headers.push(request.headers);
    socket.on(
      "message",
      (data: unknown, isBinary: boolean) =>
        socket.send(data, { binary: isBinary }),
    );
  });
  await new Promise<void>((resolve) => wss.once("listening", resolve));
  const { port } = wss.address() as { port: number };
  return {
    headers,
    port,
    close: () =>
      new Promise<void>((resolve) => {
        for (const client of wss.clients) client.terminate();
        wss.close(() => resolve());
      }),
  };
}

/** Our own serve() + Upgrader, echoing every message. */
function ownEchoServer() {
  const upgrader = new Upgrader({ subprotocols: ["v2"] });
  const requests: Request[] = [];
  const server = serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    async (request) => {
      requests.push(request);
      const conn = await upgrader.upgrade(request, {
        "set-cookie": "id=own",
      });
      try {
        for (;;) {
          const { type, data } = await conn.readMessage();
          await conn.writeMessage(type, data);
        }
      } catch {
        conn.close();
      }
    },
  );
  return { server, requests, port: server.addr.port };
}

/**
 * A raw TCP server for malformed answers: reads the request head and hands
 * it to `answer`, then closes the connection.
 */
function rawServer(
  answer: (conn: Deno.Conn, request: string, key: string) => Promise<void>,
) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const requests: string[] = [];
  const conns = new Set<Deno.Conn>();
  const handlers: Promise<void>[] = [];
  const accepting = (async () => {
    try {
      for await (const conn of listener) {
        conns.add(conn);
        handlers.push((async () => {
          try {
            const request = await readRequestHead(conn);
            requests.push(request);
            const key = /sec-websocket-key: (.*)\r\n/i.exec(request)?.[1] ?? "";
            await answer(conn, request, key);
          } catch {
            // The client went away.
          } finally {
            closeQuietly(conn);
            conns.delete(conn);
          }
        })());
      }
    } catch {
      // Closed.
    }
  })();
  const { port } = listener.addr as Deno.NetAddr;
  return {
    port,
    url: `ws://127.0.0.1:${port}/`,
    requests,
    async close() {
      closeQuietly(listener);
      await accepting;
      for (const conn of conns) closeQuietly(conn);
      await Promise.all(handlers);
    },
  };
}

async function readRequestHead(conn: Deno.Conn): Promise<string> {
  let text = "";
  const buffer = new Uint8Array(4096);
  while (!text.includes("\r\n\r\n")) {
    const n = await conn.read(buffer);
    if (n === null) throw new Error("Client closed before its head");
    text += decoder.decode(buffer.subarray(0, n));
  }
  return text;
}

async function goodAnswer(key: string, extra = ""): Promise<string> {
  return "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n" +
    `Connection: Upgrade\r\nSec-WebSocket-Accept: ${await computeAcceptKey(
      key,
    )}\r\n${extra}\r\n`;
}

async function echo(conn: Conn, type: 1 | 2, data: Uint8Array | string) {
  await conn.writeMessage(type, data);
  const message = await conn.readMessage();
  assert.equal(message.type, type);
  return message.data;
}

/** Payloads at the frame length boundaries, up to 1 MiB. */
const SIZES = [0, 1, 125, 126, 65535, 65536, 1024 * 1024];

async function assertEchoes(conn: Conn) {
  for (const size of SIZES) {
    const bytes = pattern(size);
    assert.deepEqual(await echo(conn, MESSAGE_TYPE.Binary, bytes), bytes);
    const string = textOf(size);
    assert.equal(
      decoder.decode(await echo(conn, MESSAGE_TYPE.Text, string)),
      string,
    );
  }
}

class MemoryJar implements CookieJar {
  stored: { url: string; values: string[] }[] = [];
  asked: string[] = [];
  getCookies(url: URL): string[] {
    this.asked.push(url.href);
    return ["session=abc", "theme=dark"];
  }
  setCookies(url: URL, values: string[]): void {
    this.stored.push({ url: url.href, values });
  }
}

// ---------------------------------------------------------------------------
// Caller mistakes

Deno.test("dial() rejects URLs that are not ws: or wss: with a TypeError", async () => {
  const dialer = new Dialer();
  for (const url of ["http://127.0.0.1/", "ftp://x/", "not a url", "ws://"]) {
    await assert.rejects(dialer.dial(url), TypeError, url);
  }
});

Deno.test("dial() rejects user info in the URL with a TypeError", async () => {
  await assert.rejects(
    new Dialer().dial("ws://user:secret@127.0.0.1/"),
    (error: Error) => {
      assert.ok(error instanceof TypeError);
      assert.match(error.message, /user info is not allowed/);
      assert.doesNotMatch(error.message, /secret/);
      return true;
    },
  );
});

Deno.test("dial() refuses headers that clash with the handshake's own", async () => {
  const dialer = new Dialer({ subprotocols: ["chat"] });
  for (
    const name of [
      "Upgrade",
      "Connection",
      "Sec-WebSocket-Key",
      "Sec-WebSocket-Version",
      "Sec-WebSocket-Extensions",
      "Sec-WebSocket-Protocol",
    ]
  ) {
    await assert.rejects(
      dialer.dial("ws://127.0.0.1:1/", { headers: { [name]: "x" } }),
      (error: Error) =>
        error instanceof TypeError &&
        error.message.toLowerCase().includes(name.toLowerCase()),
    );
  }
});

Deno.test("new Dialer() refuses bad subprotocols and sizes", () => {
  assert.throws(() => new Dialer({ subprotocols: ["a b"] }), TypeError);
  assert.throws(() => new Dialer({ subprotocols: ["a", "a"] }), TypeError);
  assert.throws(() => new Dialer({ handshakeTimeout: -1 }), RangeError);
  assert.throws(() => new Dialer({ readBufferSize: NaN }), RangeError);
  assert.throws(() => new Dialer({ compressionThreshold: -1 }), RangeError);
});

// ---------------------------------------------------------------------------
// The request on the wire

Deno.test("dial() sends the RFC 6455 request with a fresh 16-byte key", async () => {
  const server = rawServer(async (conn, _request, key) => {
    await writeAll(conn, await goodAnswer(key));
    await drain(conn);
  });
  try {
    const dialer = new Dialer({ subprotocols: ["a", "b"] });
    for (let i = 0; i < 2; i++) {
      const { conn } = await dialer.dial(
        `ws://127.0.0.1:${server.port}/path/x?q=1&r=%20#fragment`,
        { headers: { Origin: "http://example.com", "X-Custom": "yes" } },
      );
      conn.close();
    }
    const [first, second] = server.requests;
    const lines = first.split("\r\n");
    assert.equal(lines[0], "GET /path/x?q=1&r=%20 HTTP/1.1");
    assert.ok(lines.includes(`Host: 127.0.0.1:${server.port}`));
    assert.ok(lines.includes("Upgrade: websocket"));
    assert.ok(lines.includes("Connection: Upgrade"));
    assert.ok(lines.includes("Sec-WebSocket-Version: 13"));
    assert.ok(lines.includes("Sec-WebSocket-Protocol: a, b"));
    assert.ok(lines.includes("Origin: http://example.com"));
    assert.ok(lines.includes("X-Custom: yes"));
    const key = /Sec-WebSocket-Key: (.*)/.exec(first)![1];
    assert.equal(atob(key).length, 16);
    assert.notEqual(/Sec-WebSocket-Key: (.*)/.exec(second)![1], key);
  } finally {
    await server.close();
  }
});

Deno.test("dial() lets a Host header replace the Host line", async () => {
  const server = rawServer(async (conn, _request, key) => {
    await writeAll(conn, await goodAnswer(key));
    await drain(conn);
  });
  try {
    const { conn } = await new Dialer().dial(server.url, {
      headers: { Host: "virtual.example" },
    });
    conn.close();
    const lines = server.requests[0].split("\r\n");
    assert.deepEqual(lines.filter((l) => /^host:/i.test(l)), [
      "Host: virtual.example",
    ]);
  } finally {
    await server.close();
  }
});

Deno.test("dial() connects to port 80 for ws: and 443 for wss: by default", async () => {
  const seen: unknown[] = [];
  const dialer = new Dialer({
    connect(address) {
      seen.push(address);
      return Promise.reject(new Deno.errors.ConnectionRefused("test"));
    },
  });
  for (
    const url of ["ws://example.com/", "wss://example.com/", "ws://[::1]/"]
  ) {
    await assert.rejects(dialer.dial(url), Deno.errors.ConnectionRefused);
  }
  assert.deepEqual(seen, [
    { hostname: "example.com", port: 80 },
    { hostname: "example.com", port: 443 },
    { hostname: "::1", port: 80 },
  ]);
});

Deno.test("dial() reaches an IPv6 literal with a bracketed Host line", async () => {
  const { server, requests, port } = denoEchoServer({ hostname: "::1" });
  try {
    const { conn } = await new Dialer().dial(`ws://[::1]:${port}/v6`);
    assert.equal(
      decoder.decode(await echo(conn, MESSAGE_TYPE.Text, "six")),
      "six",
    );
    await conn.closeGracefully(1000, "", { timeout: 2000 });
    assert.equal(requests[0].get("host"), `[::1]:${port}`);
  } finally {
    await server.shutdown();
  }
});

// ---------------------------------------------------------------------------
// Real servers

Deno.test("dial() exchanges text and binary messages of 0 B to 1 MiB with Deno.serve", async () => {
  const { server, requests, port } = denoEchoServer({ protocol: "v2" });
  try {
    const jar = new MemoryJar();
    const { conn, response } = await new Dialer({
      subprotocols: ["v1", "v2"],
      cookieJar: jar,
    }).dial(`ws://127.0.0.1:${port}/deno`, {
      headers: { "X-Token": "t0k3n" },
    });
    assert.equal(response.status, 101);
    assert.equal(conn.subprotocol, "v2");
    assert.equal(requests[0].get("x-token"), "t0k3n");
    assert.equal(requests[0].get("cookie"), "session=abc; theme=dark");
    assert.deepEqual(jar.stored, [{
      url: `ws://127.0.0.1:${port}/deno`,
      values: ["flavour=oat; Path=/"],
    }]);
    await assertEchoes(conn);
    await conn.closeGracefully(1000, "done", { timeout: 2000 });
  } finally {
    await server.shutdown();
  }
});

Deno.test("dial() exchanges text and binary messages of 0 B to 1 MiB with npm:ws", async () => {
  const server = await wsEchoServer();
  try {
    const jar = new MemoryJar();
    const { conn, response } = await new Dialer({
      subprotocols: ["v1", "v2"],
      cookieJar: jar,
    }).dial(`ws://127.0.0.1:${server.port}/ws`, {
      headers: { "X-Token": "t0k3n", Cookie: "extra=1" },
    });
    assert.equal(response.headers.get("sec-websocket-protocol"), "v2");
    assert.equal(conn.subprotocol, "v2");
    assert.equal(server.headers[0]["x-token"], "t0k3n");
    assert.equal(
      server.headers[0]["cookie"],
      "session=abc; theme=dark; extra=1",
    );
    assert.deepEqual(jar.stored[0].values, ["id=ws"]);
    await assertEchoes(conn);
    await conn.closeGracefully(1000, "", { timeout: 2000 });
  } finally {
    await server.close();
  }
});

Deno.test("dial() exchanges text and binary messages of 0 B to 1 MiB with serve() + Upgrader", async () => {
  const { server, requests, port } = ownEchoServer();
  try {
    const jar = new MemoryJar();
    const { conn } = await new Dialer({
      subprotocols: ["v1", "v2"],
      cookieJar: jar,
    }).dial(`ws://127.0.0.1:${port}/own`, { headers: { "X-Token": "own" } });
    assert.equal(conn.subprotocol, "v2");
    assert.equal(requests[0].headers.get("x-token"), "own");
    assert.equal(requests[0].headers.get("cookie"), "session=abc; theme=dark");
    assert.deepEqual(jar.stored[0].values, ["id=own"]);
    await assertEchoes(conn);
    await conn.closeGracefully(1000, "", { timeout: 2000 });
  } finally {
    await server.shutdown({ closeWebSockets: true, timeout: 1000 });
  }
});

Deno.test("dial() offers subprotocols given as a header when the dialer has none", async () => {
  const { server, port } = denoEchoServer({ protocol: "b" });
  try {
    const { conn } = await new Dialer().dial(`ws://127.0.0.1:${port}/`, {
      headers: { "Sec-WebSocket-Protocol": "a, b" },
    });
    assert.equal(conn.subprotocol, "b");
    await conn.closeGracefully(1000, "", { timeout: 2000 });
  } finally {
    await server.shutdown();
  }
});

Deno.test("dial() keeps the bytes the server sends right behind the 101", async () => {
  const server = rawServer(async (conn, _request, key) => {
    // One write: the 101 and an unmasked text frame "early".
    await writeAll(
      conn,
      new Uint8Array([
        ...encoder.encode(await goodAnswer(key)),
        0x81,
        5,
        ...encoder.encode("early"),
      ]),
    );
    await drain(conn);
  });
  try {
    const { conn } = await new Dialer().dial(server.url);
    const message = await conn.readMessage();
    assert.equal(decoder.decode(message.data), "early");
    conn.close();
  } finally {
    await server.close();
  }
});

Deno.test("dial() skips an interim 1xx answer before the 101", async () => {
  const server = rawServer(async (conn, _request, key) => {
    await writeAll(
      conn,
      "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + await goodAnswer(key),
    );
    await drain(conn);
  });
  try {
    const { conn, response } = await new Dialer().dial(server.url);
    assert.equal(response.status, 101);
    conn.close();
  } finally {
    await server.close();
  }
});

// ---------------------------------------------------------------------------
// TLS

Deno.test("dial() opens wss: with the fixture CA and verifies the name", async () => {
  const { server, port } = denoEchoServer({ tls: true });
  try {
    for (const host of ["localhost", "127.0.0.1"]) {
      const { conn } = await new Dialer({ caCerts: [CA] }).dial(
        `wss://${host}:${port}/tls`,
      );
      assert.equal(
        decoder.decode(await echo(conn, MESSAGE_TYPE.Text, "secure")),
        "secure",
      );
      await conn.closeGracefully(1000, "", { timeout: 2000 });
    }
  } finally {
    await server.shutdown();
  }
});

Deno.test("dial() fails wss: when the certificate does not match the name", async () => {
  const { server, port } = denoEchoServer({ tls: true });
  try {
    await assert.rejects(
      new Dialer({ caCerts: [CA], serverName: "wrong.example" }).dial(
        `wss://127.0.0.1:${port}/`,
      ),
      /NotValidForName|certificate/i,
    );
    // Without the CA the chain is not trusted.
    await assert.rejects(
      new Dialer().dial(`wss://localhost:${port}/`),
      /UnknownIssuer|certificate/i,
    );
  } finally {
    await server.shutdown();
  }
});

Deno.test("dial() verifies the URL's host under TLS when a Host header overrides the Host line", async () => {
  const { server, requests, port } = denoEchoServer({ tls: true });
  try {
    const { conn } = await new Dialer({ caCerts: [CA] }).dial(
      `wss://localhost:${port}/`,
      { headers: { Host: "virtual.example" } },
    );
    assert.equal(requests[0].get("host"), "virtual.example");
    await conn.closeGracefully(1000, "", { timeout: 2000 });
  } finally {
    await server.shutdown();
  }
});

// ---------------------------------------------------------------------------
// Proxies

Deno.test("dial() tunnels ws: through an HTTP CONNECT proxy", async () => {
  const { server, port } = denoEchoServer();
  const proxy = startHttpProxy();
  try {
    const targets: string[] = [];
    const { conn } = await new Dialer({
      proxy: (target) => {
        targets.push(target.href);
        return proxy.url;
      },
    }).dial(`ws://localhost:${port}/p`);
    assert.equal(decoder.decode(await echo(conn, 1, "via proxy")), "via proxy");
    await conn.closeGracefully(1000, "", { timeout: 2000 });
    assert.deepEqual(targets, [`ws://localhost:${port}/p`]);
    assert.deepEqual(proxy.targets, [`localhost:${port}`]);
    assert.deepEqual(proxy.credentials, []);
  } finally {
    await proxy.close();
    await server.shutdown();
  }
});

Deno.test("dial() sends Basic credentials from the proxy URL's user info", async () => {
  const { server, port } = denoEchoServer();
  const proxy = startHttpProxy({ credentials: "al ice:p@ss" });
  try {
    const url = new URL(proxy.url);
    url.username = "al ice";
    url.password = "p@ss";
    const { conn } = await new Dialer({ proxy: () => url }).dial(
      `ws://127.0.0.1:${port}/`,
    );
    await conn.closeGracefully(1000, "", { timeout: 2000 });
    assert.deepEqual(proxy.credentials, [`Basic ${btoa("al ice:p@ss")}`]);
  } finally {
    await proxy.close();
    await server.shutdown();
  }
});

Deno.test("dial() reports a 407 from the proxy as a ProxyError", async () => {
  const proxy = startHttpProxy({ credentials: "u:p" });
  try {
    const url = new URL(proxy.url);
    url.username = "u";
    url.password = "wrong";
    const error = await new Dialer({ proxy: () => url }).dial(
      "ws://127.0.0.1:9/",
    ).catch((e) => e);
    assert.ok(error instanceof ProxyError);
    assert.equal(error.name, "ProxyError");
    assert.equal(error.status, 407);
    assert.match(error.message, /407 Proxy Authentication Required/);
    assert.doesNotMatch(error.message, /wrong/);
    assert.equal(
      error.response?.headers.get("proxy-authenticate"),
      'Basic realm="test"',
    );
    assert.equal(await error.response?.text(), "credentials needed");
  } finally {
    await proxy.close();
  }
});

Deno.test("dial() reports any other refusal with the proxy's status", async () => {
  const proxy = startHttpProxy({ refuse: 403 });
  try {
    await assert.rejects(
      new Dialer({ proxy: () => proxy.url }).dial("ws://127.0.0.1:9/"),
      (error: ProxyError) => error.status === 403,
    );
  } finally {
    await proxy.close();
  }
});

Deno.test("dial() runs wss: through an HTTP proxy's tunnel and ws: through an https: proxy", async () => {
  const secure = denoEchoServer({ tls: true });
  const plain = denoEchoServer();
  const httpProxy = startHttpProxy();
  const httpsProxy = startHttpProxy({ tls: { cert: CERT, key: KEY } });
  try {
    const viaHttp = await new Dialer({
      caCerts: [CA],
      proxy: () => httpProxy.url,
    }).dial(`wss://localhost:${secure.port}/`);
    assert.equal(decoder.decode(await echo(viaHttp.conn, 1, "a")), "a");
    await viaHttp.conn.closeGracefully(1000, "", { timeout: 2000 });

    const viaHttps = await new Dialer({
      caCerts: [CA],
      proxy: () => httpsProxy.url.replace("127.0.0.1", "localhost"),
    }).dial(`ws://127.0.0.1:${plain.port}/`);
    assert.equal(decoder.decode(await echo(viaHttps.conn, 1, "b")), "b");
    await viaHttps.conn.closeGracefully(1000, "", { timeout: 2000 });
    assert.deepEqual(httpsProxy.targets, [`127.0.0.1:${plain.port}`]);

    await assert.rejects(
      new Dialer({ caCerts: [CA], proxy: () => httpsProxy.url }).dial(
        `wss://localhost:${secure.port}/`,
      ),
      /TLS inside a TLS connection/,
    );
  } finally {
    await httpProxy.close();
    await httpsProxy.close();
    await secure.server.shutdown();
    await plain.server.shutdown();
  }
});

Deno.test("dial() tunnels through a SOCKS5 proxy, with and without credentials", async () => {
  const { server, port } = denoEchoServer();
  const open = startSocks5Proxy();
  const guarded = startSocks5Proxy({ credentials: "u:p" });
  try {
    const first = await new Dialer({ proxy: () => open.url }).dial(
      `ws://localhost:${port}/`,
    );
    assert.equal(decoder.decode(await echo(first.conn, 1, "socks")), "socks");
    await first.conn.closeGracefully(1000, "", { timeout: 2000 });
    assert.deepEqual(open.targets, [`localhost:${port}`]);

    const url = guarded.url.replace("socks5://", "socks5://u:p@");
    const second = await new Dialer({ proxy: () => url }).dial(
      `ws://127.0.0.1:${port}/`,
    );
    await second.conn.closeGracefully(1000, "", { timeout: 2000 });
    assert.deepEqual(guarded.targets, [`127.0.0.1:${port}`]);

    await assert.rejects(
      new Dialer({ proxy: () => url.replace("u:p", "u:x") }).dial(
        `ws://127.0.0.1:${port}/`,
      ),
      (error: ProxyError) =>
        error instanceof ProxyError &&
        /refused the username/.test(error.message),
    );
  } finally {
    await open.close();
    await guarded.close();
    await server.shutdown();
  }
});

Deno.test("dial() reports a SOCKS5 refusal with its reply code", async () => {
  const proxy = startSocks5Proxy({ refuse: 2 });
  try {
    await assert.rejects(
      new Dialer({ proxy: () => proxy.url }).dial("ws://127.0.0.1:9/"),
      (error: ProxyError) =>
        error.status === 2 && /not allowed by ruleset/.test(error.message),
    );
  } finally {
    await proxy.close();
  }
});

Deno.test("dial() refuses a proxy URL with an unknown scheme", async () => {
  await assert.rejects(
    new Dialer({ proxy: () => new URL("ftp://proxy.example/") }).dial(
      "ws://127.0.0.1:9/",
    ),
    TypeError,
  );
});

// ---------------------------------------------------------------------------
// Malformed servers

async function badHandshake(
  answer: (key: string) => Promise<string> | string,
  dialerOptions: DialerOptions = {},
): Promise<BadHandshakeError> {
  const server = rawServer(async (conn, _request, key) => {
    await writeAll(conn, await answer(key));
  });
  try {
    const error = await new Dialer(dialerOptions).dial(server.url).catch((
      e,
    ) => e);
    assert.ok(error instanceof BadHandshakeError, String(error));
    assert.equal(error.name, "BadHandshakeError");
    return error;
  } finally {
    await server.close();
  }
}

Deno.test("dial() fails with BadHandshakeError on a wrong Sec-WebSocket-Accept", async () => {
  const error = await badHandshake(() =>
    goodAnswer("AAAAAAAAAAAAAAAAAAAAAA==")
  );
  assert.equal(error.status, 101);
  assert.match(error.message, /Sec-WebSocket-Accept/);
});

Deno.test("dial() fails with BadHandshakeError when Upgrade or Connection is missing", async () => {
  const noUpgrade = await badHandshake(async (key) =>
    (await goodAnswer(key)).replace("Upgrade: websocket\r\n", "")
  );
  assert.match(noUpgrade.message, /Upgrade header is missing/);
  const noConnection = await badHandshake(async (key) =>
    (await goodAnswer(key)).replace("Connection: Upgrade\r\n", "")
  );
  assert.match(noConnection.message, /Connection header is missing/);
});

Deno.test("dial() fails with BadHandshakeError carrying a 200's status, headers and body", async () => {
  const error = await badHandshake(() =>
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
  );
  assert.equal(error.status, 200);
  assert.match(error.message, /answered 200 OK instead of 101/);
  assert.equal(error.response.headers.get("content-type"), "text/plain");
  assert.equal(await error.response.text(), "hello");
});

Deno.test("dial() keeps at most 1 KiB of a refusal's body, chunked or not", async () => {
  const long = "x".repeat(5000);
  const plain = await badHandshake(() =>
    `HTTP/1.1 403 Forbidden\r\nContent-Length: ${long.length}\r\n\r\n${long}`
  );
  assert.equal((await plain.response.text()).length, 1024);
  const chunked = await badHandshake(() =>
    "HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n" +
    "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
  );
  assert.equal(await chunked.response.text(), "hello world");
  const closeDelimited = await badHandshake(() =>
    "HTTP/1.0 500 Oops\r\n\r\nbroken"
  );
  assert.equal(await closeDelimited.response.text(), "broken");
});

Deno.test("dial() fails with BadHandshakeError on a 101 with an extension never offered", async () => {
  const error = await badHandshake((key) =>
    goodAnswer(key, "Sec-WebSocket-Extensions: permessage-deflate\r\n")
  );
  assert.match(
    error.message,
    /extension "permessage-deflate", which was not offered/,
  );
});

Deno.test("dial() fails with BadHandshakeError on a subprotocol never offered", async () => {
  const none = await badHandshake((key) =>
    goodAnswer(key, "Sec-WebSocket-Protocol: chat\r\n")
  );
  assert.match(none.message, /"chat" although none was offered/);
  const other = await badHandshake(
    (key) => goodAnswer(key, "Sec-WebSocket-Protocol: chat\r\n"),
    { subprotocols: ["mqtt"] },
  );
  assert.match(other.message, /not one of mqtt/);
});

Deno.test("dial() rejects a garbage answer and one cut off at any byte", async () => {
  let answer = "";
  const server = rawServer(async (conn, _request, key) => {
    const full = await goodAnswer(key);
    await writeAll(
      conn,
      answer === "" ? "garbage\r\n\r\n" : full.slice(0, Number(answer)),
    );
  });
  try {
    await assert.rejects(
      new Dialer().dial(server.url),
      Deno.errors.InvalidData,
    );
    const full = await goodAnswer("x");
    for (let cut = 0; cut < full.length; cut++) {
      answer = String(cut);
      await assert.rejects(
        new Dialer().dial(server.url),
        (error: Error) =>
          error instanceof Deno.errors.UnexpectedEof ||
          error instanceof Deno.errors.InvalidData ||
          error instanceof BadHandshakeError,
      );
    }
  } finally {
    await server.close();
  }
});

Deno.test("dial() rejects a proxy answer cut off at any byte", async () => {
  const full = "HTTP/1.1 200 Connection Established\r\n\r\n";
  let cut = 0;
  const proxy = rawServer(async (conn) => {
    await writeAll(conn, full.slice(0, cut));
  });
  try {
    const dialer = new Dialer({
      proxy: () => `http://127.0.0.1:${proxy.port}`,
    });
    for (; cut < full.length; cut++) {
      await assert.rejects(
        dialer.dial("ws://example.com/"),
        (error: Error) =>
          error instanceof Deno.errors.UnexpectedEof ||
          error instanceof Deno.errors.InvalidData,
      );
    }
  } finally {
    await proxy.close();
  }
});

Deno.test("dial() explains that wss: needs a TCP connection from connect()", async () => {
  const path = await Deno.makeTempFile();
  await Deno.remove(path);
  const listener = Deno.listen({ transport: "unix", path });
  const accepted = listener.accept();
  try {
    const dialer = new Dialer({
      connect: () => Deno.connect({ transport: "unix", path }),
    });
    await assert.rejects(
      dialer.dial("wss://localhost/"),
      (error: Error) =>
        error instanceof TypeError &&
        /not a plain TCP connection/.test(error.message),
    );
  } finally {
    (await accepted).close();
    listener.close();
    await Deno.remove(path).catch(() => {});
  }
});

Deno.test("dial() calls the cookie jar for a refused handshake too", async () => {
  const server = rawServer(async (conn) => {
    await writeAll(
      conn,
      "HTTP/1.1 401 Unauthorized\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n",
    );
  });
  try {
    const jar = new MemoryJar();
    await assert.rejects(
      new Dialer({ cookieJar: jar }).dial(server.url),
      BadHandshakeError,
    );
    assert.deepEqual(jar.asked, [server.url]);
    assert.deepEqual(jar.stored, [{ url: server.url, values: ["a=1", "b=2"] }]);
    assert.match(server.requests[0], /\r\nCookie: session=abc; theme=dark\r\n/);
  } finally {
    await server.close();
  }
});

// ---------------------------------------------------------------------------
// Timeouts and aborts at every stage

Deno.test("dial() times out while the TCP connect hangs", async () => {
  let closedBySignal = false;
  const dialer = new Dialer({
    handshakeTimeout: 50,
    connect: (_address, { signal }) =>
      new Promise((_, reject) =>
        signal.addEventListener("abort", () => {
          closedBySignal = true;
          reject(signal.reason);
        })
      ),
  });
  await assert.rejects(dialer.dial("ws://127.0.0.1:9/"), Deno.errors.TimedOut);
  assert.ok(closedBySignal);
});

Deno.test("dial() rejects at once with the reason of an aborted signal", async () => {
  const controller = new AbortController();
  const reason = new Error("stop");
  controller.abort(reason);
  let connected = false;
  const dialer = new Dialer({
    connect: () => {
      connected = true;
      return Promise.reject(new Error("unreachable"));
    },
  });
  await assert.rejects(
    dialer.dial("ws://127.0.0.1:9/", { signal: controller.signal }),
    (error) => error === reason,
  );
  assert.equal(connected, false);
});

/** A TCP listener that accepts and never says a word. */
function silentServer() {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns: Deno.Conn[] = [];
  const closed: Promise<void>[] = [];
  const accepting = (async () => {
    try {
      for await (const conn of listener) {
        conns.push(conn);
        closed.push(drain(conn).finally(() => closeQuietly(conn)));
      }
    } catch {
      // Closed.
    }
  })();
  return {
    port: (listener.addr as Deno.NetAddr).port,
    /**
     * Stops listening. With `waitForClient`, first waits until the client
     * closed every accepted connection (the test hangs if one is left open);
     * otherwise closes them from this side.
     *
     * @returns How many connections it accepted.
     */
    async close(waitForClient: boolean): Promise<number> {
      if (!waitForClient) { for (const conn of conns) closeQuietly(conn); }
      await Promise.all(closed);
      closeQuietly(listener);
      await accepting;
      return conns.length;
    },
  };
}

// Deno 2.9.6 keeps the TCP socket of a TLS connection whose handshake was
// abandoned open internally until the server speaks or closes, even though
// the TlsConn is closed (Deno.connectTls behaves the same). The dial still
// rejects at once and holds no resource; only the socket's end is late.
const CLIENT_CLOSES_SOCKET = {
  "the proxy answers": true,
  "the TLS handshake completes": false,
  "the server answers": true,
};

for (
  const stage of [
    ["the proxy answers", (port: number) => ({
      proxy: () => `http://127.0.0.1:${port}`,
      url: "ws://example.com/",
    })],
    ["the TLS handshake completes", (port: number) => ({
      url: `wss://localhost:${port}/`,
    })],
    ["the server answers", (port: number) => ({
      url: `ws://127.0.0.1:${port}/`,
    })],
  ] as const
) {
  const [name, setup] = stage;
  Deno.test(`dial() times out and closes everything while waiting until ${name}`, async () => {
    const server = silentServer();
    const { url, ...options } = setup(server.port) as {
      url: string;
      proxy?: () => string;
    };
    await assert.rejects(
      new Dialer({ ...options, handshakeTimeout: 100, caCerts: [CA] }).dial(
        url,
      ),
      (error: Error) =>
        error instanceof Deno.errors.TimedOut &&
        /timed out after 100 ms/.test(error.message),
    );
    assert.equal(await server.close(CLIENT_CLOSES_SOCKET[name]), 1);
  });

  Deno.test(`dial() aborts and closes everything while waiting until ${name}`, async () => {
    const server = silentServer();
    const { url, ...options } = setup(server.port) as {
      url: string;
      proxy?: () => string;
    };
    const controller = new AbortController();
    const reason = new Error("user gave up");
    const timer = setTimeout(() => controller.abort(reason), 50);
    try {
      await assert.rejects(
        new Dialer({ ...options, caCerts: [CA] }).dial(url, {
          signal: controller.signal,
        }),
        (error) => error === reason,
      );
    } finally {
      clearTimeout(timer);
    }
    assert.equal(await server.close(CLIENT_CLOSES_SOCKET[name]), 1);
  });
}

// Through a proxy to cover its stage too. Plain ws: only: an abandoned TLS
// handshake keeps its socket open inside Deno (see CLIENT_CLOSES_SOCKET), and
// Deno.serve's shutdown then waits for it.
Deno.test("dial() leaves nothing open when aborted at any moment", async () => {
  const { server, port } = denoEchoServer();
  const proxy = startHttpProxy();
  const dialer = new Dialer({ proxy: () => proxy.url });
  let opened = 0;
  try {
    // Abort after 0, 1, 2, ... turns of the microtask queue, then after
    // growing delays, so the abort lands in every stage in turn.
    for (let turn = 0; turn < 120; turn++) {
      const controller = new AbortController();
      const dialing = dialer.dial(`ws://localhost:${port}/`, {
        signal: controller.signal,
      }).then(({ conn }) => {
        opened++;
        conn.close();
      }, (error) => assert.equal(error, controller.signal.reason));
      if (turn < 60) {
        for (let i = 0; i < turn; i++) await Promise.resolve();
      } else {
        await new Promise((resolve) => setTimeout(resolve, (turn - 60) / 4));
      }
      controller.abort();
      await dialing;
    }
  } finally {
    await proxy.close();
    await server.shutdown();
  }
  // Late turns outlast the whole handshake, so some dials complete.
  assert.ok(opened > 0);
});

Deno.test("dial() times out a slow proxy function and cookie jar", async () => {
  const never = new Promise<never>(() => {});
  await assert.rejects(
    new Dialer({ handshakeTimeout: 50, proxy: () => never }).dial(
      "ws://127.0.0.1:9/",
    ),
    Deno.errors.TimedOut,
  );
  await assert.rejects(
    new Dialer({
      handshakeTimeout: 50,
      cookieJar: { getCookies: () => never, setCookies() {} },
    }).dial("ws://127.0.0.1:9/"),
    Deno.errors.TimedOut,
  );
});

// ---------------------------------------------------------------------------
// The default dialer and the environment

/** Runs a snippet in a child Deno with the given environment and flags. */
async function runChild(
  code: string,
  env: Record<string, string>,
  flags: string[],
): Promise<string> {
  const dialerUrl = new URL("../dialer.ts", import.meta.url).href;
  // `deno eval` grants every permission, so the snippet runs from a file.
  const script = await Deno.makeTempFile({ suffix: ".ts" });
  try {
    await Deno.writeTextFile(script, code.replaceAll("DIALER", dialerUrl));
    const output = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--no-prompt", "--allow-read", ...flags, script],
      env,
      clearEnv: true,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.equal(output.code, 0, decoder.decode(output.stderr));
    return decoder.decode(output.stdout).trim();
  } finally {
    await Deno.remove(script);
  }
}

const PROXY_CASES = `
import { proxyFromEnvironment } from "DIALER";
const urls = Deno.args.length ? Deno.args : [
  "ws://example.com/", "wss://example.com/", "ws://127.0.0.1/",
  "ws://localhost:8080/", "ws://[::1]/", "ws://skip.example/",
  "ws://a.skip.example/", "ws://suffix.example/", "ws://a.suffix.example/",
  "ws://10.1.2.3/", "ws://11.0.0.1/", "ws://onlyport.example:8080/",
  "ws://onlyport.example:9090/", "ws://[2001:db8::1]/", "ws://[2001:db8::2]/",
  "ws://[fd00::5]/", "wss://SKIP.EXAMPLE/", "ws://[::ffff:192.168.7.7]/",
  "ws://192.168.7.8/",
];
console.log(JSON.stringify(urls.map((u) => proxyFromEnvironment(new URL(u))?.href ?? null)));
`;

Deno.test("proxyFromEnvironment() follows HTTP_PROXY, HTTPS_PROXY and NO_PROXY as Go does", async () => {
  const env = {
    HTTP_PROXY: "http://proxy.example:3128",
    https_proxy: "secure.example:8443",
    NO_PROXY:
      "skip.example, .suffix.example,10.0.0.0/8 ,onlyport.example:8080,[2001:db8::1],fd00::/8,192.168.7.7",
  };
  const result = JSON.parse(await runChild(PROXY_CASES, env, ["--allow-env"]));
  const plain = "http://proxy.example:3128/";
  assert.deepEqual(result, [
    plain,
    "http://secure.example:8443/",
    null,
    null,
    null,
    null,
    null,
    plain,
    null,
    null,
    plain,
    null,
    plain,
    null,
    plain,
    null,
    null,
    null,
    plain,
  ]);
  const all = JSON.parse(
    await runChild(PROXY_CASES, { ...env, no_proxy: "*", NO_PROXY: "" }, [
      "--allow-env",
    ]),
  );
  assert.ok(all.every((value: string | null) => value === null));
  const cgi = JSON.parse(
    await runChild(PROXY_CASES, { ...env, REQUEST_METHOD: "GET" }, [
      "--allow-env",
    ]),
  );
  assert.equal(cgi[0], null);
  assert.equal(cgi[1], "http://secure.example:8443/");
});

Deno.test("proxyFromEnvironment() gives no proxy without --allow-env and never prompts", async () => {
  const result = JSON.parse(
    await runChild(PROXY_CASES, { HTTP_PROXY: "http://proxy.example:1" }, []),
  );
  assert.ok(result.every((value: string | null) => value === null));
});

Deno.test("module-level dial() goes through the proxy HTTP_PROXY names", async () => {
  const { server, port } = denoEchoServer();
  const proxy = startHttpProxy();
  try {
    // "localhost" is never proxied, so the child dials a name only the test
    // proxy resolves (to 127.0.0.1).
    const out = await runChild(
      `import { dial } from "DIALER";
       const { conn, response } = await dial("ws://echo.test:${port}/env");
       console.log(response.status);
       conn.close();`,
      { HTTP_PROXY: proxy.url },
      ["--allow-env", "--allow-net"],
    );
    assert.equal(out, "101");
    assert.deepEqual(proxy.targets, [`echo.test:${port}`]);
  } finally {
    await proxy.close();
    await server.shutdown();
  }
});

Deno.test("module-level dial() opens a connection", async () => {
  const { server, port } = denoEchoServer();
  try {
    const { conn } = await dial(`ws://127.0.0.1:${port}/`);
    assert.equal(decoder.decode(await echo(conn, 1, "hi")), "hi");
    await conn.closeGracefully(1000, "", { timeout: 2000 });
  } finally {
    await server.shutdown();
  }
});

// ---------------------------------------------------------------------------
// The echo example's command-line client

Deno.test("echo client sends on every tick and closes with 1000 on interrupt", async () => {
  const { runClient } = await import("../examples/echo/client.ts");
  let serverClosed!: (code: number) => void;
  const closeCode = new Promise<number>((resolve) => serverClosed = resolve);
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    (request) => {
      const { socket, response } = Deno.upgradeWebSocket(request);
      socket.onmessage = (event) => socket.send(event.data);
      socket.onclose = (event) => serverClosed(event.code);
      return response;
    },
  );
  try {
    const controller = new AbortController();
    const lines: string[] = [];
    await runClient({
      url: `ws://127.0.0.1:${server.addr.port}/ws`,
      signal: controller.signal,
      interval: 10,
      log(line) {
        lines.push(line);
        // Interrupt after the second echo, like Ctrl+C after two seconds.
        if (lines.filter((l) => l.startsWith("recv: ")).length === 2) {
          controller.abort();
        }
      },
    });
    assert.equal(await closeCode, 1000);
    const received = lines.filter((l) => l.startsWith("recv: "));
    assert.ok(received.length >= 2);
    assert.ok(!Number.isNaN(Date.parse(received[0].slice(6))));
    assert.ok(lines.includes("interrupt"));
    // The read loop ended on the server's close frame, not on the client
    // giving up waiting for it.
    assert.equal(lines.at(-1), "read: Connection closed: 1000");
  } finally {
    await server.shutdown();
  }
});

Deno.test("echo client --compress negotiates permessage-deflate with the echo server --compress", async () => {
  const { runClient } = await import("../examples/echo/client.ts");
  const { startServer } = await import("../examples/echo/server.ts");
  const server = startServer({ port: 0, compress: true, onListen() {} });
  try {
    const controller = new AbortController();
    const lines: string[] = [];
    await runClient({
      url: `ws://127.0.0.1:${server.addr.port}/ws`,
      compress: true,
      signal: controller.signal,
      interval: 10,
      log(line) {
        lines.push(line);
        if (line.startsWith("recv: ")) controller.abort();
      },
    });
    assert.match(lines[0], /^connected to .* \(permessage-deflate\)$/);
    assert.ok(lines.some((l) => l.startsWith("recv: ")));
  } finally {
    await server.shutdown({ closeWebSockets: true });
  }
});
