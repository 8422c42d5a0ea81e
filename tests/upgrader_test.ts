// Tests for upgrader.ts: the server side of the opening handshake over real
// loopback sockets. Failure paths are driven with hand-written request bytes
// and checked byte for byte on the client side of the socket.

import assert from "node:assert/strict";
import type { Buffer } from "node:buffer";
import { createServer, type IncomingMessage } from "node:http";
import { Duplex as NodeDuplex } from "node:stream";
import type { Duplex } from "node:stream";
import type { AddressInfo } from "node:net";
import {
  type BufferPool,
  CloseError,
  type Conn,
  type Transport,
} from "../conn.ts";
import { MESSAGE_TYPE } from "../frame.ts";
import { type Closer, registerConnection } from "../_hijack.ts";
import { parseRequestHead, parseResponseHead, readHead } from "../_http.ts";
import { NodeTransport } from "../_node.ts";
import {
  checkSameOrigin,
  HandshakeError,
  isWebSocketUpgrade,
  serve,
  subprotocols,
  Upgrader,
  type UpgraderOptions,
} from "../upgrader.ts";
import { clientFrame, concat } from "./_frames.ts";

const KEY = "dGhlIHNhbXBsZSBub25jZQ==";
// RFC 6455 section 1.3's worked example (also SHA-1 + base64 computed outside
// Deno). The issue text quotes "s3pPLMBiTxaQ9kYGzzhZRrKMk+o=", a typo: no
// correct server can produce it.
const ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
const encoder = new TextEncoder();
const decoder = new TextDecoder();

/**
 * A handshake request. `headers` overrides the valid defaults; `null`
 * removes a header.
 */
function requestBytes(
  headers: Record<string, string | null> = {},
  method = "GET",
): Uint8Array {
  const fields: Record<string, string | null> = {
    Host: "localhost",
    Connection: "Upgrade",
    Upgrade: "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": KEY,
    ...headers,
  };
  let text = `${method} /chat HTTP/1.1\r\n`;
  for (const [name, value] of Object.entries(fields)) {
    if (value !== null) text += `${name}: ${value}\r\n`;
  }
  return encoder.encode(text + "\r\n");
}

async function readAll(conn: Transport): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  const buffer = new Uint8Array(4096);
  for (;;) {
    const n = await conn.read(buffer);
    if (n === null) return concat(...chunks);
    chunks.push(buffer.slice(0, n));
  }
}

/** Builds the web Request a server would from a parsed head. */
function toRequest(head: Uint8Array): Request {
  const { method, target, fields } = parseRequestHead(head);
  const url = new URL(target, `http://${fields.host ?? "localhost"}`);
  return new Request(url, { method, headers: fields });
}

interface Exchange {
  /**
   * The upgrade's outcome. A refused upgrade settles only once the client
   * has closed (or the server's linger expired), so read first.
   */
  settled: Promise<PromiseSettledResult<Conn>>;
  /** The client's side of the socket. */
  client: Deno.Conn;
  /** What the client read up to the end of the response head. */
  head: Uint8Array;
  /** What the client read past the response head. */
  rest: Uint8Array;
}

/**
 * Sends `bytes` on a fresh loopback connection, parses the request head on
 * the server side as an application would and upgrades it with
 * `upgradeConnection`, passing the bytes read past the head along.
 */
async function exchange(
  bytes: Uint8Array,
  upgrader = new Upgrader(),
  responseHeaders?: HeadersInit,
): Promise<Exchange> {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const client = await Deno.connect({
    hostname: "127.0.0.1",
    port: listener.addr.port,
  });
  const serverSide = listener.accept().then(async (tcp) => {
    const read = await readHead(tcp, { maxHeadBytes: 16384 });
    assert.ok(read !== null);
    return upgrader.upgradeConnection(tcp, toRequest(read.head), {
      head: read.rest,
      responseHeaders,
    });
  });
  await client.write(bytes);
  const response = await readHead(client, { maxHeadBytes: 16384 });
  assert.ok(response !== null, "the server closed without a response");
  const settled = Promise.allSettled([serverSide]).then(([result]) => result);
  return { settled, client, head: response.head, rest: response.rest };
}

/** Runs a handshake that must succeed and returns the server's Conn. */
async function accepted(
  bytes: Uint8Array,
  upgrader = new Upgrader(),
  responseHeaders?: HeadersInit,
): Promise<
  { conn: Conn; client: Deno.Conn; head: Uint8Array; rest: Uint8Array }
> {
  const { settled, client, head, rest } = await exchange(
    bytes,
    upgrader,
    responseHeaders,
  );
  const result = await settled;
  if (result.status === "rejected") {
    client.close();
    throw result.reason;
  }
  return { conn: result.value, client, head, rest };
}

/**
 * Runs a handshake that must fail and returns the error, the status line and
 * headers of the response and its body; every socket is closed.
 */
async function refused(
  bytes: Uint8Array,
  upgrader = new Upgrader(),
  responseHeaders?: HeadersInit,
): Promise<
  { error: unknown; status: number; headers: Headers; body: string }
> {
  const { settled, client, head, rest } = await exchange(
    bytes,
    upgrader,
    responseHeaders,
  );
  const body = concat(rest, await readAll(client));
  client.close();
  const result = await settled;
  assert.equal(result.status, "rejected");
  const { status, headers } = parseResponseHead(head);
  return { error: result.reason, status, headers, body: decoder.decode(body) };
}

