// The WHATWG WebSocket interface (websocket.ts): one scenario suite run
// against Deno's built-in WebSocket and Deno.upgradeWebSocket and against
// ours, in every pairing, asserting the same events, attributes and errors;
// then interop with the ws package (npm:ws) either way round.

import assert from "node:assert/strict";
import type { Buffer } from "node:buffer";
import type { AddressInfo } from "node:net";
import { FrameReader, OP, parseClose } from "./_frames.ts";
import { NodeWebSocket, WebSocketServer } from "./_ws.ts";
import { serve } from "../upgrader.ts";
import { upgradeWebSocket, WebSocket } from "../websocket.ts";

const HOST = "127.0.0.1";

/** What both implementations share, as the scenarios use it. */
type Socket = EventTarget & {
  readonly readyState: number;
  readonly bufferedAmount: number;
  readonly protocol: string;
  readonly extensions: string;
  readonly url: string;
  readonly CONNECTING: number;
  readonly OPEN: number;
  readonly CLOSING: number;
  readonly CLOSED: number;
  binaryType: BinaryType;
  onopen: ((event: Event) => unknown) | null;
  send(data: string | ArrayBufferLike | ArrayBufferView | Blob): void;
  close(code?: number, reason?: string): void;
};

type Kind = "deno" | "ours";
const KINDS: Kind[] = ["deno", "ours"];

/** A line per event; a message says what its data is. */
function describe(event: Event): string {
  if (event instanceof CloseEvent) {
    // Deno's WebSocket reports an abnormal closure as code 0 where WHATWG
    // WebSockets § The WebSocket connection is closed (RFC 6455 section
    // 7.1.5) says 1006; ours says 1006, and the two are compared as equal.
    const code = event.code === 0 ? 1006 : event.code;
    return `close ${code} ${JSON.stringify(event.reason)} ${event.wasClean}`;
  }
  if (event instanceof MessageEvent) {
    const data = event.data;
    if (typeof data === "string") return `message text ${JSON.stringify(data)}`;
    if (data instanceof Blob) return `message blob ${data.size}`;
    return `message arraybuffer ${[...new Uint8Array(data)]}`;
  }
  return event.type;
}

/** Records a socket's events; `done` resolves with them after `close`. */
function record(socket: Socket): { log: string[]; done: Promise<string[]> } {
  const log: string[] = [];
  const done = Promise.withResolvers<string[]>();
  for (const type of ["open", "message", "error", "close"]) {
    socket.addEventListener(type, (event) => {
      log.push(describe(event));
      if (type === "close") done.resolve(log);
    });
  }
  return { log, done: done.promise };
}

interface Server {
  url: string;
  /** The first server socket's events, once it closed. */
  log: Promise<string[]>;
  close(): Promise<void>;
}

/** The options both `upgradeWebSocket`s take. */
interface UpgradeOptions {
  protocol?: string;
  idleTimeout?: number;
}

/** A server of `kind` handing its (first) socket to `behave`. */
function startServer(
  kind: Kind,
  behave: (socket: Socket) => void,
  options: UpgradeOptions = {},
): Server {
  const log = Promise.withResolvers<string[]>();
  const handler = (request: Request) => {
    const { socket, response } = kind === "deno"
      ? Deno.upgradeWebSocket(request, options)
      : upgradeWebSocket(request, options);
    record(socket).done.then(log.resolve);
    behave(socket);
    return response;
  };
  const where = { hostname: HOST, port: 0, onListen() {} };
  if (kind === "deno") {
    const server = Deno.serve(where, handler);
    return {
      url: `ws://${HOST}:${server.addr.port}/path?q=1`,
      log: log.promise,
      close: () => server.shutdown(),
    };
  }
  const server = serve(where, handler);
  return {
    url: `ws://${HOST}:${server.addr.port}/path?q=1`,
    log: log.promise,
    close: () => server.shutdown(),
  };
}

