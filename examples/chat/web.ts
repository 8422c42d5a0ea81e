/**
 * The chat server written as for `Deno.serve` and `Deno.upgradeWebSocket`,
 * moved to this library by changing the import: the same page
 * (`home.html`) talks to it unchanged. It keeps the sockets in a `Set` and
 * sends each line to every one of them, the way such a server is usually
 * written; `server.ts` is the same room built on `Conn` and `Topics`, with
 * bounded queues for slow clients.
 *
 * What the import gains over Deno's own: the read limit below (Deno's
 * `upgradeWebSocket` has none) and permessage-deflate.
 *
 * ```sh
 * deno task chat:web        # then open http://127.0.0.1:8080/ in two tabs
 * ```
 *
 * @module
 */
import { type Server, upgradeWebSocket, type WebSocket } from "../../mod.ts";
import { parseServerArgs } from "../_cli.ts";
import { listen, type ListenOptions, servePage } from "../_shared.ts";

const page = new URL("./home.html", import.meta.url);

/**
 * Starts the chat server.
 *
 * @param options Where to listen.
 * @returns The running server (`shutdown()` stops it) and its open sockets.
 */
export function startServer(
  options: ListenOptions,
): { server: Server; sockets: Set<WebSocket> } {
  const sockets = new Set<WebSocket>();
  const server = listen(options, (request) => {
    if (new URL(request.url).pathname !== "/ws") {
      return servePage(request, page);
    }
    const { socket, response } = upgradeWebSocket(request, {
      readLimit: 512,
      enableCompression: true,
    });
    socket.onopen = () => sockets.add(socket);
    socket.onclose = () => sockets.delete(socket);
    socket.onmessage = (event) => {
      const line = String(event.data).replaceAll(/[\r\n]+/g, " ").trim();
      if (line === "") return;
      for (const peer of sockets) peer.send(line);
    };
    return response;
  });
  return { server, sockets };
}

if (import.meta.main) {
  const args = parseServerArgs(
    Deno.args,
    "Usage: web.ts [--port N] [--hostname H]",
  );
  startServer({
    port: args.port,
    hostname: args.hostname,
    onListen: ({ hostname, port }) =>
      console.log(`Chat on http://${hostname}:${port}/`),
  });
}
