/**
 * The floor for idle memory: the least a Deno echo server can hold per idle
 * WebSocket connection, to compare the library's echo server against in an
 * idle-connections benchmark. None of the library's connection machinery
 * (no serve(), Upgrader or Conn), only its byte helpers: `Deno.listen`, a
 * hand-written 101, then per connection one async loop with one pending
 * 128-byte read, echoing unfragmented frames (enough for an echo benchmark's
 * checks; it is not a WebSocket server to use).
 *
 * ```sh
 * deno run --allow-net bench/idle_floor.ts 9000
 * ```
 *
 * @module
 */

import { headerLength, OPCODE, parseHeader, writeHeader } from "../frame.ts";
import { computeAcceptKey } from "../_handshake.ts";
import { concat, writeAll } from "../_io.ts";
import { maskInPlace } from "../_mask.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

async function handshake(tcp: Deno.Conn): Promise<boolean> {
  const buffer = new Uint8Array(4096);
  let length = 0;
  while (true) {
    const n = await tcp.read(buffer.subarray(length));
    if (n === null) return false;
    length += n;
    const head = decoder.decode(buffer.subarray(0, length));
    if (!head.includes("\r\n\r\n")) continue;
    const key = /^sec-websocket-key:\s*(\S+)/im.exec(head)?.[1] ?? "";
    const accept = await computeAcceptKey(key);
    await writeAll(
      tcp,
      encoder.encode(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n" +
          `Connection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`,
      ),
    );
    return true;
  }
}

/** Echoes masked client frames unmasked until a close frame or EOF. */
async function echo(tcp: Deno.Conn): Promise<void> {
  const idle = new Uint8Array(128);
  let pending = new Uint8Array(0);
  while (true) {
    const n = await tcp.read(idle);
    if (n === null) return;
    pending = concat([pending, idle.subarray(0, n)]);
    for (let h = parseHeader(pending); h !== null; h = parseHeader(pending)) {
      const frameLength = h.headerLength + h.length;
      if (pending.length < frameLength) {
        // Read the rest of a large frame straight into its own buffer.
        const frame = new Uint8Array(frameLength);
        frame.set(pending);
        for (let have = pending.length; have < frameLength;) {
          const m = await tcp.read(frame.subarray(have));
          if (m === null) return;
          have += m;
        }
        pending = frame;
      }
      if (h.opcode === OPCODE.Close) return;
      const payload = pending.subarray(h.headerLength, frameLength);
      maskInPlace(payload, h.maskKey, 0);
      const out = new Uint8Array(headerLength(h.length, false) + h.length);
      out.set(payload, writeHeader(out, 0, pending[0], h.length, undefined));
      await writeAll(tcp, out);
      pending = pending.slice(frameLength);
    }
  }
}

async function serve(tcp: Deno.Conn): Promise<void> {
  try {
    if (await handshake(tcp)) await echo(tcp);
  } catch {
    // A reset connection: nothing to do but close it.
  } finally {
    try {
      tcp.close();
    } catch {
      // Already closed.
    }
  }
}

if (import.meta.main) {
  const port = Number(Deno.args[0] ?? 9000);
  const listener = Deno.listen({ hostname: "127.0.0.1", port });
  console.log(`idle floor echo on ws://127.0.0.1:${port}/`);
  for await (const tcp of listener) serve(tcp);
}