function connect(
  kind: Kind,
  url: string,
  protocols?: string | string[],
): Socket {
  return kind === "deno"
    ? new globalThis.WebSocket(url, protocols)
    : new WebSocket(url, protocols);
}

/** Runs `scenario` for every client-server pair: the results must agree. */
async function everyPair<T>(
  scenario: (client: Kind, server: Kind) => Promise<T>,
): Promise<T> {
  const reference = await scenario("deno", "deno");
  for (const client of KINDS) {
    for (const server of KINDS) {
      if (client === "deno" && server === "deno") continue;
      assert.deepEqual(
        await scenario(client, server),
        reference,
        `client ${client}, server ${server}`,
      );
    }
  }
  return reference;
}

const BYTES = [1, 2, 3, 250];

Deno.test("echo: text and binary messages with each binaryType", async () => {
  const result = await everyPair(async (clientKind, serverKind) => {
    const server = startServer(serverKind, (socket) => {
      socket.binaryType = "arraybuffer";
      socket.addEventListener("message", (event) => {
        socket.send((event as MessageEvent).data);
      });
    });
    const client = connect(clientKind, server.url);
    const { log, done } = record(client);
    const states = [client.readyState];
    const blobs: Promise<number[]>[] = [];
    client.addEventListener("message", (event) => {
      const data = (event as MessageEvent).data;
      if (data instanceof Blob) {
        blobs.push(data.arrayBuffer().then((b) => [...new Uint8Array(b)]));
      }
      if (log.filter((line) => line.startsWith("message")).length === 3) {
        client.binaryType = "arraybuffer";
        client.send(new Uint16Array([0x0201, 0x0403]).subarray(1));
        client.send(new Blob([new Uint8Array(BYTES)]));
        client.send("after the blob");
      }
      if (log.length === 7) client.close(1000, "done");
    });
    client.onopen = () => {
      states.push(client.readyState);
      client.send("hello");
      client.send(new Uint8Array(BYTES));
      client.send(new Uint8Array(BYTES).buffer);
    };
    const events = await done;
    states.push(client.readyState);
    const serverLog = await server.log;
    await server.close();
    return {
      events,
      serverLog,
      states,
      blobs: await Promise.all(blobs),
      binaryType: client.binaryType,
    };
  });
  assert.deepEqual(result.events, [
    "open",
    'message text "hello"',
    "message blob 4",
    "message blob 4",
    "message arraybuffer 3,4",
    "message arraybuffer 1,2,3,250",
    'message text "after the blob"',
    'close 1000 "done" true',
  ]);
  assert.deepEqual(result.states, [0, 1, 3]);
  assert.equal(result.serverLog.at(-1), 'close 1000 "done" true');
});

Deno.test("attributes: url, protocol, constants, binaryType", async () => {
  await everyPair(async (clientKind, serverKind) => {
    const server = startServer(serverKind, (socket) => {
      socket.onopen = () => socket.close();
    }, { protocol: "chat" });
    const client = connect(clientKind, server.url, ["chat", "other"]);
    const before = {
      url: client.url.replace(new URL(server.url).port, "PORT"),
      protocol: client.protocol,
      extensions: client.extensions,
      binaryType: client.binaryType,
    };
    client.binaryType = "nonsense" as BinaryType;
    const { done } = record(client);
    let protocol = "";
    client.onopen = () => protocol = client.protocol;
    const events = await done;
    await server.log;
    await server.close();
    const Class = clientKind === "deno" ? globalThis.WebSocket : WebSocket;
    return {
      before,
      protocol,
      events,
      binaryType: client.binaryType,
      constants: [
        Class.CONNECTING,
        Class.OPEN,
        Class.CLOSING,
        Class.CLOSED,
        client.CONNECTING,
        client.OPEN,
        client.CLOSING,
        client.CLOSED,
      ],
      handlers: ["onopen", "onmessage", "onerror", "onclose"].map((name) =>
        name in client
      ),
    };
  });
});

