// Topics across processes through a real Redis (Debian's redis-server on a
// free port): a publish reaches the subscribers of another Topics and of
// another process, each once; Redis killed mid-run and restarted: local
// delivery goes on, failures are reported, and delivery through Redis
// resumes with the subscriptions restored.
import assert from "node:assert/strict";
import { Conn, Topics } from "../mod.ts";
import { connectRedisBroker } from "../examples/chat/redis.ts";
import { RedisBroker } from "../redis/mod.ts";
import { createPipe } from "../_pipe.ts";
import { startRedis, untilSubscribed } from "./_redis.ts";

const decoder = new TextDecoder();

function pair() {
  const [a, b] = createPipe();
  return {
    server: new Conn(a, { role: "server" }),
    client: new Conn(b, { role: "client" }),
  };
}

async function text(conn: Conn): Promise<string> {
  return decoder.decode((await conn.readMessage()).data);
}

/** Resolves once `conn` receives `expected`, publishing it until then. */
async function untilDelivered(
  conn: Conn,
  publish: () => void,
  expected: string,
): Promise<void> {
  const deadline = Date.now() + 15_000;
  const reading = text(conn);
  let received: string | undefined;
  reading.then((value) => received = value);
  while (received === undefined) {
    assert.ok(Date.now() < deadline, "delivery never resumed");
    publish();
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  assert.equal(received, expected);
}

Deno.test("two Topics on one Redis share their topics, each message delivered once", async () => {
  const redis = await startRedis();
  const brokers = await Promise.all([
    connectRedisBroker(redis.url),
    connectRedisBroker(redis.url),
  ]);
  try {
    const [here, there] = brokers.map((broker) => new Topics({ broker }));
    const [a, b] = [pair(), pair()];
    here.subscribe(a.server, "room");
    there.subscribe(b.server, "room");
    await untilSubscribed(redis, "ws:room", 2);
    here.publish("room", "hello");
    there.publish("room", new Uint8Array([7, 8, 9]));
    // Each side gets both once: its own at once, the other's through Redis
    // (its own echo from Redis is recognised and skipped).
    for (const side of [a, b]) {
      const got = [];
      for (let i = 0; i < 2; i++) {
        const { type, data } = await side.client.readMessage();
        got.push(type === 1 ? decoder.decode(data) : [...data].join());
      }
      assert.deepEqual(got.sort(), ["7,8,9", "hello"]);
    }
    // Nothing else was queued: the next message is the next publish.
    here.publish("room", "last");
    for (const side of [a, b]) assert.equal(await text(side.client), "last");
    for (const { server, client } of [a, b]) {
      server.close();
      client.close();
    }
  } finally {
    await Promise.all(brokers.map((broker) => broker.close()));
    await redis.stop();
  }
});

Deno.test("Redis killed and restarted: local delivery goes on, errors are reported, delivery resumes", async () => {
  const redis = await startRedis();
  const errors: unknown[] = [];
  const onError = (error: unknown) => errors.push(error);
  const brokers = await Promise.all([
    connectRedisBroker(redis.url, { onError }),
    connectRedisBroker(redis.url, { onError }),
  ]);
  try {
    const brokerErrors: unknown[] = [];
    const [here, there] = brokers.map((broker) =>
      new Topics({ broker, onBrokerError: (e) => brokerErrors.push(e) })
    );
    const [local, remote] = [pair(), pair()];
    here.subscribe(local.server, "room");
    there.subscribe(remote.server, "room");
    await untilDelivered(remote.client, () => here.publish("room", "1"), "1");

    await redis.stop();
    // Publishing without Redis: the local subscriber still gets it, the
    // failure goes to onBrokerError, and nothing rejects unobserved.
    let sawLocal = false;
    for (let i = 0; i < 50 && brokerErrors.length === 0; i++) {
      here.publish("room", "offline");
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    for (;;) {
      const line = await text(local.client);
      if (line === "offline") {
        sawLocal = true;
        break;
      }
    }
    assert.ok(sawLocal);
    assert.ok(brokerErrors.length > 0, "the failed publishes were reported");
    assert.ok(errors.length > 0, "the lost connection was reported");

    await redis.start();
    // The subscriber side restores its subscription by itself.
    const resumed = "after the restart";
    const reading = (async () => {
      for (;;) if (await text(remote.client) === resumed) return;
    })();
    let done = false;
    reading.then(() => done = true);
    const deadline = Date.now() + 15_000;
    while (!done) {
      assert.ok(Date.now() < deadline, "delivery never resumed");
      here.publish("room", resumed);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    for (const { server, client } of [local, remote]) {
      server.close();
      client.close();
    }
  } finally {
    await Promise.all(brokers.map((broker) => broker.close()));
    await redis.stop();
  }
});

Deno.test("a topic subscribed while Redis is down is subscribed once Redis is back", async () => {
  const redis = await startRedis();
  const brokers = await Promise.all([
    connectRedisBroker(redis.url, { onError() {} }),
    connectRedisBroker(redis.url, { onError() {} }),
  ]);
  try {
    const failures: unknown[] = [];
    const [here, there] = brokers.map((broker) =>
      new Topics({ broker, onBrokerError: (e) => failures.push(e) })
    );
    await redis.stop();
    const late = pair();
    there.subscribe(late.server, "late");
    while (failures.length === 0) {
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    await redis.start();
    await untilSubscribed(redis, "ws:late", 1);
    here.publish("late", "made it");
    assert.equal(await text(late.client), "made it");
    late.server.close();
    late.client.close();
  } finally {
    await Promise.all(brokers.map((broker) => broker.close()));
    await redis.stop();
  }
});

Deno.test("connectRedisBroker() names the address it cannot reach", async () => {
  const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const url = `redis://127.0.0.1:${probe.addr.port}`;
  probe.close();
  await assert.rejects(
    connectRedisBroker(url, { onError() {} }),
    { message: `Cannot connect to Redis at ${url}` },
  );
});

/** The chat task's command line, as `deno task chat` runs it. */
const CHAT = JSON.parse(
  await Deno.readTextFile(new URL("../deno.json", import.meta.url)),
).tasks.chat.split(" ").slice(1) as string[];

/** Starts a chat server process; resolves its port once it listens. */
async function startChat(args: string[]) {
  const child = new Deno.Command(Deno.execPath(), {
    args: [...CHAT, ...args],
    cwd: new URL("..", import.meta.url),
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const stdout = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let printed = "";
  let port: number | undefined;
  while (port === undefined) {
    const { value, done } = await stdout.read();
    if (done) assert.fail(`the chat server exited: ${await stderr}`);
    printed += value;
    const match = /Chat on http:\/\/127\.0\.0\.1:(\d+)\//.exec(printed);
    if (match !== null) port = Number(match[1]);
  }
  return {
    port,
    async stop(): Promise<string> {
      child.kill("SIGTERM");
      await stdout.cancel();
      await child.status;
      return await stderr;
    },
  };
}

/** A browser-style chat client; `next()` resolves the next line. */
async function chatClient(port: number) {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`);
  const lines: string[] = [];
  const waiters: (() => void)[] = [];
  ws.onmessage = (event) => {
    lines.push(event.data);
    waiters.shift()?.();
  };
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = reject;
  });
  return {
    ws,
    /** Lines received and not read yet. */
    get pending(): number {
      return lines.length;
    },
    async next(): Promise<string> {
      while (lines.length === 0) {
        await new Promise<void>((resolve) => waiters.push(resolve));
      }
      return lines.shift()!;
    },
    async close() {
      const closed = new Promise((resolve) => ws.onclose = resolve);
      ws.close();
      await closed;
    },
  };
}

Deno.test("chat servers in two processes share the room through Redis", async () => {
  const redis = await startRedis();
  const servers = await Promise.all([
    startChat(["--port", "0", "--redis", redis.url]),
    startChat(["--port", "0", "--redis", redis.url]),
  ]);
  try {
    const [alice, bob] = await Promise.all(
      servers.map((server) => chatClient(server.port)),
    );
    await untilSubscribed(redis, "ws:chat", 2);
    alice.ws.send("hi from the first process");
    assert.equal(await bob.next(), "hi from the first process");
    assert.equal(await alice.next(), "hi from the first process");
    bob.ws.send("and back");
    assert.equal(await alice.next(), "and back");
    assert.equal(await bob.next(), "and back");
    await Promise.all([alice.close(), bob.close()]);
  } finally {
    const stderr = await Promise.all(servers.map((server) => server.stop()));
    await redis.stop();
    assert.deepEqual(stderr, ["", ""]);
  }
});

Deno.test("chat processes share one port with --reuse-port, and one room through Redis", async () => {
  const redis = await startRedis();
  const first = await startChat([
    "--port",
    "0",
    "--reuse-port",
    "--redis",
    redis.url,
  ]);
  const second = await startChat([
    "--port",
    String(first.port),
    "--reuse-port",
    "--redis",
    redis.url,
  ]);
  try {
    assert.equal(second.port, first.port);
    // Wherever the kernel puts each client, every client hears every line.
    const clients = await Promise.all(
      Array.from({ length: 6 }, () => chatClient(first.port)),
    );
    // A process subscribes to the room in Redis when its first client
    // joins, and lines published before that do not reach it: repeat one
    // until every client has heard it, then read up to a last marker.
    const deadline = Date.now() + 10_000;
    while (clients.some((client) => client.pending === 0)) {
      assert.ok(Date.now() < deadline, "some client never heard the room");
      clients[0].ws.send("sync");
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    clients[0].ws.send("mark");
    for (const client of clients) while (await client.next() !== "mark");
    for (const [i, sender] of clients.entries()) {
      sender.ws.send(`line ${i}`);
      for (const client of clients) {
        assert.equal(await client.next(), `line ${i}`);
      }
    }
    await Promise.all(clients.map((client) => client.close()));
  } finally {
    const stderr = await Promise.all([first.stop(), second.stop()]);
    await redis.stop();
    assert.deepEqual(stderr, ["", ""]);
  }
});

Deno.test("deno task chat:cluster runs Redis and two chat processes on one port, and stops them all", async () => {
  const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = probe.addr.port;
  probe.close();
  const child = new Deno.Command(Deno.execPath(), {
    args: ["task", "--quiet", "chat:cluster", "--port", String(port)],
    cwd: new URL("..", import.meta.url),
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const stdout = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let printed = "";
  let redisPort: number | undefined;
  while (redisPort === undefined) {
    const { value, done } = await stdout.read();
    if (done) assert.fail(`the cluster exited: ${await stderr}`);
    printed += value;
    const match = /Redis at redis:\/\/127\.0\.0\.1:(\d+)/.exec(printed);
    if (match !== null) redisPort = Number(match[1]);
  }
  assert.match(
    printed,
    new RegExp(`2 processes on http://127\\.0\\.0\\.1:${port}/`),
  );
  // Both processes come up on the port in their own time: retry the first.
  let alice;
  for (let tries = 0; alice === undefined; tries++) {
    try {
      alice = await chatClient(port);
    } catch (error) {
      if (tries === 100) throw error;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
  const bob = await chatClient(port);
  const deadline = Date.now() + 10_000;
  while (bob.pending === 0 || alice.pending === 0) {
    assert.ok(Date.now() < deadline, "the room never formed");
    alice.ws.send("anyone?");
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  await Promise.all([alice.close(), bob.close()]);
  child.kill("SIGTERM");
  await stdout.cancel();
  assert.equal((await child.status).code, 0, "a graceful stop");
  assert.equal(await stderr, "");
  // Nothing is left listening: the chat port and Redis are closed.
  for (const closed of [port, redisPort]) {
    await assert.rejects(Deno.connect({ hostname: "127.0.0.1", port: closed }));
  }
});

Deno.test("RedisBroker refuses one client as both publisher and subscriber", () => {
  const client = {
    publish: () => Promise.resolve(),
    subscribe: () => Promise.resolve(),
    unsubscribe: () => Promise.resolve(),
    quit: () => Promise.resolve(),
  };
  assert.throws(
    () => new RedisBroker({ publisher: client, subscriber: client }),
    TypeError,
  );
});
