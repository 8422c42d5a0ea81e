// Fan-out server for bench/fanout/run.ts: every connection subscribes to one
// topic; every message a connection sends is published to all the others,
// and with a Redis URL to the subscribers of every process on that Redis.
// Usage: deno run -A bench/fanout/ours.ts PORT [REDIS_URL]
import { serve, Topics, Upgrader } from "../../mod.ts";
import { connectRedisBroker } from "../../examples/chat/redis.ts";

const redis = Deno.args[1];
const topics = new Topics({
  broker: redis === undefined ? undefined : await connectRedisBroker(redis),
});
const upgrader = new Upgrader({ checkOrigin: () => true });
serve({
  hostname: "127.0.0.1",
  port: Number(Deno.args[0]),
  onListen: ({ port }) => console.log(`listening ${port}`),
}, async (request) => {
  const conn = await upgrader.upgrade(request);
  topics.subscribe(conn, "room");
  try {
    for await (const { type, data } of conn) {
      topics.publish("room", data, { type, exclude: conn });
    }
  } catch {
    // A subscriber that goes away ends its loop.
  } finally {
    topics.unsubscribeAll(conn);
  }
});
