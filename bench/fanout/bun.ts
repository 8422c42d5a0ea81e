// The same fan-out server on Bun's built-in pub/sub, for comparison.
// Usage: bun bench/fanout/bun.ts PORT
declare const Bun: {
  serve(options: unknown): { port: number };
};

const server = Bun.serve({
  hostname: "127.0.0.1",
  port: Number(process.argv[2]),
  fetch(request: Request, server: { upgrade(r: Request): boolean }) {
    if (server.upgrade(request)) return undefined;
    return new Response("WebSocket only", { status: 426 });
  },
  websocket: {
    perMessageDeflate: false,
    open(ws: { subscribe(topic: string): void }) {
      ws.subscribe("room");
    },
    // ws.publish reaches every subscriber but the sender, as exclude does.
    message(
      ws: { publish(topic: string, data: unknown): void },
      data: unknown,
    ) {
      ws.publish("room", data);
    },
  },
});
console.log(`listening ${server.port}`);
