// Topics on their own (no broker): subscriptions, publishing with and
// without the sender, one frame shared by every subscriber, a subscriber
// that never reads dropped with 1008 without slowing the others, closed
// connections forgotten.
import assert from "node:assert/strict";
import { Conn, MESSAGE_TYPE, Topics } from "../mod.ts";
import { createPipe } from "../_pipe.ts";
import { FrameReader, OP, parseClose } from "./_frames.ts";

const decoder = new TextDecoder();

/** A server Conn over a pipe and a client Conn reading the other end. */
function pair(capacity?: number) {
  const [a, b] = createPipe({ capacity });
  return {
    server: new Conn(a, { role: "server" }),
    client: new Conn(b, { role: "client" }),
    raw: b,
  };
}

async function text(conn: Conn): Promise<string> {
  return decoder.decode((await conn.readMessage()).data);
}

Deno.test("publish() reaches the topic's subscribers, and not the excluded sender", async () => {
  const topics = new Topics();
  const [alice, bob, carol] = [pair(), pair(), pair()];
  topics.subscribe(alice.server, "room");
  topics.subscribe(bob.server, "room");
  topics.subscribe(bob.server, "room"); // once is enough
  topics.subscribe(carol.server, "other");
  assert.equal(topics.subscriberCount("room"), 2);
  assert.deepEqual(topics.topicsOf(bob.server), ["room"]);

  assert.equal(topics.publish("room", "hello"), 2);
  assert.equal(await text(alice.client), "hello");
  assert.equal(await text(bob.client), "hello");
  assert.equal(
    topics.publish("room", new Uint8Array([1, 2]), { exclude: alice.server }),
    1,
  );
  const binary = await bob.client.readMessage();
  assert.equal(binary.type, MESSAGE_TYPE.Binary);
  assert.deepEqual([...binary.data], [1, 2]);
  assert.equal(topics.publish("nobody", "x"), 0);

  topics.unsubscribe(bob.server, "room");
  topics.unsubscribeAll(alice.server);
  assert.equal(topics.subscriberCount("room"), 0);
  assert.equal(topics.publish("room", "gone"), 0);
  assert.equal(topics.publish("other", "carol"), 1);
  assert.equal(await text(carol.client), "carol");
  for (const { server, client } of [alice, bob, carol]) {
    server.close();
    client.close();
  }
});

Deno.test("a subscriber that never reads is dropped with 1008 and the others keep up", async () => {
  const topics = new Topics({ maxQueue: 4 });
  const fast = pair();
  // Room for about one message in the pipe: the rest waits in its queue.
  const stalled = pair(2048);
  topics.subscribe(fast.server, "room");
  topics.subscribe(stalled.server, "room");
  const line = "x".repeat(1000);
  let sent = 0;
  while (topics.subscriberCount("room") === 2) {
    assert.ok(sent < 100, "the stalled subscriber was never dropped");
    topics.publish("room", line);
    sent++;
    assert.equal(await text(fast.client), line);
  }
  assert.deepEqual(topics.topicsOf(stalled.server), []);
  topics.publish("room", "after");
  assert.equal(await text(fast.client), "after");
  // The stalled one gets what was already in its pipe, then 1008.
  const frames = new FrameReader(stalled.raw);
  let close;
  for (let f; (f = await frames.next()) !== null;) {
    if (f.opcode === OP.close) close = parseClose(f.payload);
  }
  assert.deepEqual(close, { code: 1008, reason: "too slow" });
  fast.server.close();
  fast.client.close();
  stalled.raw.close();
});

Deno.test("a connection is unsubscribed from everything when it closes", async () => {
  const topics = new Topics();
  const gone = pair();
  topics.subscribe(gone.server, "room");
  topics.subscribe(gone.server, "other");
  // Closed by the peer's closing handshake, not by the application.
  await gone.client.closeGracefully();
  await gone.server.readMessage().catch(() => {});
  assert.equal(gone.server.closed, true);
  assert.equal(topics.subscriberCount("room"), 0);
  assert.equal(topics.subscriberCount("other"), 0);
  assert.deepEqual(topics.topicsOf(gone.server), []);
  // A closed connection is not subscribed at all.
  topics.subscribe(gone.server, "room");
  assert.equal(topics.subscriberCount("room"), 0);
});

Deno.test("Topics checks its options and publish() its type", () => {
  assert.throws(() => new Topics({ maxQueue: 0 }), {
    name: "RangeError",
    message: "Cannot create topics: maxQueue must be a positive integer, got 0",
  });
  assert.throws(
    // @ts-expect-error: not a broker
    () => new Topics({ broker: { publish() {} } }),
    {
      name: "TypeError",
      message:
        "Cannot create topics: broker must have publish(), subscribe() and unsubscribe()",
    },
  );
  assert.throws(
    // @ts-expect-error: a control type
    () => new Topics().publish("room", "x", { type: MESSAGE_TYPE.Ping }),
    {
      name: "TypeError",
      message: "Cannot publish: 9 is not a data message type",
    },
  );
});