const FAILURES: {
  name: string;
  bytes: Uint8Array;
  status: number;
  headers?: Record<string, string>;
}[] = [
  {
    name: "the Connection header is missing",
    bytes: requestBytes({ Connection: null }),
    status: 400,
  },
  {
    name: "Connection has no upgrade token",
    bytes: requestBytes({ Connection: "keep-alive" }),
    status: 400,
  },
  {
    name: "the Upgrade header is missing",
    bytes: requestBytes({ Upgrade: null }),
    status: 426,
    headers: { upgrade: "websocket" },
  },
  {
    name: "Upgrade names another protocol",
    bytes: requestBytes({ Upgrade: "h2c" }),
    status: 426,
    headers: { upgrade: "websocket" },
  },
  {
    name: "the method is POST",
    bytes: requestBytes({}, "POST"),
    status: 405,
    headers: { allow: "GET" },
  },
  {
    name: "Sec-WebSocket-Version is missing",
    bytes: requestBytes({ "Sec-WebSocket-Version": null }),
    status: 400,
  },
  {
    name: "Sec-WebSocket-Version is 8",
    bytes: requestBytes({ "Sec-WebSocket-Version": "8" }),
    status: 400,
  },
  {
    name: "the Origin's host differs from Host",
    bytes: requestBytes({ Origin: "http://evil.example" }),
    status: 403,
  },
  {
    name: "Sec-WebSocket-Key is missing",
    bytes: requestBytes({ "Sec-WebSocket-Key": null }),
    status: 400,
  },
  {
    name: "Sec-WebSocket-Key decodes to 15 bytes",
    bytes: requestBytes({ "Sec-WebSocket-Key": "AAAAAAAAAAAAAAAAAAAA" }),
    status: 400,
  },
  {
    name: "Sec-WebSocket-Key is not base64",
    bytes: requestBytes({ "Sec-WebSocket-Key": "!!!!!!!!!!!!!!!!!!!!!!==" }),
    status: 400,
  },
];

const REASONS: Record<number, string> = {
  400: "Bad Request",
  403: "Forbidden",
  405: "Method Not Allowed",
  426: "Upgrade Required",
  500: "Internal Server Error",
};

for (const failure of FAILURES) {
  Deno.test(`upgradeConnection() answers ${failure.status} when ${failure.name}`, async () => {
    const { error, status, headers, body } = await refused(failure.bytes);
    assert.ok(error instanceof HandshakeError);
    assert.equal(error.name, "HandshakeError");
    assert.equal(error.status, failure.status);
    assert.match(error.message, /^Cannot upgrade the connection: /);
    assert.equal(status, failure.status);
    const reason = REASONS[failure.status];
    assert.equal(body, `${reason}\n`);
    assert.deepEqual(Object.fromEntries(headers), {
      "connection": "close",
      "content-length": String(reason.length + 1),
      "content-type": "text/plain; charset=utf-8",
      "sec-websocket-version": "13",
      "x-content-type-options": "nosniff",
      ...failure.headers,
    });
  });
}

Deno.test("upgradeConnection() answers 500 when the application sets Sec-WebSocket-Extensions", async () => {
  const { error, status, headers } = await refused(
    requestBytes(),
    new Upgrader(),
    { "Sec-WebSocket-Extensions": "permessage-deflate" },
  );
  assert.ok(error instanceof HandshakeError);
  assert.equal(error.status, 500);
  assert.equal(status, 500);
  assert.equal(headers.get("sec-websocket-version"), "13");
  assert.equal(headers.has("sec-websocket-extensions"), false);
});

Deno.test("upgradeConnection() checks in gorilla's order: Connection, Upgrade, method, version, extensions, origin, key", async () => {
  // Each request breaks the check under test and every check after it, so
  // only the earliest failure may decide the status.
  const cases: [Uint8Array, HeadersInit | undefined, number][] = [
    [
      requestBytes({
        Connection: null,
        Upgrade: null,
        "Sec-WebSocket-Version": "8",
        Origin: "null",
        "Sec-WebSocket-Key": null,
      }, "POST"),
      { "Sec-WebSocket-Extensions": "x" },
      400,
    ],
    [
      requestBytes({
        Upgrade: null,
        "Sec-WebSocket-Version": "8",
        Origin: "null",
        "Sec-WebSocket-Key": null,
      }, "POST"),
      { "Sec-WebSocket-Extensions": "x" },
      426,
    ],
    [
      requestBytes({
        "Sec-WebSocket-Version": "8",
        Origin: "null",
        "Sec-WebSocket-Key": null,
      }, "POST"),
      { "Sec-WebSocket-Extensions": "x" },
      405,
    ],
    [
      requestBytes({
        "Sec-WebSocket-Version": "8",
        Origin: "null",
        "Sec-WebSocket-Key": null,
      }),
      { "Sec-WebSocket-Extensions": "x" },
      400,
    ],
    [
      requestBytes({ Origin: "null", "Sec-WebSocket-Key": null }),
      { "Sec-WebSocket-Extensions": "x" },
      500,
    ],
    [
      requestBytes({ Origin: "null", "Sec-WebSocket-Key": null }),
      undefined,
      403,
    ],
  ];
  for (const [bytes, responseHeaders, expected] of cases) {
    const { error, status } = await refused(
      bytes,
      new Upgrader(),
      responseHeaders,
    );
    assert.equal(status, expected);
    assert.ok(error instanceof HandshakeError);
    assert.equal(error.status, expected);
  }
});

Deno.test("upgradeConnection() accepts a valid request with RFC 6455's sample key and an exact 101", async () => {
  const { conn, client, head, rest } = await accepted(requestBytes());
  assert.equal(
    decoder.decode(head),
    "HTTP/1.1 101 Switching Protocols\r\n" +
      "Upgrade: websocket\r\n" +
      "Connection: Upgrade\r\n" +
      `Sec-WebSocket-Accept: ${ACCEPT}\r\n` +
      "\r\n",
  );
  assert.equal(rest.length, 0);
  assert.equal(conn.subprotocol, "");
  conn.close();
  assert.equal((await readAll(client)).length, 0);
  client.close();
});

