// A real Redis for the tests: Debian's redis-server on a free loopback port,
// without persistence, stopped (by its PID) when the test is done.
import assert from "node:assert/strict";

/** A running redis-server; `stop()` ends it, `start()` brings it back. */
export interface RedisServer {
  readonly port: number;
  readonly url: string;
  stop(): Promise<void>;
  start(): Promise<void>;
}

/** Starts redis-server on a free port and waits until it accepts clients. */
export async function startRedis(): Promise<RedisServer> {
  const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = probe.addr.port;
  probe.close();
  let child: Deno.ChildProcess | undefined;
  const server: RedisServer = {
    port,
    url: `redis://127.0.0.1:${port}`,
    async start() {
      assert.equal(child, undefined, "redis-server is already running");
      try {
        child = new Deno.Command("redis-server", {
          args: [
            "--port",
            String(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
          ],
          stdout: "null",
          stderr: "piped",
        }).spawn();
      } catch (error) {
        throw new Error(
          "Cannot start redis-server: install it (apt-get install redis-server)",
          { cause: error },
        );
      }
      await untilAccepting(port, child);
    },
    async stop() {
      if (child === undefined) return;
      child.kill("SIGKILL");
      await child.status;
      await child.stderr.cancel();
      child = undefined;
    },
  };
  await server.start();
  return server;
}

async function untilAccepting(port: number, child: Deno.ChildProcess) {
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      await conn.write(new TextEncoder().encode("PING\r\n"));
      const reply = new Uint8Array(16);
      const n = await conn.read(reply);
      conn.close();
      if (
        n !== null &&
        new TextDecoder().decode(reply.subarray(0, n)) === "+PONG\r\n"
      ) return;
    } catch {
      // Not listening yet.
    }
    if (Date.now() > deadline) {
      child.kill("SIGKILL");
      const { stderr } = await child.output();
      assert.fail(
        `redis-server did not start: ${new TextDecoder().decode(stderr)}`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/**
 * Waits until `count` clients subscribe to `channel` (asked of the server
 * with redis-cli, which comes with redis-server): subscribing is
 * asynchronous, and a test must not publish before it is done.
 */
export async function untilSubscribed(
  redis: RedisServer,
  channel: string,
  count: number,
): Promise<void> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const { stdout } = await new Deno.Command("redis-cli", {
      args: ["-p", String(redis.port), "PUBSUB", "NUMSUB", channel],
      stdout: "piped",
      stderr: "null",
    }).output();
    const [, subscribers] = new TextDecoder().decode(stdout).trim().split("\n");
    if (Number(subscribers) >= count) return;
    assert.ok(
      Date.now() < deadline,
      `${channel} never had ${count} subscribers`,
    );
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}
