// Closing a Conn (RFC 6455 section 7): the closing handshake, failing the
// connection with a close frame, and closing the transport once both close
// frames have crossed. Each step waits a bounded time, through Deadline, and
// then closes the transport whatever happened.

import {
  formatCloseMessage,
  MAX_CONTROL_PAYLOAD,
  MESSAGE_TYPE,
  type ProtocolError,
} from "./frame.ts";
import { Deadline } from "./_deadline.ts";
import type { Reader } from "./_reader.ts";
import type { Writer } from "./_writer.ts";

/** What closing uses of the connection itself: its public methods. */
export interface Closable {
  readonly closed: boolean;
  close(): void;
  writeControl(
    type: typeof MESSAGE_TYPE.Close,
    data: Uint8Array,
  ): Promise<void>;
}

const encoder = new TextEncoder();
const noop = () => {};

/** How long a failing connection waits for its close frame to be written. */
const FAIL_CLOSE_TIMEOUT = 1000;

/**
 * The closing handshake: sends `payload` as our close frame, then reads
 * until the peer's close frame arrives, and closes the transport; at
 * `timeout` milliseconds it closes the transport anyway. Never rejects.
 */
export async function closeGracefully(
  conn: Closable,
  reader: Reader,
  writer: Writer,
  payload: Uint8Array,
  timeout: number,
  afterCurrentMessage: boolean,
): Promise<void> {
  const deadline = new Deadline("close gracefully");
  deadline.set(Date.now() + timeout);
  const handshake = closingHandshake(
    conn,
    reader,
    writer,
    payload,
    afterCurrentMessage,
  );
  // On time or not, closing the transport ends the handshake's waits.
  await deadline.bound(handshake).catch(noop);
  conn.close();
}

async function closingHandshake(
  conn: Closable,
  reader: Reader,
  writer: Writer,
  payload: Uint8Array,
  afterCurrentMessage: boolean,
): Promise<void> {
  if (afterCurrentMessage && reader.handling && !conn.closed) {
    await reader.nextReadBegun();
  }
  if (!conn.closed && writer.canReply) {
    await conn.writeControl(MESSAGE_TYPE.Close, payload).catch(noop);
  }
  while (!conn.closed && reader.error === undefined) {
    await (reader.reading ? reader.idle() : reader.drain());
  }
}

/**
 * Sends the close frame for a protocol error (or another reason to give up
 * on the peer), then closes the transport (RFC 6455 section 7.1.7).
 */
export function failConnection(
  conn: Closable,
  writer: Writer,
  error: Pick<ProtocolError, "code" | "message">,
): void {
  if (!writer.canReply) {
    conn.close();
    return;
  }
  const payload = formatCloseMessage(error.code, closeReason(error.message));
  closeWhen(conn, writer.writeControl(MESSAGE_TYPE.Close, payload, 0));
}

/** Closes the transport once every queued frame is written. */
export function closeAfterFlush(conn: Closable, writer: Writer): void {
  const flushed = writer.flushed();
  if (flushed === undefined) conn.close();
  else closeWhen(conn, flushed);
}

/** Closes the transport once `written` settles, or after FAIL_CLOSE_TIMEOUT. */
function closeWhen(conn: Closable, written: Promise<void>): void {
  const deadline = new Deadline("write close frame");
  deadline.set(Date.now() + FAIL_CLOSE_TIMEOUT);
  const close = () => conn.close();
  deadline.bound(written).then(close, close);
}

/** Truncates a close reason to 123 bytes without splitting a character. */
function closeReason(text: string): string {
  let reason = text;
  while (encoder.encode(reason).length > MAX_CONTROL_PAYLOAD - 2) {
    reason = reason.slice(0, -1);
  }
  return reason;
}
