import assert from "node:assert/strict";
import { createServer } from "node:https";
import type { TLSSocket } from "node:tls";
import type { AddressInfo } from "node:net";
import { type ConnectAddress, Dialer, type DialerOptions } from "../dialer.ts";
import type { Conn } from "../conn.ts";
import { MESSAGE_TYPE } from "../frame.ts";
import { Upgrader } from "../upgrader.ts";
import { parseRequestHead, readHead } from "../_http.ts";
import { closeQuietly } from "./_helpers.ts";
import { startHttpProxy } from "./_proxy.ts";

const fixtures = new URL("./fixtures/", import.meta.url);
const read = (name: string) => Deno.readTextFileSync(new URL(name, fixtures));
const CA = read("ca.pem");
const CERT = read("cert.pem");
const KEY = read("key.pem");
const CLIENT_CA = read("client-ca.pem");
const CLIENT_CERT = read("client-cert.pem");
const CLIENT_KEY = read("client-key.pem");

const decoder = new TextDecoder();
const upgrader = new Upgrader();

/**
 * Reads a handshake request off a raw socket in plain text and upgrades it:
 * a dialer that ran a second TLS layer would send a ClientHello here, not a
 * GET line.
 */
async function acceptWebSocket(socket: Deno.Conn) {
  const got = await readHead(socket, { maxHeadBytes: 16 * 1024 });
  assert.ok(got !== null, "the client sent a request");
  const { method, target, fields } = parseRequestHead(got.head);
  assert.equal(method, "GET");
  const request = new Request(`http://localhost${target}`, {
    headers: fields,
  });
  const conn = await upgrader.upgradeConnection(socket, request, {
    head: got.rest,
  });
  return { conn, target, host: fields.host };
}

/** Echoes one message on the server side, then closes gracefully. */
async function echoOnce(conn: Conn) {
  const { type, data } = await conn.readMessage();
  await conn.writeMessage(type, data);
  await conn.closeGracefully(1000, "", { timeout: 2000 });
}

/** Sends `text` from the client, expects it back, and closes. */
async function roundTrip(conn: Conn, text: string) {
  await conn.writeMessage(MESSAGE_TYPE.Text, text);
  const { data } = await conn.readMessage();
  assert.equal(decoder.decode(data), text);
  await conn.closeGracefully(1000, "", { timeout: 2000 });
}

/** A Deno.listenTls server that upgrades every connection and echoes once. */
function tlsEchoServer(options: { alpnProtocols?: string[] } = {}) {
  const listener = Deno.listenTls({
    hostname: "127.0.0.1",
    port: 0,
    cert: CERT,
    key: KEY,
    ...options,
  });
  const seen: { alpnProtocol: string | null; target: string }[] = [];
  const done = (async () => {
    for await (const socket of listener) {
      const { alpnProtocol } = await socket.handshake();
      const { conn, target } = await acceptWebSocket(socket);
      seen.push({ alpnProtocol, target });
      await echoOnce(conn);
    }
  })();
  return {
    port: listener.addr.port,
    seen,
    async close() {
      listener.close();
      await done;
    },
  };
}

// ---------------------------------------------------------------------------
// connectTls

Deno.test("connectTls opens wss: and its connection is used as it is", async () => {
  const server = tlsEchoServer();
  const tlsCalls: ConnectAddress[] = [];
  const tcpCalls: ConnectAddress[] = [];
  const dialer = new Dialer({
    connect(address, { signal }) {
      tcpCalls.push(address);
      return Deno.connect({ ...address, signal });
    },
    connectTls(address) {
      tlsCalls.push(address);
      return Deno.connectTls({ ...address, caCerts: [CA] });
    },
  });
  try {
    const { conn } = await dialer.dial(
      `wss://127.0.0.1:${server.port}/as-is?q=1`,
    );
    await roundTrip(conn, "one TLS layer");
    assert.deepEqual(tlsCalls, [{ hostname: "127.0.0.1", port: server.port }]);
    assert.deepEqual(tcpCalls, []);
    // The server read the request in plain text right inside its one TLS
    // handshake: the dialer added no TLS of its own.
    assert.deepEqual(server.seen, [{
      alpnProtocol: null,
      target: "/as-is?q=1",
    }]);
  } finally {
    await server.close();
  }
});

