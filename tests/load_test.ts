// Many connections: 10,000 concurrent WebSocket connections to one
// serve() + Upgrader echo server connect, echo and close. Server and clients
// run as child processes with a raised open file limit (each side holds one
// socket per connection); the server's memory per idle connection, measured
// after forcing GC, is printed.

import assert from "node:assert/strict";
import {
  fileLimitCommand,
  readLines,
  ServerProcess,
  type ServerStats,
} from "./_reliability/helpers.ts";
import { mib } from "./_helpers.ts";

const COUNT = Number(Deno.env.get("LOAD_CONNECTIONS") ?? 10_000);
/** Sockets per process: the connections plus room for the runtime. */
const FILE_LIMIT = COUNT + 1024;

Deno.test(`${COUNT} concurrent connections connect, echo and close; memory per idle connection is reported`, async () => {
  await using server = await ServerProcess.start({ fileLimit: FILE_LIMIT });
  const before = await server.stats();

  const script = new URL("./_reliability/load_clients.ts", import.meta.url)
    .pathname;
  const clients = new Deno.Command("bash", {
    args: [
      "-c",
      `${
        fileLimitCommand(FILE_LIMIT)
      } exec "${Deno.execPath()}" run -A "${script}" ${server.port} ${COUNT}`,
    ],
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const input = clients.stdin.getWriter();
  const lines = readLines(clients.stdout);
  try {
    const opened = JSON.parse((await lines.next()).value ?? "{}");
    assert.equal(
      opened.failed,
      0,
      `${opened.failed} connections failed (file limit ${opened.fileLimit}): ${opened.firstError}`,
    );
    assert.equal(opened.open, COUNT);

    const idle = await server.stats();
    assert.equal(idle.open, COUNT, "the server holds every connection");
    assert.equal(idle.upgraded - before.upgraded, COUNT);
    assert.equal(idle.echoed - before.echoed, COUNT);
    const used = (s: ServerStats) => s.heapUsed + s.external;
    const perConnection = (used(idle) - used(before)) / COUNT;
    const rssPerConnection = (idle.rss - before.rss) / COUNT;
    console.log(
      `load: ${COUNT} connections opened and echoed in ${opened.ms} ms; ` +
        `server memory per idle connection: ${
          Math.round(perConnection)
        } B heap+external, ${Math.round(rssPerConnection)} B RSS ` +
        `(heap+external ${mib(used(before))} -> ${mib(used(idle))} MiB, ` +
        `RSS ${mib(before.rss)} -> ${mib(idle.rss)} MiB)`,
    );

    await input.write(new TextEncoder().encode("close\n"));
    const closed = JSON.parse((await lines.next()).value ?? "{}");
    assert.equal(closed.closed, COUNT);
    // Each client's read ended on the server's echo of its 1000.
    assert.deepEqual(closed.codes, { "1000": COUNT });

    const after = await server.settled(20_000);
    assert.equal(after.open, 0, "every connection ended on the server");
    const ends = Object.entries(after.outcomes)
      .filter(([name]) => name.startsWith("load-"));
    assert.equal(ends.length, COUNT);
    assert.ok(ends.every(([, end]) => end === "close 1000"));
    console.log(
      `load: after closing, server heap+external ${mib(used(after))} MiB, RSS ${
        mib(after.rss)
      } MiB`,
    );
    // Everything per connection was given back; the outcome records that
    // the test server itself keeps (one string per connection) remain.
    assert.ok(
      used(after) - used(before) < 4 * 1024 * 1024,
      `the server kept ${mib(used(after) - used(before))} MiB`,
    );
    await server.shutdown();
  } finally {
    await input.close().catch(() => {});
    while (!(await lines.next()).done);
    const status = await clients.status;
    assert.ok(status.success, `the client process exited with ${status.code}`);
  }
});
