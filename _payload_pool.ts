// Memory of large message payloads, handed back by the application and
// reused for the next large message read.
//
// A fresh buffer for every large message is what a default machine punishes:
// the allocator returns a freed megabyte to the kernel, and the next
// message's buffer faults its pages in again while the socket is read into
// it (on a 2-core VM that halves throughput, and how often it happens
// depends on the allocator's mood). Only the application knows when it is
// done with a message, so reuse is its choice: disposing a Message (`using`)
// hands its buffer back. The buffer is detached then (ArrayBuffer
// `transfer()`), so a view kept past its disposal reads as empty and throws
// on writes; it never shows the bytes of a later message.
//
// A payload still being written (an echo whose writeMessage was not
// awaited) is held until the write settles, and reclaimed only then. The
// writer also borrows from the pool for what only it sees: a client's
// masked copy of a large payload, given back once written.

/** Payloads from this size come from the pool; smaller ones are cheap to allocate. */
export const POOLED_PAYLOAD = 64 * 1024;
/** Most bytes kept in free buffers. */
const POOL_BYTES = 32 * 1024 * 1024;
/** Milliseconds between sweeps that free the buffers of an idle pool. */
const SWEEP_INTERVAL = 1000;

/** Payload buffers the application holds and may hand back. */
const lent = new WeakSet<ArrayBuffer>();
/** Lent buffers queued in writes, with how many writes hold each. */
const writing = new Map<ArrayBuffer, number>();
/** Lent buffers handed back while a write still held them. */
const handedBack = new Set<ArrayBuffer>();
/** Free buffers, reused for the next large payloads. */
const free: ArrayBuffer[] = [];
let freeBytes = 0;
let takenSinceSweep = false;
let sweepTimer: ReturnType<typeof setInterval> | undefined;

/**
 * A buffer of at least `size` bytes for a payload the application will own:
 * a free one where one fits (at most twice the size, so a small message does
 * not pin a huge buffer), else a new one of exactly `size`.
 */
export function takePayloadBuffer(size: number): ArrayBuffer {
  if (size < POOLED_PAYLOAD) return new ArrayBuffer(size);
  const i = free.findIndex((buffer) =>
    buffer.byteLength >= size && buffer.byteLength <= 2 * size
  );
  let buffer: ArrayBuffer;
  if (i === -1) {
    buffer = new ArrayBuffer(size);
  } else {
    [buffer] = free.splice(i, 1);
    freeBytes -= buffer.byteLength;
    takenSinceSweep = true;
  }
  lent.add(buffer);
  return buffer;
}

/**
 * Holds a lent payload until `write` settles, so handing it back meanwhile
 * does not detach bytes a writer still has to send. Returns `write`.
 */
export function holdWhileWriting(
  data: Uint8Array,
  write: Promise<void>,
): Promise<void> {
  const buffer = data.buffer as ArrayBuffer;
  if (!lent.has(buffer)) return write;
  writing.set(buffer, (writing.get(buffer) ?? 0) + 1);
  const release = () => {
    const holds = writing.get(buffer)! - 1;
    if (holds > 0) {
      writing.set(buffer, holds);
      return;
    }
    writing.delete(buffer);
    if (handedBack.delete(buffer)) reclaim(buffer);
  };
  write.then(release, release);
  return write;
}

/**
 * The application is done with a payload: its buffer is reused (now, or
 * once the writes that hold it settle). Anything else is left to the GC.
 */
export function handBack(data: Uint8Array): void {
  const buffer = data.buffer as ArrayBuffer;
  if (!lent.delete(buffer)) return;
  if (writing.has(buffer)) handedBack.add(buffer);
  else reclaim(buffer);
}

/** Memory the library used on its own and is done with, for the pool. */
export function giveBack(buffer: ArrayBuffer): void {
  lent.delete(buffer);
  reclaim(buffer);
}

function reclaim(buffer: ArrayBuffer): void {
  const size = buffer.byteLength;
  if (freeBytes + size > POOL_BYTES) return;
  // transfer() moves the memory to a new ArrayBuffer and detaches the one
  // the application holds: views on it become empty, not shared.
  free.push(buffer.transfer());
  freeBytes += size;
  if (sweepTimer === undefined) {
    sweepTimer = setInterval(sweep, SWEEP_INTERVAL);
    Deno.unrefTimer(sweepTimer);
  }
}

/** Frees the pool once no buffer was taken for a whole interval. */
function sweep(): void {
  if (takenSinceSweep) {
    takenSinceSweep = false;
    return;
  }
  free.length = 0;
  freeBytes = 0;
  clearInterval(sweepTimer);
  sweepTimer = undefined;
}
