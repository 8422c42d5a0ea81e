// Small socket helpers shared by the server, the Upgrader and the Dialer.

/** Closes `closer`, ignoring that it may be closed already. */
export function closeQuietly(closer: { close(): void } | undefined): void {
  try {
    closer?.close();
  } catch {
    // Already closed, or handed over (Deno.startTls takes the socket).
  }
}

/** Writes all of `data`: a transport write may take fewer bytes. */
export async function writeAll(
  writer: { write(data: Uint8Array): Promise<number> },
  data: Uint8Array,
): Promise<void> {
  for (let offset = 0; offset < data.byteLength;) {
    offset += await writer.write(data.subarray(offset));
  }
}

/** How long a closing socket keeps reading so its peer sees the last response. */
export const LINGER_MS = 1000;
/** Input discarded while lingering; past it the socket closes at once. */
const LINGER_MAX_BYTES = 256 * 1024;

/** A socket that can be half-closed. */
export interface LingeringSocket {
  read(buffer: Uint8Array): Promise<number | null>;
  closeWrite?(): Promise<void>;
  close(): void;
}

/**
 * Closes a socket whose peer may still be sending (an unread body, pipelined
 * requests, a refused handshake). Closing with unread input makes the kernel
 * send RST, which can destroy the response before the peer reads it; so the
 * write side is shut first and input discarded until EOF, for at most
 * {@linkcode LINGER_MS} or {@linkcode LINGER_MAX_BYTES}. Never rejects.
 */
export async function lingeringClose(socket: LingeringSocket): Promise<void> {
  const timer = setTimeout(() => closeQuietly(socket), LINGER_MS);
  try {
    if (socket.closeWrite === undefined) return;
    await socket.closeWrite();
    const sink = new Uint8Array(16 * 1024);
    for (let drained = 0; drained < LINGER_MAX_BYTES;) {
      const n = await socket.read(sink);
      if (n === null) break;
      drained += n;
    }
  } catch {
    // Reset by the peer or closed by the timer: either way, done.
  } finally {
    clearTimeout(timer);
    closeQuietly(socket);
  }
}

/** `parts` joined into one new buffer. */
export function concat(parts: readonly Uint8Array[]): Uint8Array<ArrayBuffer> {
  let size = 0;
  for (const part of parts) size += part.length;
  const joined = new Uint8Array(size);
  let offset = 0;
  for (const part of parts) {
    joined.set(part, offset);
    offset += part.length;
  }
  return joined;
}

/** Error classes whose constructor takes `(message, options)` as Error's does. */
const PLAIN_ERRORS = new Set<unknown>([Error, ...Object.values(Deno.errors)]);

/**
 * Puts `context` (what was being done, to what) in front of a platform
 * error's message, keeping its class, so that `instanceof
 * Deno.errors.ConnectionRefused` still holds, and the original as `cause`.
 * Errors of other classes already say what they were about: they pass as
 * they are.
 */
export function withContext(error: unknown, context: string): unknown {
  if (!(error instanceof Error) || !PLAIN_ERRORS.has(error.constructor)) {
    return error;
  }
  const Class = error.constructor as ErrorConstructor;
  return new Class(`${context}: ${error.message}`, { cause: error });
}
