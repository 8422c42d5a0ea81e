// Echo of 1 MiB binary messages over loopback TCP, 2 in flight, by a server
// loop that disposes each message (its memory is read into again) and by one
// that drops it (every message is read into fresh memory, whose pages the
// kernel faults in during the socket read). The gap between the two is the
// allocation cost that large messages pay when nothing is reused; on a
// 2-core VM it is about half the time per message.
// Run: deno bench -A bench/large_message_bench.ts

import { Conn, MESSAGE_TYPE } from "../conn.ts";

const MESSAGES = 16;
const payload = new Uint8Array(1024 * 1024).fill(0x61);

async function echoPair(dispose: boolean): Promise<Conn> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const [serverSocket, clientSocket] = await Promise.all([
    listener.accept(),
    Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
  ]);
  listener.close();
  const server = new Conn(serverSocket, { role: "server" });
  (async () => {
    for (;;) {
      const message = await server.readMessage();
      await server.writeMessage(message.type, message.data);
      if (dispose) message[Symbol.dispose]();
    }
  })().catch(() => {
    // The pair is dropped when the process ends.
  });
  return new Conn(clientSocket, { role: "client" });
}

/** Sends MESSAGES messages with 2 in flight and reads every echo. */
async function run(client: Conn): Promise<void> {
  let sent = 0;
  for (; sent < 2; sent++) client.writeMessage(MESSAGE_TYPE.Binary, payload);
  for (let got = 0; got < MESSAGES; got++) {
    using _echo = await client.readMessage();
    if (sent < MESSAGES) {
      client.writeMessage(MESSAGE_TYPE.Binary, payload);
      sent++;
    }
  }
}

const disposing = await echoPair(true);
const dropping = await echoPair(false);

Deno.bench({
  name: "echo 16 x 1 MiB, server disposes each message",
  group: "1 MiB echo",
  baseline: true,
  fn: () => run(disposing),
});

Deno.bench({
  name: "echo 16 x 1 MiB, server drops each message",
  group: "1 MiB echo",
  fn: () => run(dropping),
});