Deno.test("close from the server, with and without code and reason", async () => {
  for (
    const args of [[], [1000], [4000, "bye"], [3000, "é".repeat(61)]] as [
      number?,
      string?,
    ][]
  ) {
    const result = await everyPair(async (clientKind, serverKind) => {
      const server = startServer(serverKind, (socket) => {
        socket.onopen = () => socket.close(...args);
      });
      const client = connect(clientKind, server.url);
      const events = await record(client).done;
      const serverLog = await server.log;
      await server.close();
      return { events, serverLog };
    });
    const code = args[0] ?? 1005;
    assert.equal(
      result.events.at(-1),
      `close ${code} ${JSON.stringify(args[1] ?? "")} true`,
    );
  }
});

Deno.test("close from the client, with and without code and reason", async () => {
  for (
    const args of [[], [1000], [4999, "bye"]] as [number?, string?][]
  ) {
    const result = await everyPair(async (clientKind, serverKind) => {
      const server = startServer(serverKind, () => {});
      const client = connect(clientKind, server.url);
      client.onopen = () => client.close(...args);
      const events = await record(client).done;
      const serverLog = await server.log;
      await server.close();
      return { events, serverLog };
    });
    assert.equal(
      result.serverLog.at(-1),
      `close ${args[0] ?? 1005} ${JSON.stringify(args[1] ?? "")} true`,
    );
  }
});

/** The name of what `action` throws, or "none". */
function thrown(action: () => void): string {
  try {
    action();
    return "none";
  } catch (error) {
    return error instanceof DOMException
      ? `DOMException ${error.name}`
      : (error as Error).name;
  }
}

Deno.test("send before open throws, close validates, send after close counts", async () => {
  const result = await everyPair(async (clientKind, serverKind) => {
    const server = startServer(serverKind, () => {});
    const client = connect(clientKind, server.url);
    const { done } = record(client);
    const errors: Record<string, string> = {
      sendConnecting: thrown(() => client.send("early")),
    };
    const opened = Promise.withResolvers<void>();
    client.onopen = () => opened.resolve();
    await opened.promise;
    for (const code of [999, 1001, 1005, 2999, 5000, 0]) {
      errors[`close ${code}`] = thrown(() => client.close(code));
    }
    errors["long reason"] = thrown(() => client.close(1000, "x".repeat(124)));
    errors["long reason, no code"] = thrown(() =>
      client.close(undefined, "é".repeat(62))
    );
    assert.equal(client.readyState, 1);
    client.close(4000);
    const closing = client.readyState;
    errors.sendClosing = thrown(() => client.send("late"));
    const events = await done;
    errors.sendClosed = thrown(() => client.send(new Uint8Array(10)));
    errors.closeAgain = thrown(() => client.close(1000));
    await server.log;
    await server.close();
    return { errors, closing, events };
  });
  assert.equal(result.errors.sendConnecting, "DOMException InvalidStateError");
  assert.equal(result.errors["close 1001"], "DOMException InvalidAccessError");
  assert.equal(result.errors["long reason"], "DOMException SyntaxError");
});

Deno.test("send after closing counts in bufferedAmount (§ send())", async () => {
  // Deno's WebSocket leaves bufferedAmount at 0 here; the standard adds the
  // discarded bytes, and so does ours.
  const server = startServer("ours", () => {});
  const client = new WebSocket(server.url);
  const { done } = record(client);
  await new Promise((resolve) => client.onopen = resolve);
  client.close();
  client.send("late");
  assert.equal(client.bufferedAmount, 4);
  await done;
  client.send(new Uint8Array(10));
  assert.equal(client.bufferedAmount, 14);
  await server.log;
  await server.close();
});

