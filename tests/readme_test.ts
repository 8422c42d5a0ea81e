// The README's programs, run as a reader would paste them: the Quick start
// server and the Hono example each listen, answer HTTP and WebSocket
// clients, and shut down gracefully on Ctrl-C (SIGINT), closing their
// WebSockets with 1001. Their import of "@denows/websocket" is pointed at
// this checkout, and their port at a free one.
import assert from "node:assert/strict";

const README = await Deno.readTextFile(
  new URL("../README.md", import.meta.url),
);
const PROGRAMS = [...README.matchAll(/```ts ignore\n([\s\S]*?)```/g)].map((
  match,
) => match[1]);

/** The README program that contains `marker`. */
function program(marker: string): string {
  const found = PROGRAMS.filter((source) => source.includes(marker));
  assert.equal(found.length, 1, `one README program with ${marker}`);
  return found[0]
    .replaceAll(
      '"@denows/websocket"',
      JSON.stringify(new URL("../mod.ts", import.meta.url).href),
    )
    .replace("port: 8080", "port: 0");
}

/** Runs `source` with `deno run --allow-net` until it prints its URL. */
async function start(source: string) {
  const dir = await Deno.makeTempDir();
  const file = `${dir}/server.ts`;
  await Deno.writeTextFile(file, source);
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--quiet", "--allow-net", file],
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const stdout = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let printed = "";
  let port: string | undefined;
  while (port === undefined) {
    const { value, done } = await stdout.read();
    if (done) assert.fail(`the program exited early: ${await stderr}`);
    printed += value;
    port = /Listening on http:\/\/[^:]+:(\d+)\//.exec(printed)?.[1];
  }
  return {
    base: `127.0.0.1:${port}`,
    /** Sends SIGINT; resolves the exit code and stderr once it has exited. */
    async interrupt() {
      child.kill("SIGINT");
      const status = await child.status;
      await stdout.cancel();
      await Deno.remove(dir, { recursive: true });
      return { code: status.code, stderr: await stderr };
    },
  };
}

/**
 * Opens a WebSocket and checks one echo; `closed` resolves the close event
 * (wrapped: an async function cannot resolve to a promise).
 */
async function echoOnce(url: string): Promise<{ closed: Promise<CloseEvent> }> {
  const ws = new WebSocket(url);
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = reject;
  });
  const closed = new Promise<CloseEvent>((resolve) => ws.onclose = resolve);
  const reply = new Promise<MessageEvent>((resolve) => ws.onmessage = resolve);
  ws.send("hello");
  assert.equal((await reply).data, "hello");
  return { closed };
}

Deno.test("README: the Quick start server echoes, then shuts down on Ctrl-C", async () => {
  const server = await start(program("isWebSocketUpgrade(request)"));
  const page = await fetch(`http://${server.base}/`);
  assert.equal(await page.text(), "hello\n");
  const { closed } = await echoOnce(`ws://${server.base}/`);
  const { code, stderr } = await server.interrupt();
  assert.equal((await closed).code, 1001);
  assert.equal(code, 0);
  assert.equal(stderr, "");
});

Deno.test("README: the Hono example routes HTTP and WebSocket requests", async () => {
  const server = await start(program("npm:hono"));
  const page = await fetch(`http://${server.base}/`);
  assert.equal(await page.text(), "hello from Hono\n");
  const plain = await fetch(`http://${server.base}/ws`);
  assert.equal(plain.status, 426);
  assert.equal(plain.headers.get("upgrade"), "websocket");
  await plain.body?.cancel();
  const { closed } = await echoOnce(`ws://${server.base}/ws`);
  const { code, stderr } = await server.interrupt();
  assert.equal((await closed).code, 1001);
  assert.equal(code, 0);
  assert.equal(stderr, "");
});