Deno.test("connectTls is not called for ws: or through a proxy, connect is", async () => {
  const tlsServer = tlsEchoServer();
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const plain = (async () => {
    const socket = await listener.accept();
    await echoOnce((await acceptWebSocket(socket)).conn);
  })();
  const proxy = startHttpProxy();
  let tcpCalls = 0;
  const options: DialerOptions = {
    caCerts: [CA],
    connect(address, { signal }) {
      tcpCalls++;
      return Deno.connect({ ...address, signal });
    },
    connectTls: () => Promise.reject(new Error("connectTls was called")),
  };
  try {
    const { conn } = await new Dialer(options).dial(
      `ws://127.0.0.1:${listener.addr.port}/`,
    );
    await roundTrip(conn, "plain");
    await plain;
    assert.equal(tcpCalls, 1);

    const proxied = new Dialer({ ...options, proxy: () => proxy.url });
    const tunnelled = await proxied.dial(`wss://localhost:${tlsServer.port}/`);
    await roundTrip(tunnelled.conn, "tunnelled");
    assert.equal(tcpCalls, 2, "connect opened the proxy connection");
    assert.deepEqual(proxy.targets, [`localhost:${tlsServer.port}`]);
  } finally {
    listener.close();
    await proxy.close();
    await tlsServer.close();
  }
});

Deno.test("connectTls that lets the server choose h2 fails the dial with a TypeError", async () => {
  const listener = Deno.listenTls({
    hostname: "127.0.0.1",
    port: 0,
    cert: CERT,
    key: KEY,
    alpnProtocols: ["h2"],
  });
  const served = (async () => {
    const socket = await listener.accept();
    assert.equal((await socket.handshake()).alpnProtocol, "h2");
    // The client gives up without sending a request.
    assert.equal(await socket.read(new Uint8Array(64)), null);
    socket.close();
  })();
  const dialer = new Dialer({
    connectTls: (address) =>
      Deno.connectTls({ ...address, caCerts: [CA], alpnProtocols: ["h2"] }),
  });
  try {
    await assert.rejects(
      dialer.dial(`wss://127.0.0.1:${listener.addr.port}/`),
      (error) =>
        error instanceof TypeError &&
        /the server chose the ALPN protocol "h2", but the handshake is an HTTP\/1\.1 request/
          .test(error.message),
    );
    await served;
  } finally {
    listener.close();
  }
});

// ---------------------------------------------------------------------------
// ALPN

Deno.test("alpnProtocols are offered to a wss: server, which sees its choice", async () => {
  const server = tlsEchoServer({ alpnProtocols: ["http/1.1"] });
  try {
    const offered = new Dialer({
      caCerts: [CA],
      alpnProtocols: ["x-test", "http/1.1"],
    });
    await roundTrip(
      (await offered.dial(`wss://localhost:${server.port}/alpn`)).conn,
      "alpn",
    );
    const none = new Dialer({ caCerts: [CA] });
    await roundTrip(
      (await none.dial(`wss://localhost:${server.port}/none`)).conn,
      "none",
    );
    assert.deepEqual(server.seen, [
      { alpnProtocol: "http/1.1", target: "/alpn" },
      { alpnProtocol: null, target: "/none" },
    ]);
  } finally {
    await server.close();
  }
});

// ---------------------------------------------------------------------------
// Client certificates