Deno.test("constructor: URL and protocol validation", () => {
  const urls = [
    "not a url",
    "ftp://127.0.0.1/",
    "ws://127.0.0.1/#fragment",
    "ws://127.0.0.1/#",
  ];
  const protocols: (string | string[])[] = [
    ["a", "a"],
    "with space",
    ["ok", ""],
    "a,b",
  ];
  for (const url of urls) {
    assert.equal(
      thrown(() => new WebSocket(url)),
      thrown(() => new globalThis.WebSocket(url)),
      url,
    );
    assert.equal(thrown(() => new WebSocket(url)), "DOMException SyntaxError");
  }
  for (const list of protocols) {
    const url = "ws://127.0.0.1:1/";
    assert.equal(
      thrown(() => new WebSocket(url, list)),
      "DOMException SyntaxError",
      String(list),
    );
    assert.equal(
      thrown(() => new globalThis.WebSocket(url, list)),
      "DOMException SyntaxError",
      String(list),
    );
  }
});

Deno.test("constructor: http and https URLs become ws and wss", async () => {
  const server = startServer("ours", (socket) => {
    socket.onopen = () => socket.close();
  });
  const url = server.url.replace("ws:", "http:");
  const ours = new WebSocket(url);
  const deno = new globalThis.WebSocket(url);
  assert.equal(ours.url, deno.url);
  assert.equal(ours.url, server.url);
  await Promise.all([record(ours).done, record(deno).done]);
  await server.close();
  assert.equal(
    new WebSocket("https://127.0.0.1:1/").url,
    "wss://127.0.0.1:1/",
  );
});

Deno.test("close while connecting fails the connection", async () => {
  const listener = Deno.listen({ hostname: HOST, port: 0 });
  const accepted = listener.accept();
  const ours = new WebSocket(`ws://${HOST}:${listener.addr.port}/`);
  const { done } = record(ours);
  ours.close();
  assert.equal(ours.readyState, 2);
  assert.deepEqual(await done, ["error", 'close 1006 "" false']);
  assert.equal(ours.readyState, 3);
  // The dial may have been abandoned before it connected: nothing to accept.
  listener.close();
  await accepted.then((conn) => conn.close(), () => {});
});

Deno.test("a server that is not there: error, then close 1006", async () => {
  const listener = Deno.listen({ hostname: HOST, port: 0 });
  const url = `ws://${HOST}:${listener.addr.port}/`;
  listener.close();
  const logs = await Promise.all(
    KINDS.map((kind) => record(connect(kind, url)).done),
  );
  assert.deepEqual(logs[1], logs[0]);
  assert.deepEqual(logs[1], ["error", 'close 1006 "" false']);
});