Deno.test("upgradeConnection() accepts tokens in any case and among others", async () => {
  const { conn, client } = await accepted(requestBytes({
    Connection: "keep-alive, UPGRADE",
    Upgrade: "foo, WebSocket",
    "Sec-WebSocket-Version": "8, 13",
  }));
  conn.close();
  client.close();
});

Deno.test("upgradeConnection() answers a refused HEAD request without a body", async () => {
  const { status, headers, body } = await refused(
    requestBytes({ Upgrade: null }, "HEAD"),
  );
  assert.equal(status, 426);
  assert.equal(headers.get("content-length"), "0");
  assert.equal(body, "");
});

Deno.test("upgradeConnection() reads a frame pipelined right behind the request head first", async () => {
  const frame = clientFrame(0x1, encoder.encode("early"));
  const { conn, client } = await accepted(concat(requestBytes(), frame));
  const message = await conn.readMessage();
  assert.equal(message.type, MESSAGE_TYPE.Text);
  assert.equal(decoder.decode(message.data), "early");
  conn.close();
  client.close();
});

Deno.test("upgradeConnection() answers with the error option's response and still adds Upgrade to a 426", async () => {
  const seen: HandshakeError[] = [];
  const upgrader = new Upgrader({
    error(request, error) {
      assert.equal(new URL(request.url).pathname, "/chat");
      seen.push(error);
      return new Response("go away", {
        status: error.status,
        headers: { "x-app": "1" },
      });
    },
  });
  const { error, status, headers, body } = await refused(
    requestBytes({ Upgrade: "h2c" }),
    upgrader,
  );
  assert.equal(seen.length, 1);
  assert.equal(seen[0], error);
  assert.equal(status, 426);
  assert.equal(body, "go away");
  assert.equal(headers.get("x-app"), "1");
  assert.equal(headers.get("upgrade"), "websocket");
  assert.equal(headers.get("connection"), "close");
  assert.equal(headers.get("content-length"), "7");
  // The version header belongs to the default response only, as in gorilla.
  assert.equal(headers.has("sec-websocket-version"), false);
});

Deno.test("upgradeConnection() sends the default response and rejects with the error option's own error when it throws", async () => {
  const bug = new Error("bug in the error option");
  const upgrader = new Upgrader({
    error() {
      throw bug;
    },
  });
  const { error, status, body } = await refused(
    requestBytes({ Connection: null }),
    upgrader,
  );
  assert.equal(error, bug);
  assert.equal(status, 400);
  assert.equal(body, "Bad Request\n");
});

Deno.test("upgradeConnection() answers 500 when checkOrigin throws, with the thrown error as cause", async () => {
  const bug = new Error("origin database down");
  const upgrader = new Upgrader({
    checkOrigin() {
      throw bug;
    },
  });
  const { error, status } = await refused(requestBytes(), upgrader);
  assert.equal(status, 500);
  assert.ok(error instanceof HandshakeError);
  assert.equal(error.cause, bug);
});

Deno.test("upgradeConnection() lets an async checkOrigin accept any origin", async () => {
  const upgrader = new Upgrader({
    checkOrigin: (request) =>
      Promise.resolve(request.headers.get("origin") === "https://app.test"),
  });
  const { conn, client } = await accepted(
    requestBytes({ Origin: "https://app.test" }),
    upgrader,
  );
  conn.close();
  client.close();
});

Deno.test("checkSameOrigin() follows gorilla's origin matrix", () => {
  const cases: [string | null, string, boolean][] = [
    [null, "example.com", true],
    ["http://example.com", "example.com", true],
    ["https://example.com", "example.com", true],
    ["http://EXAMPLE.com", "example.COM", true],
    ["http://example.com:8080", "example.com:8080", true],
    ["http://example.com:8080/path?q", "example.com:8080", true],
    ["http://user@example.com", "example.com", true],
    ["http://[::1]:9000", "[::1]:9000", true],
    ["http://example.com", "example.com:8080", false],
    ["http://example.com:8080", "example.com", false],
    ["http://example.com:80", "example.com", false],
    ["http://example.com", "example.com:80", false],
    ["http://other.com", "example.com", false],
    ["http://example.com.evil", "example.com", false],
    ["null", "example.com", false],
    ["", "example.com", false],
    ["example.com", "example.com", false],
    ["http://", "example.com", false],
    ["http://exa mple.com", "exa mple.com", false],
  ];
  for (const [origin, host, allowed] of cases) {
    const headers = new Headers({ host });
    if (origin !== null) headers.set("origin", origin);
    const request = new Request("http://placeholder/", { headers });
    assert.equal(
      checkSameOrigin(request),
      allowed,
      `Origin ${origin} with Host ${host}`,
    );
  }
});

Deno.test("checkSameOrigin() compares with the URL's host when the request has no Host header", () => {
  const request = new Request("http://example.com:8080/", {
    headers: { origin: "http://example.com:8080" },
  });
  assert.equal(checkSameOrigin(request), true);
});

