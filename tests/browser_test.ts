// The chat and echo examples in a real browser: headless Chromium (Debian's
// package) driven through npm:playwright-core. CI installs Chromium, so a
// missing one fails these tests with a message saying so instead of skipping.
// playwright-core is imported by inline specifier, like every test-only npm
// package (see _ws.ts), so that the examples start without npm access.
// deno-lint-ignore-file no-import-prefix
import assert from "node:assert/strict";
import * as playwright from "npm:playwright-core@1";
import { startServer as startChat } from "../examples/chat/server.ts";
import { startServer as startWebChat } from "../examples/chat/web.ts";
import { startServer as startCommand } from "../examples/command/server.ts";
import { startServer as startEcho } from "../examples/echo/server.ts";
import { startServer as startFilewatch } from "../examples/filewatch/server.ts";
import { Sessions } from "./_helpers.ts";

const CHROMIUM = "/usr/bin/chromium";

/**
 * Flags that let Chromium run as root in a container and keep it off the
 * internet: without the networking ones it keeps trying to reach Google's
 * services, and those connections are refused here.
 */
const CHROMIUM_FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/** A headless Chromium with a fresh profile, removed on dispose. */
async function launchChromium(): Promise<
  playwright.BrowserContext & AsyncDisposable
> {
  try {
    await Deno.stat(CHROMIUM);
  } catch (error) {
    throw new Error(
      `Cannot run the browser test: ${CHROMIUM} is missing; install Debian's chromium package (apt-get install chromium)`,
      { cause: error },
    );
  }
  const profile = await Deno.makeTempDir({ prefix: "denows-chromium-" });
  let context: playwright.BrowserContext;
  try {
    // launchPersistentContext is how playwright takes a --user-data-dir.
    context = await playwright.chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_FLAGS,
      timeout: 30_000,
    });
  } catch (error) {
    await Deno.remove(profile, { recursive: true });
    throw error;
  }
  return Object.assign(context, {
    async [Symbol.asyncDispose]() {
      await context.close();
      await Deno.remove(profile, { recursive: true });
    },
  });
}

/**
 * A TCP relay in front of a server that keeps the first bytes each server
 * connection sends back: the response heads (and first frames) that
 * Chromium reads but never shows to the page.
 */
function startRelay(target: number) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const replies: Uint8Array[] = [];
  const sockets = new Set<Deno.Conn>();
  const pipes: Promise<void>[] = [];
  const pipe = async (from: Deno.Conn, to: Deno.Conn, keep?: Uint8Array[]) => {
    const buffer = new Uint8Array(16 * 1024);
    let kept = new Uint8Array(0);
    try {
      for (;;) {
        const n = await from.read(buffer);
        if (n === null) break;
        if (keep !== undefined && kept.length < 4096) {
          const grown = new Uint8Array(kept.length + n);
          grown.set(kept);
          grown.set(buffer.subarray(0, n), kept.length);
          kept = grown;
        }
        let written = 0;
        while (written < n) {
          written += await to.write(buffer.subarray(written, n));
        }
      }
    } catch {
      // One side went away: the finally below ends both.
    } finally {
      if (keep !== undefined) keep.push(kept);
      for (const socket of [from, to]) {
        if (sockets.delete(socket)) socket.close();
      }
    }
  };
  const accepting = (async () => {
    for await (const client of listener) {
      const server = await Deno.connect({
        hostname: "127.0.0.1",
        port: target,
      });
      sockets.add(client).add(server);
      pipes.push(pipe(client, server), pipe(server, client, replies));
    }
  })();
  return {
    port: (listener.addr as Deno.NetAddr).port,
    replies,
    async close() {
      listener.close();
      await accepting;
      for (const socket of sockets) socket.close();
      sockets.clear();
      await Promise.all(pipes);
    },
  };
}

/** Splits a reply into its HTTP head and the bytes that follow it. */
function splitHead(reply: Uint8Array): { head: string; rest: Uint8Array } {
  const text = new TextDecoder("latin1").decode(reply);
  const end = text.indexOf("\r\n\r\n");
  assert.notEqual(end, -1, "the reply has no complete HTTP head");
  return { head: text.slice(0, end), rest: reply.subarray(end + 4) };
}

async function openPage(
  context: playwright.BrowserContext,
  url: string,
): Promise<playwright.Page> {
  const page = await context.newPage();
  page.setDefaultTimeout(10_000);
  await page.goto(url);
  return page;
}

/**
 * Two chat pages on `port`: a line typed in one appears in both; `joined`
 * says how many clients the server counts.
 */
async function chatInTwoPages(port: number, joined: () => number) {
  await using browser = await launchChromium();
  const url = `http://127.0.0.1:${port}/`;
  const alice = await openPage(browser, url);
  const bob = await openPage(browser, url);
  await alice.waitForSelector("body[data-state=open]");
  await bob.waitForSelector("body[data-state=open]");
  assert.equal(joined(), 2);

  await alice.fill("#msg", "Hello from Alice");
  await alice.press("#msg", "Enter");
  await bob.locator("#log div", { hasText: "Hello from Alice" }).waitFor();
  // The server broadcasts to the sender as well, and the input is cleared.
  await alice.locator("#log div", { hasText: "Hello from Alice" }).waitFor();
  assert.equal(await alice.inputValue("#msg"), "");

  await bob.fill("#msg", "Hi Alice");
  await bob.click("#send");
  await alice.locator("#log div", { hasText: "Hi Alice" }).waitFor();
}

