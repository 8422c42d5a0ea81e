// The client side of the many-connections test, run as a child process
// with a raised open file limit: opens `count` WebSocket connections to the
// echo server on `port` (arguments), a bounded number of handshakes at a
// time, echoes one message on each and checks it, then leaves them idle.
// It prints one JSON line when all are open ({"open", "failed", "ms",
// "fileLimit"}), then on the "close" command closes every connection with
// the closing handshake and prints {"closed", "codes"} before exiting.

import { type Conn, MESSAGE_TYPE } from "../../conn.ts";
import { Dialer } from "../../dialer.ts";
import { readLines } from "./helpers.ts";

const port = Number(Deno.args[0]);
const count = Number(Deno.args[1]);
const concurrency = 200;
const dialer = new Dialer({ handshakeTimeout: 20_000 });
const conns: Conn[] = [];
const errors: string[] = [];

async function open(id: number): Promise<void> {
  try {
    const { conn } = await dialer.dial(`ws://127.0.0.1:${port}/load-${id}`);
    const text = `hello ${id}`;
    await conn.writeMessage(MESSAGE_TYPE.Text, text);
    const { data } = await conn.readMessage();
    if (new TextDecoder().decode(data) !== text) {
      throw new Error(`Connection ${id} got a wrong echo`);
    }
    conns.push(conn);
  } catch (error) {
    errors.push(String(error));
  }
}

const started = performance.now();
let next = 0;
await Promise.all(
  Array.from({ length: concurrency }, async () => {
    while (next < count) await open(next++);
  }),
);
const fileLimit = new TextDecoder().decode(
  (await new Deno.Command("bash", { args: ["-c", "ulimit -n"] }).output())
    .stdout,
).trim();
console.log(JSON.stringify({
  open: conns.length,
  failed: errors.length,
  firstError: errors[0],
  ms: Math.round(performance.now() - started),
  fileLimit,
}));

for await (const line of readLines(Deno.stdin.readable)) {
  if (line.trim() !== "close") continue;
  const codes: Record<string, number> = {};
  let index = 0;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (index < conns.length) {
        const conn = conns[index++];
        // Read the server's echo of our close; count how the read ended.
        const reading = conn.readMessage().then(
          () => "message",
          (error) => String(error.code ?? error.name),
        );
        await conn.closeGracefully(1000, "", { timeout: 5000 });
        const code = await reading;
        codes[code] = (codes[code] ?? 0) + 1;
      }
    }),
  );
  console.log(JSON.stringify({ closed: conns.length, codes }));
  break;
}
