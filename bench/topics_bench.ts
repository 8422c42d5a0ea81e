// Topics fan-out over the in-memory pipe: one publish of a 32-byte text
// message to 1,000 and 10,000 subscribers, until every subscriber's far end
// has read it. Each run publishes BATCH messages, so deliveries per second =
// subscribers * BATCH / (time per run). The far ends only count bytes (no
// frame parsing), so the figure is the server side's cost.
// Run: deno bench -A bench/topics_bench.ts

import { Conn, Topics } from "../mod.ts";
import { createPipe } from "../_pipe.ts";

const BATCH = 10;
const FRAME = 2 + 32; // an unmasked server frame of 32 bytes
const message = "x".repeat(32);

/** `count` subscribed Conns whose far ends count what arrives. */
function room(count: number) {
  const topics = new Topics({ maxQueue: BATCH * 2 });
  let received = 0;
  let wake: (() => void) | undefined;
  for (let i = 0; i < count; i++) {
    const [a, b] = createPipe();
    topics.subscribe(new Conn(a, { role: "server" }), "room");
    (async () => {
      const buffer = new Uint8Array(64 * 1024);
      for (let n; (n = await b.read(buffer)) !== null;) {
        received += n;
        wake?.();
      }
    })();
  }
  return {
    topics,
    /** Resolves once `bytes` in all have arrived since the last call. */
    async arrived(bytes: number): Promise<void> {
      while (received < bytes) {
        await new Promise<void>((resolve) => wake = resolve);
      }
      received -= bytes;
    },
  };
}

for (const count of [1000, 10_000]) {
  const { topics, arrived } = room(count);
  Deno.bench({
    name: `publish to ${count} subscribers (x${BATCH})`,
    group: "fan-out",
    async fn() {
      for (let i = 0; i < BATCH; i++) topics.publish("room", message);
      await arrived(count * BATCH * FRAME);
    },
  });
}