Deno.test("upgradeConnection() picks the first subprotocol in the client's order that the server supports", async () => {
  const cases: [string | null, string[], string][] = [
    ["b, a", ["a", "b"], "b"],
    ["a, b", ["b", "a"], "a"],
    ["x, b", ["a", "b"], "b"],
    ["x, y", ["a", "b"], ""],
    [null, ["a"], ""],
    ["a", [], ""],
  ];
  for (const [offered, supported, chosen] of cases) {
    const { conn, client, head } = await accepted(
      requestBytes({ "Sec-WebSocket-Protocol": offered }),
      new Upgrader({ subprotocols: supported }),
    );
    assert.equal(conn.subprotocol, chosen);
    assert.equal(
      parseResponseHead(head).headers.get("sec-websocket-protocol"),
      chosen === "" ? null : chosen,
    );
    conn.close();
    client.close();
  }
});

Deno.test("upgradeConnection() takes the application's Sec-WebSocket-Protocol when no subprotocols are configured", async () => {
  const { conn, client, head } = await accepted(
    requestBytes({ "Sec-WebSocket-Protocol": "a, b" }),
    new Upgrader(),
    { "Sec-WebSocket-Protocol": "b" },
  );
  assert.equal(conn.subprotocol, "b");
  const lines = decoder.decode(head).split("\r\n");
  assert.deepEqual(
    lines.filter((l) => /^sec-websocket-protocol:/i.test(l)),
    ["Sec-WebSocket-Protocol: b"],
  );
  conn.close();
  client.close();
});

Deno.test("upgradeConnection() ignores the application's Sec-WebSocket-Protocol when subprotocols are configured", async () => {
  const { conn, client, head } = await accepted(
    requestBytes({ "Sec-WebSocket-Protocol": "a, b" }),
    new Upgrader({ subprotocols: ["a"] }),
    { "Sec-WebSocket-Protocol": "b" },
  );
  assert.equal(conn.subprotocol, "a");
  assert.equal(
    parseResponseHead(head).headers.get("sec-websocket-protocol"),
    "a",
  );
  conn.close();
  client.close();
});

Deno.test("upgradeConnection() refuses an application Sec-WebSocket-Protocol that is not one token, answering 500", async () => {
  const { error, status } = await refused(
    requestBytes({ "Sec-WebSocket-Protocol": "a, b" }),
    new Upgrader(),
    { "Sec-WebSocket-Protocol": "a, b" },
  );
  assert.ok(error instanceof TypeError);
  assert.match(error.message, /is not a single token/);
  assert.equal(status, 500);
});

Deno.test("upgradeConnection() writes the application's headers, each Set-Cookie on its own line", async () => {
  const { conn, client, head } = await accepted(
    requestBytes(),
    new Upgrader(),
    [["Set-Cookie", "a=1"], ["Set-Cookie", "b=2"], ["X-Server", "test"]],
  );
  const lines = decoder.decode(head).split("\r\n");
  assert.deepEqual(lines.filter((l) => l.startsWith("set-cookie:")), [
    "set-cookie: a=1",
    "set-cookie: b=2",
  ]);
  assert.ok(lines.includes("x-server: test"));
  conn.close();
  client.close();
});

Deno.test("upgradeConnection() refuses response headers that would inject a header line, answering 500", async () => {
  const injections: HeadersInit[] = [
    { "X-Evil": "a\r\nInjected: 1" },
    { "X-Evil": "a\nInjected: 1" },
    { "X-Evil": "a\0b" },
    { "X-Evil\r\nInjected": "1" },
    [["Bad Name", "1"]],
  ];
  for (const responseHeaders of injections) {
    const { error, status, headers } = await refused(
      requestBytes(),
      new Upgrader(),
      responseHeaders,
    );
    assert.ok(error instanceof TypeError);
    assert.match(
      error.message,
      /^Cannot upgrade the connection with these response headers: /,
    );
    assert.ok(error.cause instanceof TypeError);
    assert.equal(status, 500);
    assert.equal(headers.has("injected"), false);
  }
});

Deno.test("upgradeConnection() refuses response headers that set what the Upgrader controls", async () => {
  for (
    const name of [
      "Upgrade",
      "Connection",
      "Sec-WebSocket-Accept",
      "Content-Length",
      "Transfer-Encoding",
    ]
  ) {
    const { error, status } = await refused(
      requestBytes(),
      new Upgrader(),
      { [name]: "x" },
    );
    assert.ok(error instanceof TypeError);
    assert.match(error.message, new RegExp(name.toLowerCase()));
    assert.equal(status, 500);
  }
});

Deno.test("upgradeConnection() rejects with TimedOut and closes the transport when the 101 cannot be written in time", async () => {
  let closed = false;
  const stuck: Transport = {
    read: () => new Promise(() => {}),
    write: () =>
      new Promise((_resolve, reject) => {
        // Settles only when closed, as a socket write would.
        const poll = setInterval(() => {
          if (closed) {
            clearInterval(poll);
            reject(new Deno.errors.BadResource("closed"));
          }
        }, 5);
      }),
    close: () => {
      closed = true;
    },
  };
  const upgrader = new Upgrader({ handshakeTimeout: 50 });
  const request = toRequest(requestBytes());
  await assert.rejects(
    upgrader.upgradeConnection(stuck, request),
    (error: Error) => {
      assert.ok(error instanceof Deno.errors.TimedOut);
      assert.match(error.message, /handshake timeout of 50 ms/);
      return true;
    },
  );
  assert.equal(closed, true);
  // Let the stuck write settle so its interval is cleared.
  await new Promise((resolve) => setTimeout(resolve, 20));
});

