/**
 * {@linkcode joinMessages}: a connection's data messages read as one byte
 * stream (gorilla's `JoinMessages`), for line- or record-oriented consumers
 * such as `TextDecoderStream` or a parser that does not care where one
 * WebSocket message ends and the next begins.
 *
 * @module
 */

import type { Conn, MessageReader } from "./conn.ts";
import { CLOSE_CODE, isCloseError } from "./frame.ts";

/**
 * The chunk a default (non-BYOB) reader of the stream gets: large enough
 * that a big message takes few reads, small enough that an idle stream's
 * pending read holds little memory.
 */
const CHUNK_SIZE = 16 * 1024;

const encoder = new TextEncoder();

/**
 * Reads the data messages of `conn` as one byte stream, each message's
 * payload followed by `terminator` (gorilla's `JoinMessages`). Text and
 * binary messages are joined alike.
 *
 * The stream is pull-based: nothing is read from the connection until the
 * stream's consumer asks, so a slow consumer slows the peer down through TCP
 * flow control rather than buffering messages. It is a byte stream, so a
 * BYOB reader (`getReader({ mode: "byob" })`) gets the payload read straight
 * into its buffer.
 *
 * The stream ends when the peer closes the connection normally (close code
 * 1000, 1001, or none: 1005) between messages, the way
 * `for await (const message of conn)` ends. Any other close, a protocol
 * error, or a normal close in the middle of a message (its end was never
 * received) errors the stream with what the read rejected with.
 *
 * While the stream is in use it should be the connection's only reader: a
 * read of `conn` while the stream waits for a message fails with a
 * TypeError, and one between the stream's reads takes a message from it.
 * Cancelling the stream stops reading but leaves the connection open for
 * the caller to close; a wait for the next message that was under way is
 * aborted, which fails the connection's read side as any aborted read does.
 *
 * @param conn The connection to read.
 * @param terminator Appended after every message: a string (sent as UTF-8)
 * or bytes. Default: nothing.
 * @returns A byte stream of the messages and their terminators.
 * @throws {TypeError} When `terminator` is not a string or a Uint8Array.
 *
 * @example Read messages as lines
 * ```ts title="joinMessages"
 * import assert from "node:assert/strict";
 * import { Conn, MESSAGE_TYPE } from "@denows/websocket";
 * import { joinMessages } from "@denows/websocket/join";
 *
 * using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * const [serverSocket, clientSocket] = await Promise.all([
 *   listener.accept(),
 *   Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
 * ]);
 * const server = new Conn(serverSocket, { role: "server" });
 * const client = new Conn(clientSocket, { role: "client" });
 *
 * await client.writeMessage(MESSAGE_TYPE.Text, "first");
 * await client.writeMessage(MESSAGE_TYPE.Text, "second");
 * const closing = client.closeGracefully(1000, "", { timeout: 1000 });
 *
 * const text = await new Response(joinMessages(server, "\n")).text();
 * assert.equal(text, "first\nsecond\n");
 * await closing;
 * server.close();
 * ```
 */
export function joinMessages(
  conn: Conn,
  terminator: string | Uint8Array = "",
): ReadableStream<Uint8Array> {
  let term: Uint8Array;
  if (typeof terminator === "string") {
    term = encoder.encode(terminator);
  } else if (terminator instanceof Uint8Array) {
    term = terminator.slice(); // the caller may reuse its buffer
  } else {
    throw new TypeError(
      "Cannot join the messages: the terminator must be a string or a Uint8Array",
    );
  }
  const stopped = new AbortController();
  /** The message being read, or undefined between messages. */
  let message: MessageReader | undefined;
  /** Bytes of the terminator still to deliver after the current message. */
  let termLeft = 0;

  /** Fills `view` with the next bytes; 0 only at a normal close. */
  const fill = async (view: Uint8Array): Promise<number> => {
    while (true) {
      if (termLeft > 0) {
        const n = Math.min(termLeft, view.length);
        const start = term.length - termLeft;
        view.set(term.subarray(start, start + n));
        termLeft -= n;
        return n;
      }
      if (message === undefined) {
        try {
          message = (await conn.nextReader({ signal: stopped.signal })).reader;
        } catch (error) {
          if (endsStream(error)) return 0;
          throw error;
        }
      }
      const n = await message.read(view);
      if (n === null) {
        // A message may be empty, and so may the terminator: a pull must
        // deliver at least one byte unless the stream ends, so go on.
        message = undefined;
        termLeft = term.length;
      } else if (n > 0) {
        return n;
      }
    }
  };

  return new ReadableStream({
    type: "bytes",
    autoAllocateChunkSize: CHUNK_SIZE,
    async pull(controller) {
      // autoAllocateChunkSize gives every pull a request, BYOB or not.
      const request = controller.byobRequest!;
      const { buffer, byteOffset, byteLength } = request.view!;
      const n = await fill(new Uint8Array(buffer, byteOffset, byteLength));
      // After a cancel the request is void: the bytes read are dropped.
      if (stopped.signal.aborted) return;
      if (n === 0) {
        controller.close();
        request.respond(0);
      } else {
        request.respond(n);
      }
    },
    cancel(reason) {
      stopped.abort(reason);
    },
  });
}

/**
 * Whether a failed wait for the next message is the normal end of the
 * stream: the close codes `for await (const message of conn)` ends on.
 */
function endsStream(error: unknown): boolean {
  return isCloseError(
    error,
    CLOSE_CODE.NormalClosure,
    CLOSE_CODE.GoingAway,
    CLOSE_CODE.NoStatusReceived,
  );
}
