/**
 * The floor for idle memory: the least a Deno echo server can hold per idle
 * WebSocket connection, to compare the library's echo server against in an
 * idle-connections benchmark. It uses no library code: `Deno.listen`, a
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

const ACCEPT_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
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
    const digest = await crypto.subtle.digest(
      "SHA-1",
      encoder.encode(key + ACCEPT_GUID),
    );
    const accept = btoa(String.fromCharCode(...new Uint8Array(digest)));
    await tcp.write(encoder.encode(
      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n" +
        `Connection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`,
    ));
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
    const joined = new Uint8Array(pending.length + n);
    joined.set(pending);
    joined.set(idle.subarray(0, n), pending.length);
    pending = joined;
    while (pending.length >= 2) {
      let length = pending[1] & 0x7f;
      let headerLength = 2;
      if (length === 126) {
        if (pending.length < 4) break;
        length = (pending[2] << 8) | pending[3];
        headerLength = 4;
      } else if (length === 127) {
        if (pending.length < 10) break;
        length = new DataView(pending.buffer, pending.byteOffset + 6)
          .getUint32(0);
        headerLength = 10;
      }
      const frameLength = headerLength + 4 + length;
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
      if ((pending[0] & 0x0f) === 0x8) return;
      const out = new Uint8Array(headerLength + length);
      out.set(pending.subarray(0, headerLength));
      out[1] &= 0x7f;
      const key = pending.subarray(headerLength, headerLength + 4);
      for (let i = 0; i < length; i++) {
        out[headerLength + i] = pending[headerLength + 4 + i] ^ key[i & 3];
      }
      for (let written = 0; written < out.length;) {
        written += await tcp.write(out.subarray(written));
      }
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