Deno.test("chat: a line typed in one browser page appears in the other", async () => {
  const chat = new Sessions();
  const { server, hub } = startChat({
    port: 0,
    onConnection: chat.onConnection,
  });
  try {
    await chatInTwoPages(server.addr.port, () => hub.size);
  } finally {
    await chat.settled();
    await server.shutdown();
  }
  assert.equal(hub.size, 0);
});

Deno.test("chat: the same page runs unchanged against upgradeWebSocket", async () => {
  const { server, sockets } = startWebChat({ port: 0 });
  const closed: Promise<unknown>[] = [];
  try {
    await chatInTwoPages(server.addr.port, () => {
      for (const socket of sockets) {
        closed.push(
          new Promise((resolve) => socket.addEventListener("close", resolve)),
        );
        // Chromium offered permessage-deflate, and the server took it.
        assert.match(socket.extensions, /^permessage-deflate/);
      }
      return sockets.size;
    });
    // Closing the browser closed the pages' sockets (1001, going away).
    const events = await Promise.all(closed) as CloseEvent[];
    assert.deepEqual(events.map((event) => event.code), [1001, 1001]);
  } finally {
    await server.shutdown();
  }
  assert.equal(sockets.size, 0);
});

Deno.test("echo: the page round-trips a message with permessage-deflate negotiated", async () => {
  const echo = new Sessions();
  const server = startEcho({
    port: 0,
    compress: true,
    onConnection: echo.onConnection,
  });
  // Chromium talks to the server through the relay, which sees what the
  // page cannot: the 101's Sec-WebSocket-Extensions and the RSV1 bit.
  const relay = startRelay(server.addr.port);
  try {
    await using browser = await launchChromium();
    const page = await openPage(browser, `http://127.0.0.1:${relay.port}/`);
    await page.click("#open");
    await page.locator("#output div", { hasText: "OPEN" }).waitFor();
    // Over the 256-byte threshold below which messages go uncompressed.
    const message = "Hello, compressed world! ".repeat(40);
    await page.fill("#input", message);
    await page.click("#send");
    await page.locator("#output div", { hasText: `RESPONSE: ${message}` })
      .waitFor();
    await page.click("#close");
    await page.locator("#output div", { hasText: "CLOSE" }).waitFor();
  } finally {
    await echo.settled();
    await relay.close();
    await server.shutdown();
  }
  assert.equal(echo.conns.length, 1);
  // Other connections carried the page (and maybe nothing: Chromium opens
  // spare ones); exactly one was upgraded.
  const latin1 = new TextDecoder("latin1");
  const upgrades = relay.replies
    .filter((reply) => latin1.decode(reply).startsWith("HTTP/1.1 101 "))
    .map(splitHead);
  assert.equal(upgrades.length, 1);
  const [{ head, rest }] = upgrades;
  assert.match(head, /^sec-websocket-extensions: permessage-deflate\b/im);
  // The first frame after the 101 is the echo: FIN, RSV1 (compressed), text.
  assert.equal(rest[0], 0x80 | 0x40 | 0x1, "the echo was not compressed");
});

Deno.test("filewatch: the page shows the file and follows its changes", async () => {
  const path = await Deno.makeTempFile();
  await Deno.writeTextFile(path, "<b>not markup</b>");
  const watch = new Sessions();
  const server = startFilewatch({
    port: 0,
    path,
    pollInterval: 50,
    onConnection: watch.onConnection,
  });
  try {
    await using browser = await launchChromium();
    const page = await openPage(
      browser,
      `http://127.0.0.1:${server.addr.port}/`,
    );
    // Shown as text, never parsed as HTML.
    await page.locator("#file", { hasText: "<b>not markup</b>" }).waitFor();
    assert.equal(await page.textContent("#name"), path);
    await Deno.writeTextFile(path, "changed on disk");
    await page.locator("#file", { hasText: "changed on disk" }).waitFor();
  } finally {
    await watch.settled();
    await server.shutdown();
    await Deno.remove(path);
  }
});

Deno.test("command: the page sends a line to the process and shows its output", async () => {
  const command = new Sessions();
  const server = startCommand({
    port: 0,
    command: "cat",
    onConnection: command.onConnection,
  });
  try {
    await using browser = await launchChromium();
    const page = await openPage(
      browser,
      `http://127.0.0.1:${server.addr.port}/`,
    );
    await page.locator("#log div", { hasText: "Process started." }).waitFor();
    await page.fill("#line", "hello, cat");
    await page.press("#line", "Enter");
    // The page echoes the input as "> hello, cat"; cat's answer is the line.
    await page.locator("#log div", { hasText: /^hello, cat$/ }).waitFor();
  } finally {
    await command.settled();
    await server.shutdown();
  }
});
