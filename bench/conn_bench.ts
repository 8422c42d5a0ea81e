// Conn micro-benchmarks over the in-memory pipe: an echo of 32-byte
// messages between a client-role and a server-role Conn. Each run moves
// 1000 messages, so messages per second = 1000 / (time per run).
// Run: deno bench -A bench/conn_bench.ts

import { Conn, MESSAGE_TYPE } from "../conn.ts";
import { createPipe } from "../_pipe.ts";

const COUNT = 1000;
const payload = new Uint8Array(32).fill(0x61);

function echoPair() {
  const [a, b] = createPipe();
  const server = new Conn(a, { role: "server" });
  const client = new Conn(b, { role: "client" });
  // The echo server: read a message, write it back.
  (async () => {
    try {
      for await (const { type, data } of server) {
        await server.writeMessage(type, data);
      }
    } catch {
      // The pair is dropped when the process ends.
    }
  })();
  return client;
}

const pipelined = echoPair();
Deno.bench({
  name: "echo 1000 x 32 B, all in flight",
  group: "echo",
  baseline: true,
  async fn() {
    for (let i = 0; i < COUNT; i++) {
      pipelined.writeMessage(MESSAGE_TYPE.Binary, payload);
    }
    for (let i = 0; i < COUNT; i++) await pipelined.readMessage();
  },
});

const windowed = echoPair();
Deno.bench({
  name: "echo 1000 x 32 B, 64 in flight",
  group: "echo",
  async fn() {
    let sent = 0;
    for (; sent < 64; sent++) {
      windowed.writeMessage(MESSAGE_TYPE.Binary, payload);
    }
    for (let got = 0; got < COUNT; got++) {
      await windowed.readMessage();
      if (sent < COUNT) {
        windowed.writeMessage(MESSAGE_TYPE.Binary, payload);
        sent++;
      }
    }
  },
});

const sequential = echoPair();
Deno.bench({
  name: "echo 1000 x 32 B, one at a time",
  group: "echo",
  async fn() {
    for (let i = 0; i < COUNT; i++) {
      await sequential.writeMessage(MESSAGE_TYPE.Binary, payload);
      await sequential.readMessage();
    }
  },
});

// The same echo over a real loopback TCP connection.
const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
const [serverSocket, clientSocket] = await Promise.all([
  listener.accept(),
  Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
]);
listener.close();
const tcpServer = new Conn(serverSocket, { role: "server" });
const tcpClient = new Conn(clientSocket, { role: "client" });
(async () => {
  try {
    for await (const { type, data } of tcpServer) {
      await tcpServer.writeMessage(type, data);
    }
  } catch {
    // The sockets are dropped when the process ends.
  }
})();

Deno.bench({
  name: "TCP echo 1000 x 32 B, 64 in flight",
  group: "tcp",
  baseline: true,
  async fn() {
    let sent = 0;
    for (; sent < 64; sent++) {
      tcpClient.writeMessage(MESSAGE_TYPE.Binary, payload);
    }
    for (let got = 0; got < COUNT; got++) {
      await tcpClient.readMessage();
      if (sent < COUNT) {
        tcpClient.writeMessage(MESSAGE_TYPE.Binary, payload);
        sent++;
      }
    }
  },
});

Deno.bench({
  name: "TCP echo 1000 x 32 B, one at a time",
  group: "tcp",
  async fn() {
    for (let i = 0; i < COUNT; i++) {
      await tcpClient.writeMessage(MESSAGE_TYPE.Binary, payload);
      await tcpClient.readMessage();
    }
  },
});

// Large messages in memory: the server reads each payload into one buffer
// with room for its echo's header in front, so the echo is a single write.
const large = echoPair();
for (
  const [name, size, count] of [
    ["64 KiB", 64 * 1024, 64],
    ["1 MiB", 1 << 20, 4],
  ] as const
) {
  const data = new Uint8Array(size).fill(0x62);
  Deno.bench({
    name: `echo ${count} x ${name}, 4 in flight`,
    group: `echo ${name}`,
    async fn() {
      let sent = 0;
      for (; sent < 4; sent++) large.writeMessage(MESSAGE_TYPE.Binary, data);
      for (let got = 0; got < count; got++) {
        await large.readMessage();
        if (sent < count) {
          large.writeMessage(MESSAGE_TYPE.Binary, data);
          sent++;
        }
      }
    },
  });
}