Deno.test("upgradeConnection() rejects, without an unhandled rejection, when the client resets before the 101", async () => {
  const failing: Transport = {
    read: () => Promise.resolve(null),
    write: () =>
      Promise.reject(new Deno.errors.ConnectionReset("connection reset")),
    close: () => {},
  };
  await assert.rejects(
    new Upgrader().upgradeConnection(failing, toRequest(requestBytes())),
    Deno.errors.ConnectionReset,
  );
  // A refused handshake still reports the refusal when the response cannot
  // be delivered.
  await assert.rejects(
    new Upgrader().upgradeConnection(
      failing,
      toRequest(requestBytes({ Upgrade: null })),
    ),
    (error: Error) => error instanceof HandshakeError && error.status === 426,
  );
});

Deno.test("upgradeConnection() survives a client that hangs up right after its request", async () => {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  for (const bytes of [requestBytes(), requestBytes({ Connection: null })]) {
    const client = await Deno.connect({
      hostname: "127.0.0.1",
      port: listener.addr.port,
    });
    await client.write(bytes);
    client.close();
    const tcp = await listener.accept();
    const read = await readHead(tcp, { maxHeadBytes: 16384 });
    assert.ok(read !== null);
    const settled = await Promise.allSettled([
      new Upgrader().upgradeConnection(tcp, toRequest(read.head)),
    ]);
    if (settled[0].status === "fulfilled") {
      // The 101 fit in the socket buffer; the Conn then sees the hang-up.
      await assert.rejects(settled[0].value.readMessage());
      settled[0].value.close();
    }
  }
});

Deno.test("new Upgrader() refuses invalid options", () => {
  const invalid: [UpgraderOptions, typeof TypeError | typeof RangeError][] = [
    [{ readBufferSize: 0 }, RangeError],
    [{ writeBufferSize: 1.5 }, RangeError],
    [{ handshakeTimeout: -1 }, RangeError],
    [{ handshakeTimeout: Infinity }, RangeError],
    [{ handshakeTimeout: NaN }, RangeError],
    [{ subprotocols: ["a b"] }, TypeError],
    [{ subprotocols: [""] }, TypeError],
    [{ checkOrigin: true as unknown as () => boolean }, TypeError],
    [{ error: "x" as unknown as () => Response }, TypeError],
    [{ subprotocols: "chat" as unknown as string[] }, TypeError],
    [{ writeBufferPool: {} as unknown as BufferPool }, TypeError],
    [{ compressionThreshold: -1 }, RangeError],
  ];
  for (const [options, type] of invalid) {
    assert.throws(() => new Upgrader(options), type, JSON.stringify(options));
  }
});

Deno.test("upgradeConnection() and upgradeNode() reject arguments of the wrong kind with a TypeError", async () => {
  const upgrader = new Upgrader();
  const request = toRequest(requestBytes());
  const transport: Transport = {
    read: () => Promise.resolve(null),
    write: (data) => Promise.resolve(data.length),
    close: () => {},
  };
  const cases: [Promise<Conn>, RegExp][] = [
    [upgrader.upgradeConnection({} as Transport, request), /conn must have/],
    [
      upgrader.upgradeConnection(transport, {} as Request),
      /request must be a Request/,
    ],
    [
      upgrader.upgradeConnection(transport, request, {
        head: "x" as unknown as Uint8Array,
      }),
      /head must be a Uint8Array/,
    ],
    [
      upgrader.upgradeNode({} as IncomingMessage, {} as Duplex),
      /socket must be the node socket/,
    ],
    [
      upgrader.upgradeNode({} as IncomingMessage, fakeSocket()),
      /request must be the node http.IncomingMessage/,
    ],
  ];
  for (const [promise, message] of cases) {
    await assert.rejects(promise, (error: Error) => {
      assert.ok(error instanceof TypeError);
      assert.match(error.message, /^Cannot upgrade the connection: /);
      assert.match(error.message, message);
      return true;
    });
  }
});

Deno.test("upgrade() rejects a request that did not come from serve()", async () => {
  await assert.rejects(
    new Upgrader().upgrade(new Request("http://localhost/")),
    (error: Error) =>
      error instanceof TypeError &&
      /not received by serve\(\)/.test(error.message),
  );
});

Deno.test("isWebSocketUpgrade() requires both the Connection and the Upgrade tokens", () => {
  const request = (headers: Record<string, string>) =>
    new Request("http://localhost/", { headers });
  assert.equal(
    isWebSocketUpgrade(
      request({ connection: "Upgrade", upgrade: "websocket" }),
    ),
    true,
  );
  assert.equal(
    isWebSocketUpgrade(
      request({ connection: "keep-alive, upgrade", upgrade: "WebSocket" }),
    ),
    true,
  );
  assert.equal(isWebSocketUpgrade(request({ upgrade: "websocket" })), false);
  assert.equal(isWebSocketUpgrade(request({ connection: "upgrade" })), false);
  assert.equal(
    isWebSocketUpgrade(request({ connection: "upgrade", upgrade: "h2c" })),
    false,
  );
});

Deno.test("subprotocols() lists the client's protocols in order, trimmed", () => {
  const request = (value?: string) =>
    new Request("http://localhost/", {
      headers: value === undefined ? {} : { "sec-websocket-protocol": value },
    });
  assert.deepEqual(subprotocols(request(" b ,a,  c")), ["b", "a", "c"]);
  assert.deepEqual(subprotocols(request("")), []);
  assert.deepEqual(subprotocols(request()), []);
});

// --- serve() ---------------------------------------------------------------

/** Serves `handler` on a free loopback port for the duration of `body`. */
async function withServer(
  handler: Parameters<typeof serve>[1],
  body: (port: number) => Promise<void>,
): Promise<void> {
  const server = serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    handler,
  );
  try {
    await body(server.addr.port);
  } finally {
    await server.shutdown({ closeWebSockets: true, timeout: 1000 });
  }
}