Deno.test("cert and key are presented to a server that requires a client certificate", async () => {
  const seen: { authorized: boolean; name: string; alpn: unknown }[] = [];
  const server = createServer({
    cert: CERT,
    key: KEY,
    ca: [CLIENT_CA],
    requestCert: true,
    rejectUnauthorized: true,
    ALPNProtocols: ["http/1.1"],
  });
  server.on("upgrade", async (request, socket, head) => {
    const tls = socket as TLSSocket;
    seen.push({
      authorized: tls.authorized,
      name: tls.getPeerCertificate().subject.CN,
      alpn: tls.alpnProtocol,
    });
    await echoOnce(await upgrader.upgradeNode(request, socket, { head }));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  try {
    const dialer = new Dialer({
      caCerts: [CA],
      cert: CLIENT_CERT,
      key: CLIENT_KEY,
      alpnProtocols: ["http/1.1"],
    });
    await roundTrip(
      (await dialer.dial(`wss://localhost:${port}/mtls`)).conn,
      "mutual",
    );
    assert.deepEqual(seen, [
      { authorized: true, name: "websocket test client", alpn: "http/1.1" },
    ]);
    // Without a certificate the server refuses the TLS handshake.
    await assert.rejects(
      new Dialer({ caCerts: [CA] }).dial(`wss://localhost:${port}/`),
      /CertificateRequired|certificate/i,
    );
    assert.equal(seen.length, 1);
  } finally {
    await new Promise((resolve) => server.close(resolve));
  }
});

Deno.test("a client certificate cannot go through a proxy to a wss: server", async () => {
  let asked = 0;
  const dialer = new Dialer({
    cert: CLIENT_CERT,
    key: CLIENT_KEY,
    proxy: () => (asked++, "http://127.0.0.1:1"),
  });
  await assert.rejects(
    dialer.dial("wss://localhost/"),
    (error) =>
      error instanceof TypeError &&
      error.message ===
        "Cannot dial a wss: URL through a proxy with a client certificate: Deno.startTls cannot present one",
  );
  assert.equal(asked, 1);
});

// ---------------------------------------------------------------------------
// Unix sockets

/** A Unix socket server that upgrades each connection and echoes once. */
async function unixEchoServer(name: string) {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/${name}`;
  const listener = Deno.listen({ transport: "unix", path });
  const seen: { target: string; host: string | null }[] = [];
  const done = (async () => {
    for await (const socket of listener) {
      const { conn, target, host } = await acceptWebSocket(socket);
      seen.push({ target, host });
      await echoOnce(conn);
    }
  })();
  return {
    path,
    seen,
    async close() {
      listener.close();
      await done;
      await Deno.remove(dir, { recursive: true });
    },
  };
}

Deno.test("dial() reaches a Unix socket through a ws+unix: URL with the Host line localhost", async () => {
  const server = await unixEchoServer("a b.sock");
  let asked = 0;
  const dialer = new Dialer({ proxy: () => (asked++, "http://127.0.0.1:1") });
  try {
    const socket = server.path.replaceAll(" ", "%20");
    for (
      const url of [`ws+unix://${socket}:/chat?room=1`, `ws+unix://${socket}`]
    ) {
      const { conn } = await dialer.dial(url);
      assert.equal(conn.remoteAddr?.transport, "unix");
      await roundTrip(conn, url);
    }
    assert.deepEqual(server.seen, [
      { target: "/chat?room=1", host: "localhost" },
      { target: "/", host: "localhost" },
    ]);
    assert.equal(asked, 0, "ws+unix: never asks for a proxy");
  } finally {
    await server.close();
  }
});

Deno.test("a connect that opens a Unix socket serves a ws: URL", async () => {
  const server = await unixEchoServer("connect.sock");
  const dialer = new Dialer({
    connect: () => Deno.connect({ transport: "unix", path: server.path }),
  });
  try {
    await roundTrip(
      (await dialer.dial("ws://api.local/v1")).conn,
      "via connect",
    );
    assert.deepEqual(server.seen, [{ target: "/v1", host: "api.local" }]);
  } finally {
    await server.close();
  }
});

// ---------------------------------------------------------------------------
// Bad inputs

