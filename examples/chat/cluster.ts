/**
 * A chat cluster on one machine, for a demo: a local Redis (Debian's
 * `redis-server`, on a free port) and several chat server processes sharing
 * one port (`--reuse-port`) and one room (`--redis`). Ctrl-C stops them all.
 *
 * ```sh
 * deno task chat:cluster                 # two processes on http://127.0.0.1:8080/
 * deno task chat:cluster --processes 4   # one per core on a 4-core machine
 * ```
 *
 * @module
 */
import { exitWithUsage, parseServerArgs } from "../_cli.ts";

const USAGE =
  "Usage: cluster.ts [--port N] [--hostname H] [--processes N] (needs redis-server)";

const args = parseServerArgs(Deno.args, USAGE, {
  processes: { type: "string", default: "2" },
});
const count = Number(args.flags.processes);
if (!Number.isInteger(count) || count < 1 || count > 64) {
  exitWithUsage(
    `Cannot start: --processes must be from 1 to 64, got "${args.flags.processes}"`,
    USAGE,
  );
}

const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
const redisPort = probe.addr.port;
probe.close();
let redis: Deno.ChildProcess;
try {
  redis = new Deno.Command("redis-server", {
    args: ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", ""],
    stdout: "null",
  }).spawn();
} catch (error) {
  exitWithUsage(
    `Cannot start redis-server (apt-get install redis-server): ${
      (error as Error).message
    }`,
    USAGE,
  );
}
const redisUrl = `redis://127.0.0.1:${redisPort}`;
// Each chat server connects to Redis as it starts: wait until it listens.
for (let tries = 0;; tries++) {
  try {
    (await Deno.connect({ hostname: "127.0.0.1", port: redisPort })).close();
    break;
  } catch (error) {
    if (tries === 100) {
      redis.kill("SIGTERM");
      exitWithUsage(
        `Cannot reach redis-server: ${(error as Error).message}`,
        USAGE,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

const server = new URL("./server.ts", import.meta.url).pathname;
const chats = Array.from(
  { length: count },
  () =>
    new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--unstable-net",
        "--allow-net",
        "--allow-read",
        "--allow-env",
        server,
        "--port",
        String(args.port),
        "--hostname",
        args.hostname,
        "--reuse-port",
        "--redis",
        redisUrl,
      ],
      stdout: "null",
    }).spawn(),
);
console.log(
  `Chat cluster: ${count} processes on http://${args.hostname}:${args.port}/, Redis at ${redisUrl} (Ctrl-C stops all)`,
);

let stopping = false;
const stop = async () => {
  if (stopping) return;
  stopping = true;
  for (const chat of chats) chat.kill("SIGTERM");
  await Promise.allSettled(chats.map((chat) => chat.status));
  redis.kill("SIGTERM");
  await redis.status;
  Deno.exit(0);
};
Deno.addSignalListener("SIGINT", stop);
Deno.addSignalListener("SIGTERM", stop);
// A chat server that dies (a taken port, say) ends the demo.
const ended = await Promise.race(chats.map((chat) => chat.status));
if (!stopping) {
  console.error(`A chat process exited (${ended.code}); stopping the cluster`);
  await stop();
}