Deno.test("upgrade() takes over a serve() connection and reads the pipelined frame first", async () => {
  const received = Promise.withResolvers<string>();
  await withServer(async (request) => {
    const conn = await new Upgrader().upgrade(request);
    const message = await conn.readMessage();
    received.resolve(decoder.decode(message.data));
    conn.close();
  }, async (port) => {
    const client = await Deno.connect({ hostname: "127.0.0.1", port });
    await client.write(
      concat(requestBytes(), clientFrame(0x1, encoder.encode("pipelined"))),
    );
    const response = await readHead(client, { maxHeadBytes: 16384 });
    assert.ok(response !== null);
    const head = parseResponseHead(response.head);
    assert.equal(head.status, 101);
    assert.equal(head.headers.get("sec-websocket-accept"), ACCEPT);
    assert.equal(await received.promise, "pipelined");
    await readAll(client);
    client.close();
  });
});

Deno.test("upgrade() answers a refused serve() request and closes its connection", async () => {
  const rejected = Promise.withResolvers<unknown>();
  await withServer(async (request) => {
    try {
      await new Upgrader().upgrade(request);
    } catch (error) {
      rejected.resolve(error);
    }
  }, async (port) => {
    const response = await fetch(`http://127.0.0.1:${port}/`);
    assert.equal(response.status, 400);
    assert.equal(response.headers.get("sec-websocket-version"), "13");
    assert.equal(await response.text(), "Bad Request\n");
    const error = await rejected.promise;
    assert.ok(error instanceof HandshakeError);
    assert.equal(error.status, 400);
  });
});

Deno.test("serve() shutdown with closeWebSockets closes an upgraded connection with 1001", async () => {
  const server = serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    async (request) => {
      const conn = await new Upgrader().upgrade(request);
      // Keep reading so the close handshake is answered.
      await conn.readMessage().catch(() => {});
    },
  );
  const ws = new WebSocket(`ws://127.0.0.1:${server.addr.port}/`);
  await new Promise((resolve) => ws.onopen = resolve);
  const closed = new Promise<CloseEvent>((resolve) => ws.onclose = resolve);
  await server.shutdown({ closeWebSockets: true, timeout: 2000 });
  const event = await closed;
  assert.equal(event.code, 1001);
  assert.equal(event.wasClean, true);
});

// --- node:http ---------------------------------------------------------------

/** Runs a node:http server whose 'upgrade' event calls `onUpgrade`. */
async function withNodeServer(
  onUpgrade: (request: IncomingMessage, socket: Duplex, head: Buffer) => void,
  body: (port: number) => Promise<void>,
): Promise<void> {
  const server = createServer((_request, response) => response.end("plain"));
  server.on("upgrade", onUpgrade);
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  try {
    await body((server.address() as AddressInfo).port);
  } finally {
    await new Promise((resolve) => server.close(resolve));
  }
}