Deno.test("new Dialer() refuses client certificate options it cannot honour", () => {
  const cases: [DialerOptions, string][] = [
    [{ cert: CLIENT_CERT }, "cert needs key"],
    [{ key: CLIENT_KEY }, "key needs cert"],
    [
      { cert: 1 as unknown as string, key: CLIENT_KEY },
      "cert and key must be PEM strings",
    ],
    [
      {
        cert: CLIENT_CERT,
        key: CLIENT_KEY,
        connectTls: (address) => Deno.connectTls(address),
      },
      "cert and key cannot be used with connectTls, which opens the TLS connection itself: present the certificate there",
    ],
    [
      {
        cert: CLIENT_CERT,
        key: CLIENT_KEY,
        connect: (address) => Deno.connect(address),
      },
      "cert and key cannot be used with connect: Deno.startTls cannot present a client certificate over its connection, use connectTls",
    ],
    [
      { cert: CLIENT_CERT, key: CLIENT_KEY, serverName: "localhost" },
      "cert and key cannot be used with serverName: Deno.connectTls verifies the name it connects to",
    ],
    [
      { connectTls: "tls" as unknown as DialerOptions["connectTls"] },
      "connectTls must be a function, got string",
    ],
    [
      { connect: {} as unknown as DialerOptions["connect"] },
      "connect must be a function, got object",
    ],
  ];
  for (const [options, problem] of cases) {
    assert.throws(
      () => new Dialer(options),
      (error) =>
        error instanceof TypeError &&
        error.message === `Cannot create the dialer: ${problem}`,
    );
  }
});

Deno.test("new Dialer() refuses ALPN protocols that are not usable names or not HTTP/1.1", () => {
  const cases: [unknown, RegExp][] = [
    ["http/1.1", /alpnProtocols must be an array of strings/],
    [[1], /"?1"?: it is not a string/],
    [[""], /"": a name takes 1 to 255 bytes/],
    [["x".repeat(256)], /a name takes 1 to 255 bytes/],
    [
      ["http/1.1", "h2"],
      /"h2": the WebSocket handshake is an HTTP\/1\.1 request \(RFC 6455 section 4\.1\), offer "http\/1\.1"/,
    ],
    [["h2c"], /"h2c": the WebSocket handshake/],
    [["h3"], /"h3": the WebSocket handshake/],
    [
      ["http/1.1", "http/1.1"],
      /Cannot offer the ALPN protocol "http\/1\.1" twice/,
    ],
  ];
  for (const [alpnProtocols, message] of cases) {
    assert.throws(
      () => new Dialer({ alpnProtocols: alpnProtocols as string[] }),
      (error) => error instanceof TypeError && message.test(error.message),
    );
  }
  // 255 bytes is the longest name (RFC 7301 section 3.1).
  new Dialer({ alpnProtocols: ["x".repeat(255), "http/1.1"] });
});

Deno.test("dial() refuses ws+unix: URLs without a usable socket or request path", async () => {
  const cases: [string, string][] = [
    [
      "ws+unix://host/tmp/socket",
      "a ws+unix: URL has no host, the socket path follows the scheme (ws+unix:///path/to/socket:/request/path)",
    ],
    ["ws+unix:///", "no socket path"],
    ["ws+unix:", "no socket path"],
    ["ws+unix:///:/chat", "no socket path"],
    [
      "ws+unix:///tmp/socket:chat",
      "the request path after the socket path must start with /",
    ],
    ["ws+unix:///tmp/%E0.sock", "the socket path is badly encoded"],
  ];
  for (const [url, problem] of cases) {
    await assert.rejects(
      new Dialer().dial(url),
      (error) =>
        error instanceof TypeError &&
        error.message ===
          `Cannot dial ${JSON.stringify(new URL(url).href)}: ${problem}`,
    );
  }
  await assert.rejects(
    new Dialer().dial("wss+unix:///tmp/socket"),
    /the scheme must be ws:, wss: or ws\+unix:, not wss\+unix:/,
  );
});

Deno.test("dial() closes a socket that connectTls hands over after an abort", async () => {
  const listener = Deno.listenTls({
    hostname: "127.0.0.1",
    port: 0,
    cert: CERT,
    key: KEY,
  });
  const controller = new AbortController();
  let opened: Deno.TlsConn | undefined;
  const dialer = new Dialer({
    async connectTls(address) {
      opened = await Deno.connectTls({ ...address, caCerts: [CA] });
      controller.abort(new Error("gave up"));
      return opened;
    },
  });
  const accepted = listener.accept();
  try {
    await assert.rejects(
      dialer.dial(`wss://127.0.0.1:${listener.addr.port}/`, {
        signal: controller.signal,
      }),
      /gave up/,
    );
    assert.ok(opened !== undefined);
    assert.throws(() => opened!.close(), Deno.errors.BadResource);
  } finally {
    closeQuietly(await accepted);
    listener.close();
  }
});