/** RFC 6455 section 4.2.2: the accept value for a key. */
async function accept(key: string): Promise<string> {
  const digest = await crypto.subtle.digest(
    "SHA-1",
    new TextEncoder().encode(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"),
  );
  return btoa(String.fromCharCode(...new Uint8Array(digest)));
}

Deno.test("a server that vanishes without a close frame: 1006", async () => {
  const logs = [];
  for (const kind of KINDS) {
    const listener = Deno.listen({ hostname: HOST, port: 0 });
    const client = connect(kind, `ws://${HOST}:${listener.addr.port}/`);
    const { done } = record(client);
    const conn = await listener.accept();
    const buffer = new Uint8Array(4096);
    const n = (await conn.read(buffer))!;
    const head = new TextDecoder().decode(buffer.subarray(0, n));
    const key = /sec-websocket-key: *(\S+)/i.exec(head)![1];
    await conn.write(
      new TextEncoder().encode(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n" +
          `Connection: Upgrade\r\nSec-WebSocket-Accept: ${await accept(
            key,
          )}\r\n\r\n`,
      ),
    );
    // A text frame "hi", then the socket closes with no close frame.
    await conn.write(new Uint8Array([0x81, 2, 0x68, 0x69]));
    conn.close();
    logs.push(await done);
    listener.close();
  }
  assert.deepEqual(logs[1], logs[0]);
  assert.deepEqual(logs[1], [
    "open",
    'message text "hi"',
    "error",
    'close 1006 "" false',
  ]);
});

/** A raw client that completed the opening handshake on `server`. */
async function handshake(server: Server): Promise<Deno.TcpConn> {
  const port = Number(new URL(server.url).port);
  const conn = await Deno.connect({ hostname: HOST, port });
  await conn.write(
    new TextEncoder().encode(
      "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n" +
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n" +
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    ),
  );
  const buffer = new Uint8Array(4096);
  let head = "";
  while (!head.includes("\r\n\r\n")) {
    const n = (await conn.read(buffer))!;
    head += new TextDecoder().decode(buffer.subarray(0, n));
  }
  assert.match(head, /^HTTP\/1.1 101/);
  assert.ok(head.endsWith("\r\n\r\n"), "frames came with the head");
  return conn;
}

Deno.test("idleTimeout: a peer that does not answer the ping is closed with 1001", async () => {
  const results = [];
  for (const kind of KINDS) {
    const server = startServer(kind, () => {}, { idleTimeout: 1 });
    const conn = await handshake(server);
    const started = performance.now();
    const reader = new FrameReader(conn);
    const ping = await reader.next();
    const pinged = performance.now() - started;
    const close = await reader.next();
    const closed = performance.now() - started;
    // Deno's dispatches a second close event (1005, clean) once the
    // connection is gone; the first one is the answer.
    const log = await server.log;
    conn.close();
    await server.close();
    // Half the timeout in silence, then the ping; the other half unanswered
    // (the upper bounds leave room for a loaded machine, below twice that).
    assert.ok(pinged >= 400 && pinged < 1500, `${kind}: pinged at ${pinged}`);
    assert.ok(closed >= 900 && closed < 2500, `${kind}: closed at ${closed}`);
    results.push({
      ping: ping?.opcode,
      close: close && parseClose(close.payload).code,
      log: log.slice(0, 3),
    });
  }
  assert.deepEqual(results[1], results[0]);
  assert.deepEqual(results[1], {
    ping: OP.ping,
    close: 1001,
    log: ["open", "error", 'close 1001 "No response from ping frame." false'],
  });
});

Deno.test("idleTimeout: a peer that answers pings stays open", async () => {
  // Past the 1 s in which an unanswered ping would have closed it.
  const events = await everyPair(async (clientKind, serverKind) => {
    const server = startServer(serverKind, (socket) => {
      socket.onopen = () => setTimeout(() => socket.close(1000, "done"), 1600);
    }, { idleTimeout: 1 });
    const events = await record(connect(clientKind, server.url)).done;
    await server.log;
    await server.close();
    return events;
  });
  assert.deepEqual(events, ["open", 'close 1000 "done" true']);
});

Deno.test("a client that vanishes without a close frame: 1006", async () => {
  const logs = [];
  for (const kind of KINDS) {
    const server = startServer(kind, () => {});
    const conn = await handshake(server);
    conn.close();
    logs.push(await server.log);
    await server.close();
  }
  assert.deepEqual(logs[1], logs[0]);
});

Deno.test("upgradeWebSocket: a request that is not an upgrade throws TypeError", () => {
  const plain = new Request("http://localhost/");
  assert.throws(() => upgradeWebSocket(plain), TypeError);
  assert.throws(() => Deno.upgradeWebSocket(plain), TypeError);
  const noKey = new Request("http://localhost/", {
    headers: { upgrade: "websocket", connection: "Upgrade" },
  });
  assert.throws(() => upgradeWebSocket(noKey), TypeError);
  assert.throws(() => Deno.upgradeWebSocket(noKey), TypeError);
});

Deno.test("a listener that throws does not stop the socket", async () => {
  const server = startServer("ours", (socket) => {
    socket.onopen = () => {
      socket.send("one");
      socket.send("two");
      socket.close();
    };
  });
  const reported: unknown[] = [];
  const onError = (event: ErrorEvent) => {
    event.preventDefault();
    reported.push(event.error);
  };
  globalThis.addEventListener("error", onError);
  const client = new WebSocket(server.url);
  client.onmessage = () => {
    throw new Error("listener failed");
  };
  const events = await record(client).done;
  globalThis.removeEventListener("error", onError);
  await server.log;
  await server.close();
  assert.deepEqual(events, [
    "open",
    'message text "one"',
    'message text "two"',
    'close 1005 "" true',
  ]);
  assert.equal(reported.length, 2);
});

Deno.test("bufferedAmount counts bytes not yet taken by the connection", async () => {
  const server = startServer("ours", () => {});
  const client = new WebSocket(server.url);
  const { done } = record(client);
  await new Promise((resolve) => client.onopen = resolve);
  client.send("héllo"); // 6 bytes of UTF-8
  client.send(new Blob([new Uint8Array(100)]));
  assert.equal(client.bufferedAmount, 106);
  while (client.bufferedAmount > 0) {
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  client.close();
  await done;
  await server.log;
  await server.close();
});

Deno.test("compression and extensions, our client with our server", async () => {
  const log = Promise.withResolvers<string[]>();
  const server = serve(
    { hostname: HOST, port: 0, onListen() {} },
    (request) => {
      const { socket, response } = upgradeWebSocket(request, {
        enableCompression: true,
      });
      record(socket).done.then(log.resolve);
      socket.onmessage = (event) => socket.send(event.data);
      return response;
    },
  );
  const client = new WebSocket(`ws://${HOST}:${server.addr.port}/`, [], {
    enableCompression: true,
    headers: { "x-test": "1" },
  });
  client.onopen = () => client.send("a".repeat(1000));
  client.onmessage = () => client.close();
  const events = await record(client).done;
  assert.deepEqual(events, [
    "open",
    `message text ${JSON.stringify("a".repeat(1000))}`,
    'close 1005 "" true',
  ]);
  assert.match(client.extensions, /^permessage-deflate/);
  await log.promise;
  await server.shutdown();
});

Deno.test("interop: our client with a ws server", async () => {
  const wss = new WebSocketServer({ host: HOST, port: 0 });
  await new Promise((resolve) => wss.once("listening", resolve));
  wss.on("connection", (peer: InstanceType<typeof NodeWebSocket>) => {
    peer.on("message", (data: Buffer, isBinary: boolean) => {
      if (isBinary) peer.close(4001, "binary");
      else peer.send(data, { binary: false });
    });
  });
  const { port } = wss.address() as AddressInfo;
  const client = new WebSocket(`ws://${HOST}:${port}/`);
  client.onopen = () => client.send("ping");
  client.onmessage = () => client.send(new Uint8Array([1]));
  const events = await record(client).done;
  assert.deepEqual(events, [
    "open",
    'message text "ping"',
    'close 4001 "binary" true',
  ]);
  await new Promise((resolve) => wss.close(resolve));
});

Deno.test("interop: a ws client with our server", async () => {
  let url = "";
  const server = startServer("ours", (socket) => {
    url = socket.url;
    socket.binaryType = "arraybuffer";
    socket.addEventListener("message", (event) => {
      const data = (event as MessageEvent).data;
      if (typeof data === "string") socket.send(data.toUpperCase());
      else socket.close(4002, "done");
    });
  });
  const peer = new NodeWebSocket(server.url);
  const received: string[] = [];
  const closed = new Promise<[number, string]>((resolve) =>
    peer.on(
      "close",
      (code: number, reason: Buffer) => resolve([code, reason.toString()]),
    )
  );
  peer.on("open", () => peer.send("hello"));
  peer.on("message", (data: Buffer) => {
    received.push(data.toString());
    peer.send(new Uint8Array([1, 2]));
  });
  assert.deepEqual(await closed, [4002, "done"]);
  assert.deepEqual(received, ["HELLO"]);
  assert.equal(url, server.url);
  assert.deepEqual(await server.log, [
    "open",
    'message text "hello"',
    "message arraybuffer 1,2",
    'close 4002 "done" true',
  ]);
  await server.close();
});