Deno.test("upgradeNode() echoes text and binary messages with Deno's WebSocket client", async () => {
  const upgrader = new Upgrader({ subprotocols: ["echo"] });
  const done = Promise.withResolvers<void>();
  await withNodeServer(async (request, socket, head) => {
    const conn = await upgrader.upgradeNode(request, socket, { head });
    assert.equal(conn.subprotocol, "echo");
    for (;;) {
      let message;
      try {
        message = await conn.readMessage();
      } catch {
        break;
      }
      await conn.writeMessage(message.type, message.data);
    }
    conn.close();
    done.resolve();
  }, async (port) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/`, ["echo"]);
    ws.binaryType = "arraybuffer";
    await new Promise((resolve) => ws.onopen = resolve);
    assert.equal(ws.protocol, "echo");
    const replies: unknown[] = [];
    const twoReplies = new Promise<void>((resolve) => {
      ws.onmessage = (event) => {
        replies.push(event.data);
        if (replies.length === 2) resolve();
      };
    });
    ws.send("hello");
    ws.send(new Uint8Array(100_000).fill(7));
    await twoReplies;
    assert.equal(replies[0], "hello");
    assert.deepEqual(
      new Uint8Array(replies[1] as ArrayBuffer),
      new Uint8Array(100_000).fill(7),
    );
    const closed = new Promise<CloseEvent>((resolve) => ws.onclose = resolve);
    ws.close(1000, "done");
    await closed;
    await done.promise;
  });
});

Deno.test("upgradeNode() reads a frame pipelined in the 'upgrade' event's head first", async () => {
  const received = Promise.withResolvers<string>();
  await withNodeServer(async (request, socket, head) => {
    const conn = await new Upgrader().upgradeNode(request, socket, { head });
    const message = await conn.readMessage();
    received.resolve(decoder.decode(message.data));
    conn.close();
  }, async (port) => {
    const client = await Deno.connect({ hostname: "127.0.0.1", port });
    await client.write(
      concat(requestBytes(), clientFrame(0x1, encoder.encode("in head"))),
    );
    const response = await readHead(client, { maxHeadBytes: 16384 });
    assert.ok(response !== null);
    assert.equal(parseResponseHead(response.head).status, 101);
    assert.equal(await received.promise, "in head");
    await readAll(client);
    client.close();
  });
});

Deno.test("upgradeNode() answers a refused handshake with its status and closes the socket", async () => {
  const rejected = Promise.withResolvers<unknown>();
  await withNodeServer((request, socket, head) => {
    new Upgrader().upgradeNode(request, socket, { head }).then(
      () => rejected.reject(new Error("upgraded")),
      rejected.resolve,
    );
  }, async (port) => {
    const client = await Deno.connect({ hostname: "127.0.0.1", port });
    await client.write(requestBytes({ "Sec-WebSocket-Version": "8" }));
    const bytes = await readAll(client);
    client.close();
    const text = decoder.decode(bytes);
    assert.match(text, /^HTTP\/1\.1 400 Bad Request\r\n/);
    assert.match(text, /\r\nsec-websocket-version: 13\r\n/);
    assert.ok(text.endsWith("\r\n\r\nBad Request\n"));
    const error = await rejected.promise;
    assert.ok(error instanceof HandshakeError);
    assert.equal(error.status, 400);
  });
});

Deno.test("upgradeNode() refuses a TRACE upgrade, which a web Request cannot carry, with 405", async () => {
  const rejected = Promise.withResolvers<unknown>();
  await withNodeServer((request, socket, head) => {
    new Upgrader().upgradeNode(request, socket, { head }).then(
      () => rejected.reject(new Error("upgraded")),
      rejected.resolve,
    );
  }, async (port) => {
    const client = await Deno.connect({ hostname: "127.0.0.1", port });
    await client.write(requestBytes({}, "TRACE"));
    const text = decoder.decode(await readAll(client));
    client.close();
    assert.match(text, /^HTTP\/1\.1 405 Method Not Allowed\r\n/);
    assert.match(text, /\r\nallow: GET\r\n/);
    const error = await rejected.promise;
    assert.ok(error instanceof HandshakeError);
    assert.equal(error.status, 405);
    assert.match(error.message, /TRACE request cannot be represented/);
  });
});

// --- NodeTransport -----------------------------------------------------------

/** A node Duplex whose writes succeed at once and whose reads are pushed by hand. */
function fakeSocket(): Duplex {
  return new NodeDuplex({
    read() {},
    write(_chunk, _encoding, callback) {
      callback();
    },
  });
}

Deno.test("NodeTransport reads the head first, then socket data, then null at EOF", async () => {
  const socket = fakeSocket();
  const transport = new NodeTransport(socket, encoder.encode("head|"));
  socket.push(encoder.encode("data"));
  socket.push(null);
  assert.equal(decoder.decode(await readAll(transport)), "head|data");
  assert.equal(await transport.read(new Uint8Array(1)), null);
  transport.close();
});

Deno.test("NodeTransport splits a chunk over reads smaller than it", async () => {
  const socket = fakeSocket();
  const transport = new NodeTransport(socket, new Uint8Array(0));
  socket.push(encoder.encode("abcdef"));
  const buffer = new Uint8Array(4);
  assert.equal(await transport.read(buffer), 4);
  assert.equal(decoder.decode(buffer), "abcd");
  assert.equal(await transport.read(buffer), 2);
  assert.equal(decoder.decode(buffer.subarray(0, 2)), "ef");
  transport.close();
});

Deno.test("NodeTransport rejects a pending read with the socket's error when it is reset", async () => {
  const socket = fakeSocket();
  const transport = new NodeTransport(socket, new Uint8Array(0));
  const reading = transport.read(new Uint8Array(16));
  const reset = Object.assign(new Error("read ECONNRESET"), {
    code: "ECONNRESET",
  });
  socket.destroy(reset);
  await assert.rejects(reading, (error) => error === reset);
  await assert.rejects(transport.write(new Uint8Array(1)), (e) => e === reset);
  transport.close();
});

Deno.test("NodeTransport rejects pending and later reads and writes once closed, as a Deno.Conn does", async () => {
  const socket = fakeSocket();
  const transport = new NodeTransport(socket, new Uint8Array(0));
  const reading = transport.read(new Uint8Array(16));
  transport.close();
  await assert.rejects(reading, Deno.errors.BadResource);
  await assert.rejects(
    transport.read(new Uint8Array(16)),
    Deno.errors.BadResource,
  );
  assert.equal(socket.destroyed, true);
  await assert.rejects(
    transport.write(new Uint8Array(1)),
    Deno.errors.BadResource,
  );
  transport.close(); // a second close is harmless
});

Deno.test("NodeTransport reports EOF to reads and rejects writes once the peer has closed", async () => {
  const socket = fakeSocket();
  const transport = new NodeTransport(socket, new Uint8Array(0));
  socket.push(null);
  socket.end();
  await new Promise((resolve) => socket.once("close", resolve));
  assert.equal(await transport.read(new Uint8Array(4)), null);
  await assert.rejects(
    transport.write(new Uint8Array(1)),
    Deno.errors.BrokenPipe,
  );
  transport.close();
});

Deno.test("NodeTransport refuses a second concurrent read", async () => {
  const socket = fakeSocket();
  const transport = new NodeTransport(socket, new Uint8Array(0));
  const first = transport.read(new Uint8Array(4));
  await assert.rejects(transport.read(new Uint8Array(4)), TypeError);
  transport.close();
  await assert.rejects(first, Deno.errors.BadResource);
});

Deno.test("NodeTransport resolves a write once node has flushed it and rejects one the socket never flushes", async () => {
  let flush: (() => void) | undefined;
  const socket = new NodeDuplex({
    read() {},
    write(_chunk, _encoding, callback) {
      flush = callback;
    },
  });
  const transport = new NodeTransport(socket, new Uint8Array(0));
  let written: number | undefined;
  const writing = transport.write(new Uint8Array(3)).then((n) => written = n);
  await new Promise((resolve) => setTimeout(resolve, 10));
  assert.equal(written, undefined);
  flush!();
  await writing;
  assert.equal(written, 3);
  const stuck = transport.write(new Uint8Array(1));
  transport.close();
  await assert.rejects(stuck, Deno.errors.BadResource);
});

Deno.test("NodeTransport pauses a fast sender above 64 KiB of unread data and resumes once drained", async () => {
  const socket = fakeSocket();
  const transport = new NodeTransport(socket, new Uint8Array(0));
  for (let i = 0; i < 32; i++) socket.push(new Uint8Array(4096).fill(i));
  // node delivers pushed chunks as 'data' events on a later tick.
  await new Promise((resolve) => setTimeout(resolve, 0));
  assert.equal(socket.isPaused(), true);
  const received = new Uint8Array(32 * 4096);
  let total = 0;
  while (total < received.length) {
    const n = await transport.read(received.subarray(total, total + 50_000));
    assert.ok(n !== null);
    total += n;
  }
  assert.equal(socket.isPaused(), false);
  for (let i = 0; i < 32; i++) {
    assert.ok(
      received.subarray(i * 4096, (i + 1) * 4096).every((b) => b === i),
    );
  }
  transport.close();
});

// --- serve() shutdown bookkeeping -----------------------------------------------

Deno.test("upgrade() registers a 1001 closer with serve() and unregisters it when the Conn closes", async () => {
  const request = toRequest(requestBytes());
  const { client, closers, state } = await registeredConnection(request);
  const conn = await new Upgrader().upgrade(request);
  await assert.rejects(
    new Upgrader().upgrade(request),
    /already taken over/,
  );
  assert.equal(closers.length, 1);
  const response = await readHead(client, { maxHeadBytes: 16384 });
  assert.ok(response !== null);
  // The closer sends close 1001 and, with no answer, gives up at its timeout.
  await closers[0].closeWith(1001, 50);
  assert.equal(conn.closed, true);
  assert.ok(state.unregistered >= 1);
  const frame = await readAll(client);
  assert.deepEqual([...frame], [0x88, 2, 0x03, 0xe9]);
  client.close();
});

Deno.test("upgradeConnection() sends the default response when the error option returns no Response", async () => {
  const upgrader = new Upgrader({
    error: () => "nope" as unknown as Response,
  });
  const { error, status, body } = await refused(
    requestBytes({ Connection: null }),
    upgrader,
  );
  assert.ok(error instanceof TypeError);
  assert.ok(error.cause instanceof HandshakeError);
  assert.equal(status, 400);
  assert.equal(body, "Bad Request\n");
});

Deno.test("upgradeConnection() bounds writing an error response by handshakeTimeout too", async () => {
  let closed = false;
  const stuck: Transport = {
    read: () => Promise.resolve(null),
    write: () => new Promise(() => {}),
    close: () => {
      closed = true;
    },
  };
  const upgrader = new Upgrader({ handshakeTimeout: 30 });
  await assert.rejects(
    upgrader.upgradeConnection(
      stuck,
      toRequest(requestBytes({ Upgrade: null })),
    ),
    (error: Error) => error instanceof HandshakeError && error.status === 426,
  );
  assert.equal(closed, true);
});

/**
 * A loopback connection whose server side is registered as if serve() had
 * received `request` on it, with a spy for the shutdown closers.
 */
async function registeredConnection(request: Request) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const client = await Deno.connect({
    hostname: "127.0.0.1",
    port: listener.addr.port,
  });
  const tcp = await listener.accept();
  listener.close();
  const closers: Closer[] = [];
  const state = { unregistered: 0 };
  registerConnection(request, () => ({
    conn: tcp,
    head: new Uint8Array(0),
    track(closer) {
      closers.push(closer);
    },
    untrack() {
      state.unregistered++;
    },
  }));
  return { client, closers, state };
}

Deno.test("upgrade() lets serve()'s shutdown close a connection still in its handshake", async () => {
  const origin = Promise.withResolvers<boolean>();
  const upgrader = new Upgrader({ checkOrigin: () => origin.promise });
  const request = toRequest(requestBytes());
  const { client, closers, state } = await registeredConnection(request);
  const upgrading = upgrader.upgrade(request);
  await new Promise((resolve) => setTimeout(resolve, 0));
  assert.equal(closers.length, 1);
  await closers[0].closeWith(1001, 1000);
  assert.equal(state.unregistered, 1);
  origin.resolve(true);
  await assert.rejects(upgrading, Deno.errors.BadResource);
  // The client never saw a 101: just the end of the connection.
  assert.equal((await readAll(client)).length, 0);
  client.close();
});

Deno.test("upgrade() unregisters its shutdown closer when the handshake is refused", async () => {
  const request = toRequest(requestBytes({ Upgrade: null }));
  const { client, closers, state } = await registeredConnection(request);
  const upgrading = new Upgrader().upgrade(request);
  const response = decoder.decode(await readAll(client));
  client.close();
  await assert.rejects(upgrading, HandshakeError);
  assert.match(response, /^HTTP\/1\.1 426 Upgrade Required\r\n/);
  assert.equal(closers.length, 1);
  assert.ok(state.unregistered >= 1);
});

Deno.test("upgradeNode() reports a client that vanishes mid-frame as an abnormal closure", async () => {
  const ended = Promise.withResolvers<unknown>();
  await withNodeServer(async (request, socket, head) => {
    const conn = await new Upgrader().upgradeNode(request, socket, { head });
    await conn.readMessage().then(
      () => ended.reject(new Error("read a message")),
      ended.resolve,
    );
    conn.close();
  }, async (port) => {
    const client = await Deno.connect({ hostname: "127.0.0.1", port });
    const frame = clientFrame(0x2, new Uint8Array(100));
    await client.write(concat(requestBytes(), frame.subarray(0, 50)));
    const response = await readHead(client, { maxHeadBytes: 16384 });
    assert.ok(response !== null);
    client.close();
    const error = await ended.promise;
    assert.ok(error instanceof CloseError);
    assert.equal(error.code, 1006);
  });
});
