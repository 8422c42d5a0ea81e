// The read side of a Conn: the read buffer, frame and message state, the
// fast path for a message that is buffered whole, and inflating compressed
// messages. Bytes go in through a transport; messages come out, and a close
// frame or a protocol error comes out as the error every later read rejects
// with. What it needs from the rest of the connection (writing a reply or a
// close frame, closing, corking writes) goes through ReaderHooks.

import {
  CLOSE_CODE,
  CloseError,
  type DataMessageType,
  type FrameHeader,
  isCloseError,
  MAX_CONTROL_PAYLOAD,
  MAX_HEADER_LENGTH,
  MESSAGE_TYPE,
  OPCODE,
  parseClosePayload,
  parseHeader,
  ProtocolError,
  ReadLimitError,
} from "./frame.ts";
import { Deadline, isAbort } from "./_deadline.ts";
import { maskInPlace } from "./_mask.ts";
import { Utf8Validator } from "./_utf8.ts";
import { InflateError } from "./_deflate_stream.ts";
import { InflaterSlot } from "./_deflate_context.ts";
import { COPY_LIMIT, FRAME_HEADROOM, headroomBuffers } from "./_writer.ts";
import { handBack, takePayloadBuffer } from "./_payload_pool.ts";

/**
 * A data message read from a `Conn`.
 *
 * Disposing it (`using`) hands the memory of a large payload back to the
 * library, which reads the next large message into it instead of into fresh
 * memory: a loop that moves large messages should dispose each one when it
 * is done with it. `data` is empty from then on (its buffer is detached).
 */
export interface Message extends Disposable {
  /** `MESSAGE_TYPE.Text` or `MESSAGE_TYPE.Binary`. */
  type: DataMessageType;
  /**
   * The payload; for text, valid UTF-8. It may be a view into a larger
   * buffer (`data.buffer` is then larger than the message); its bytes are
   * never overwritten while the message is not disposed.
   */
  data: Uint8Array;
}

/** The one Message shape every read returns. */
class ReadMessage implements Message {
  type: DataMessageType;
  data: Uint8Array;

  constructor(type: DataMessageType, data: Uint8Array) {
    this.type = type;
    this.data = data;
  }

  [Symbol.dispose](): void {
    handBack(this.data);
  }
}

/** Options of the read methods of `Conn`. */
export interface ReadOptions {
  /**
   * Aborts the wait. As with a read deadline, an aborted read leaves the
   * read side failed: every later read rejects with the same reason.
   */
  signal?: AbortSignal;
}

/** Streams the payload of one message, as `Conn.nextReader` gives it. */
export interface MessageReader {
  /**
   * Reads the next bytes of the message into `buffer`.
   *
   * @returns The number of bytes read, or `null` when the message is done.
   */
  read(buffer: Uint8Array): Promise<number | null>;
}

/** A message being read as a stream: its type and its reader. */
export interface NextReaderResult {
  /** The message type. */
  type: DataMessageType;
  /** The reader of its payload. */
  reader: MessageReader;
}

/** What a {@linkcode Reader} needs from its transport. */
export interface ReadTransport {
  read(buffer: Uint8Array): Promise<number | null>;
}

/** What the reader asks of the rest of the connection. */
export interface ReaderHooks {
  /** A ping or pong arrived: run its handler. */
  control(opcode: number, payload: Uint8Array): void | Promise<void>;
  /**
   * A close frame arrived; reads reject with its CloseError from now on.
   * Reply to it (RFC 6455 section 5.5.1) and run the close handler.
   */
  closeReceived(code: number, reason: string): void | Promise<void>;
  /** The peer broke the protocol: write the error's close frame, then close. */
  fail(error: ProtocolError): void;
  /** The transport died: close the connection. */
  close(): void;
  /**
   * A message was read with more whole frames behind it (`more`), or none:
   * answers written meanwhile may wait to leave in one write.
   */
  burst(more: boolean): void;
  /** The reader is about to wait for the transport: write what waited. */
  uncork(): void;
}

/** How the read side is set up. */
export interface ReaderOptions {
  /** Require unmasked frames (the client role); else masked ones. */
  client: boolean;
  /** Size of the read buffer while messages flow. */
  bufferSize: number;
  /** Bytes already read past the handshake; they are parsed first. */
  head?: Uint8Array;
  /** permessage-deflate was negotiated: RSV1 marks a compressed message. */
  compression: boolean;
  /** The peer may compress with context takeover (RFC 7692 section 7.1.1). */
  contextTakeover: boolean;
}

/**
 * Read buffer of an idle connection: its pending read holds only this much,
 * and it grows to the read buffer size once a read fills it. Room for a few
 * small messages (chat lines, pings); every idle connection pays it.
 */
const IDLE_READ_SIZE = 256;
/**
 * A lent read buffer is read on into only while this much is free: small
 * messages then share one buffer rather than each costing a new one.
 */
const MIN_TAIL = 64;
/** Largest piece a message payload is allocated in before it arrives. */
const MAX_CHUNK = 16 * 1024 * 1024;
/** First piece of a message payload allocated before its bytes arrive. */
const FIRST_CHUNK = 64 * 1024;
/**
 * Most compressed bytes gathered for one inflate call when a frame is not
 * buffered whole (the inflater slices them by the read limit anyway).
 */
const INFLATE_PIECE = 64 * 1024;
/** Validates text messages that arrive whole (see #tryWholeMessage). */
const wholeMessageUtf8 = new Utf8Validator();

/**
 * The one header object every connection parses into (made by parsing an
 * empty frame). It is only read synchronously after a parse (never across
 * an await), so sharing it keeps a per-connection object and key array off
 * every idle connection.
 */
const header: FrameHeader = parseHeader(new Uint8Array([0x82, 0]), 0)!;

/** The read view of a connection with nothing buffered. */
const EMPTY = new Uint8Array(0);

/** The read side of a connection (see the top of this file). */
export class Reader {
  readonly #transport: ReadTransport;
  readonly #hooks: ReaderHooks;
  readonly #client: boolean;
  readonly #compression: boolean;
  readonly #contextTakeover: boolean;
  #closed = false;
  #bufferSize: number;
  #rbuf: Uint8Array;
  #rpos = 0;
  #rend = 0;
  /** `#rbuf` up to `#rend`: what frame headers are parsed from. */
  #rview: Uint8Array;
  /** Messages were handed out as views of `#rbuf` (see #prepareFill). */
  #lent = false;
  /** Whether reads use the full read buffer (data is flowing). */
  #bigReads = false;
  /** More whole frames were buffered behind the last message read. */
  #burst = false;
  /** Payload bytes of the current data frame not yet consumed. */
  #remaining = 0;
  #frameFin = true;
  #frameMasked = false;
  /** Masking key of the current data frame (a server's only). */
  #frameKey: Uint8Array | undefined;
  #maskPos = 0;
  /** A fragmented message is open: the next data frame must continue it. */
  #messageOpen = false;
  /** The current message has unconsumed payload (or frames) left. */
  #messagePending = false;
  #messageType: DataMessageType = MESSAGE_TYPE.Binary;
  #messageLength = 0;
  #validating = false;
  #utf8: Utf8Validator | undefined;
  #readLimit = 0;
  #arrivals = 0;
  /** Made on first use: a Conn that never sets one pays nothing for it. */
  #readDeadline: Deadline | undefined;
  #reading = false;
  #readSignal: AbortSignal | undefined;
  #readErr: unknown;
  /** Waiting for the read in progress to end (made on first wait). */
  #readIdle: (() => void)[] | undefined;
  /** Waiting for the application to start its next read (made on first wait). */
  #readBegun: (() => void)[] | undefined;
  /** The application read a message and has not started the next read. */
  #handling = false;
  #draining: Promise<void> | undefined;
  #closeReceived = false;
  /** Counts messages begun, so a stale streaming reader can tell. */
  #messageSeq = 0;
  /** Created with the first compressed message received. */
  #inflaterSlot: InflaterSlot | undefined;
  /** The current message arrived with RSV1 set. */
  #messageCompressed = false;
  /** The current compressed message's last piece has been inflated. */
  #inflateDone = false;
  /** Inflated bytes a streaming reader has not taken yet, and its offset. */
  #inflated: Uint8Array[] | undefined;
  #inflatedPos = 0;
  /** Where the idle wait of #nextMessage is reading into. */
  #filling: Uint8Array = EMPTY;
  /**
   * That wait's handlers, made once per connection: each wait then costs
   * its promise and one reaction, and leaves no closures behind.
   */
  readonly #onFilled = (n: number | null) => this.#filled(n);
  readonly #onReadFailed = (error: unknown) =>
    this.#readFailed(this.#readError(error));

  constructor(
    transport: ReadTransport,
    options: ReaderOptions,
    hooks: ReaderHooks,
  ) {
    this.#transport = transport;
    this.#hooks = hooks;
    this.#client = options.client;
    this.#compression = options.compression;
    this.#contextTakeover = options.contextTakeover;
    this.#bufferSize = options.bufferSize;
    const head = options.head;
    if (head !== undefined && head.length > 0) {
      this.#rbuf = new Uint8Array(Math.max(head.length, IDLE_READ_SIZE));
      this.#rbuf.set(head);
      this.#rend = head.length;
    } else {
      this.#rbuf = new Uint8Array(Math.min(IDLE_READ_SIZE, this.#bufferSize));
    }
    this.#rview = this.#rbuf.subarray(0, this.#rend);
  }

  /**
   * Transport reads that returned bytes: the count moves exactly when
   * something arrives (the keepalive's sign of life).
   */
  get arrivals(): number {
    return this.#arrivals;
  }

  /** Why reads fail from now on (a CloseError once a close frame came). */
  get error(): unknown {
    return this.#readErr;
  }

  /** A close frame was received. */
  get closeReceived(): boolean {
    return this.#closeReceived;
  }

  /** A read is in progress. */
  get reading(): boolean {
    return this.#reading;
  }

  /** The application read a message and has not started the next read. */
  get handling(): boolean {
    return this.#handling;
  }

  /** Resolves when the application starts its next read (or on close). */
  nextReadBegun(): Promise<void> {
    return new Promise<void>((resolve) =>
      (this.#readBegun ??= []).push(resolve)
    );
  }

  /** Resolves when the read in progress ends. */
  idle(): Promise<void> {
    return new Promise<void>((resolve) =>
      (this.#readIdle ??= []).push(resolve)
    );
  }

  /** Sets the largest message accepted, in bytes (0: no limit). */
  setLimit(limit: number): void {
    this.#readLimit = limit;
  }

  /** Moves the read deadline (0: none). */
  setDeadline(at: number): void {
    if (at !== 0 || this.#readDeadline !== undefined) {
      (this.#readDeadline ??= new Deadline("read")).set(at);
    }
  }

  /** The connection closed: every later read rejects with `error`. */
  close(error: unknown): void {
    this.#closed = true;
    this.#readErr ??= error;
    this.#inflaterSlot?.release();
    wakeAll(this.#readBegun);
  }

  /**
   * Reads the next data message whole (see `Conn.readMessage`).
   *
   * Not an async function, and neither is the wait for bytes in
   * #nextMessage: an idle connection then holds its transport read and one
   * reaction to it, not a suspended call with its registers and await
   * closures (about half a KiB, measured in heap snapshots). The first such
   * wait outlives a young-generation collection, so what it holds would also
   * stay behind as old-space garbage once the first message arrived.
   */
  readMessage(signal: AbortSignal | undefined): Promise<Message> {
    if (this.#draining !== undefined) {
      return this.#draining.then(() => this.readMessage(signal));
    }
    try {
      this.#beginRead("read message", signal);
      return Promise.resolve(this.#nextMessage());
    } catch (error) {
      return Promise.reject(error);
    }
  }

  /**
   * Within a read begun by readMessage(): the message when the buffer holds
   * it whole, otherwise the promise of it. Either way the read ends with it,
   * and a failure fails the connection where it must.
   */
  #nextMessage(): Message | Promise<Message> {
    try {
      if (!this.#messagePending) {
        const fast = this.#tryWholeMessage();
        if (fast !== undefined) {
          // More frames wait in the buffer: answers to them can share a write.
          this.#burst = this.#wholeFrameBuffered();
          this.#hooks.burst(this.#burst);
          this.#handling = true;
          this.#endRead();
          return fast;
        }
        // An idle connection waits right here (see readMessage).
        if (this.#rpos === this.#rend) {
          this.#filling = this.#prepareFill(MAX_HEADER_LENGTH);
          return this.#startRead(this.#filling).then(
            this.#onFilled,
            this.#onReadFailed,
          );
        }
      }
    } catch (error) {
      this.#readFailed(error);
    }
    return this.#readMessageSlowly();
  }

  /** `n` bytes arrived for the idle wait of #nextMessage. */
  #filled(n: number | null): Message | Promise<Message> {
    const space = this.#filling;
    this.#filling = EMPTY;
    if (n === null) this.#readFailed(unexpectedEOF());
    this.#arrivals++;
    this.#commitFill(space, n);
    return this.#nextMessage();
  }

  /** Ends the read of #nextMessage with `error`. */
  #readFailed(error: unknown): never {
    this.#endRead();
    throw this.#failRead(error);
  }

  /**
   * The rest of readMessage() once a frame header is buffered: a message
   * that is fragmented, compressed, large, or not all here yet.
   */
  async #readMessageSlowly(): Promise<Message> {
    try {
      await this.#startMessage();
      const type = this.#messageType;
      // Payload is allocated as it arrives, in pieces that start at
      // FIRST_CHUNK and grow with what was received (up to MAX_CHUNK), so
      // a header that merely claims a huge length costs little until the
      // bytes really come. Under a read limit the application accepted
      // messages of that size, so a frame within it is allocated at once
      // (and a single-frame message is returned without a copy). Small
      // frames fill the free end of the last piece: a message of many tiny
      // fragments costs about its payload, not an object per fragment.
      const payload = new PayloadBuilder();
      const atOnce = Math.max(FIRST_CHUNK, this.#readLimit);
      // A compressed message is inflated as its payload arrives: neither its
      // compressed nor its inflated bytes are held beyond the read limit.
      while (this.#messageCompressed && !this.#inflateDone) {
        if (this.#remaining === 0 && !this.#frameFin) {
          await this.#nextDataFrame();
          continue;
        }
        for (const chunk of await this.#inflateNext()) payload.add(chunk);
      }
      // A large unfragmented message, the common case, skips the pieces:
      // one buffer of its size, with room for an echo's header in front.
      if (
        !this.#messageCompressed && this.#frameFin &&
        this.#remaining >= COPY_LIMIT && this.#remaining <= MAX_CHUNK
      ) {
        const data = await this.#readFramePayload();
        this.#messagePending = false;
        this.#handling = true;
        return new ReadMessage(type, data);
      }
      while (!this.#messageCompressed) {
        while (this.#remaining > 0) {
          const total = payload.total;
          const space = payload.space(
            Math.min(
              Math.max(this.#remaining, total),
              Math.max(atOnce, total),
              MAX_CHUNK,
            ),
          );
          const n = Math.min(space.length, this.#remaining);
          await this.#readPayloadInto(space.subarray(0, n));
          payload.commit(n);
        }
        if (this.#frameFin) break;
        await this.#nextDataFrame();
      }
      this.#messagePending = false;
      this.#handling = true;
      return new ReadMessage(type, payload.result());
    } catch (error) {
      throw this.#failRead(error);
    } finally {
      this.#endRead();
    }
  }

  /** Starts reading the next data message as a stream (see `Conn.nextReader`). */
  async nextReader(signal: AbortSignal | undefined): Promise<NextReaderResult> {
    if (this.#draining !== undefined) await this.#draining;
    this.#beginRead("start reader", signal);
    try {
      await this.#startMessage();
    } catch (error) {
      throw this.#failRead(error);
    } finally {
      this.#endRead();
    }
    const seq = this.#messageSeq;
    return {
      type: this.#messageType,
      reader: { read: (buffer) => this.#readStream(seq, buffer) },
    };
  }

  /** Reads and discards messages until the read side fails (a close frame). */
  drain(): Promise<void> {
    if (this.#draining === undefined) {
      this.#reading = true;
      this.#draining = (async () => {
        try {
          while (true) await this.#startMessage();
        } catch (error) {
          this.#failRead(error);
        } finally {
          this.#draining = undefined;
          this.#endRead();
        }
      })();
    }
    return this.#draining;
  }

  #beginRead(
    action: string,
    signal: AbortSignal | undefined,
    nextMessage = true,
  ): void {
    if (this.#reading) {
      throw new TypeError(`Cannot ${action}: another read is in progress`);
    }
    if (nextMessage && this.#handling) {
      // The application is done with the message it read.
      this.#handling = false;
      wakeAll(this.#readBegun);
    }
    if (this.#readErr !== undefined) throw this.#readErr;
    if (signal?.aborted) throw signal.reason;
    this.#reading = true;
    this.#readSignal = signal;
  }

  #endRead(): void {
    this.#reading = false;
    this.#readSignal = undefined;
    wakeAll(this.#readIdle);
  }

  /**
   * Fast path: a whole unfragmented data frame already buffered is read
   * without a single await. Returns undefined to take the general path.
   */
  #tryWholeMessage(): Message | undefined {
    const buf = this.#rview;
    const h = parseHeader(buf, this.#rpos, header);
    if (
      h === null || !h.fin || h.rsv1 || (h.opcode !== 1 && h.opcode !== 2)
    ) return undefined;
    const total = h.headerLength + h.length;
    if (
      this.#rend - this.#rpos < total || this.#headerProblem(h) !== undefined ||
      (this.#readLimit > 0 && h.length > this.#readLimit)
    ) return undefined;
    const start = this.#rpos + h.headerLength;
    const payload = buf.subarray(start, start + h.length);
    if (h.masked) maskInPlace(payload, h.maskKey, 0);
    this.#rpos += total;
    this.#messageSeq++;
    // A whole message leaves no decoder state behind, so one validator
    // serves every connection and an idle one keeps none.
    if (
      h.opcode === MESSAGE_TYPE.Text && !wholeMessageUtf8.push(payload, true)
    ) {
      throw invalidUtf8();
    }
    // A view, not a copy: allocating a small typed array costs ~0.4 us in
    // Deno, more than the rest of this path. The read buffer is then lent
    // and never overwritten (see #prepareFill).
    this.#lent = true;
    return new ReadMessage(h.opcode, payload);
  }

  /** Whether a whole frame waits in the buffer (never throws). */
  #wholeFrameBuffered(): boolean {
    const available = this.#rend - this.#rpos;
    if (available < 2) return false;
    try {
      const h = parseHeader(this.#rview, this.#rpos, header);
      return h !== null && h.headerLength + h.length <= available;
    } catch {
      return false; // a bad length: the next read reports it
    }
  }

  /**
   * Moves to the first frame of the next data message, discarding what is
   * left of the current one.
   */
  async #startMessage(): Promise<void> {
    if (this.#messagePending && this.#messageCompressed) this.#dropInflated();
    while (this.#messagePending) {
      if (this.#remaining > 0) await this.#skipPayload();
      else if (this.#frameFin) this.#messagePending = false;
      else await this.#nextDataFrame();
    }
    await this.#nextDataFrame();
    this.#messagePending = true;
    this.#messageSeq++;
  }

  /**
   * Reads frame headers, handling control frames on the way, until the
   * header of a data frame that is legal here; it becomes the current frame.
   */
  async #nextDataFrame(): Promise<void> {
    while (true) {
      let h = parseHeader(this.#rview, this.#rpos, header);
      while (h === null) {
        await this.#fill(MAX_HEADER_LENGTH);
        h = parseHeader(this.#rview, this.#rpos, header);
      }
      const problem = this.#headerProblem(h);
      if (problem !== undefined) {
        throw new ProtocolError(problem, CLOSE_CODE.ProtocolError);
      }
      if (h.opcode >= 8) {
        const total = h.headerLength + h.length;
        if (this.#rend - this.#rpos < total) {
          // Parsed again after the wait: the shared header may change.
          await this.#fill(total);
          continue;
        }
        const start = this.#rpos + h.headerLength;
        const payload = this.#rbuf.slice(start, start + h.length);
        this.#rpos += total;
        if (h.masked) maskInPlace(payload, h.maskKey, 0);
        await this.#handleControl(h.opcode, payload);
        continue;
      }
      const length = h.length;
      const continuation = h.opcode === OPCODE.Continuation;
      const before = continuation ? this.#messageLength : 0;
      // A compressed message is bounded by its inflated size instead, which
      // is what the application cares about (a bomb is small on the wire);
      // its compressed bytes are inflated as they arrive, never held whole.
      if (
        this.#readLimit > 0 && before + length > this.#readLimit &&
        !(continuation ? this.#messageCompressed : h.rsv1)
      ) {
        throw new ReadLimitError(this.#readLimit);
      }
      this.#rpos += h.headerLength;
      if (h.opcode !== OPCODE.Continuation) {
        this.#messageType = h.opcode as DataMessageType;
        this.#messageLength = 0;
        // A compressed message's text is validated once inflated.
        this.#messageCompressed = h.rsv1;
        this.#inflateDone = false;
        this.#validating = h.opcode === MESSAGE_TYPE.Text && !h.rsv1;
        if (h.opcode === MESSAGE_TYPE.Text) this.#utf8 ??= new Utf8Validator();
      }
      this.#messageLength += length;
      this.#remaining = length;
      this.#frameFin = h.fin;
      this.#messageOpen = !h.fin;
      this.#frameMasked = h.masked;
      if (h.masked) (this.#frameKey ??= new Uint8Array(4)).set(h.maskKey);
      this.#maskPos = 0;
      if (length === 0 && this.#validating && h.fin) {
        this.#checkUtf8(new Uint8Array(0));
      }
      return;
    }
  }

  /** Every problem of a header, joined into one close reason, or undefined. */
  #headerProblem(h: FrameHeader): string | undefined {
    if (this.#headerIsLegal(h)) return undefined;
    const problems: string[] = [];
    const add = (problem: string) => problems.push(problem);
    const opcode = h.opcode;
    // RFC 7692 section 6: RSV1 marks a compressed message on its first frame
    // only, and only once permessage-deflate was negotiated.
    if (h.rsv1) {
      if (!this.#compression) {
        add("RSV1 set with no extension negotiated");
      } else if (opcode >= 8) {
        add("RSV1 set on a control frame");
      } else if (opcode === OPCODE.Continuation) {
        add("RSV1 set on a continuation frame");
      }
    }
    if (h.rsv2) add("RSV2 set");
    if (h.rsv3) add("RSV3 set");
    if ((opcode > 2 && opcode < 8) || opcode > 10) {
      add(`reserved opcode ${opcode}`);
    } else if (opcode >= 8) {
      if (!h.fin) add("fragmented control frame");
      if (h.length > MAX_CONTROL_PAYLOAD) {
        add(`control frame payload of ${h.length} bytes`);
      }
    } else if (opcode === OPCODE.Continuation) {
      if (!this.#messageOpen) add("continuation frame with no message open");
    } else if (this.#messageOpen) {
      add("new data frame while a fragmented message is open");
    }
    if (h.masked === this.#client) {
      add(
        this.#client
          ? "masked frame from server"
          : "unmasked frame from client",
      );
    }
    return `Invalid frame: ${problems.join(", ")}`;
  }

  /** The common case of {@linkcode Reader.#headerProblem}, without allocating. */
  #headerIsLegal(h: FrameHeader): boolean {
    if (h.rsv2 || h.rsv3 || h.masked === this.#client) return false;
    const opcode = h.opcode;
    if (opcode === OPCODE.Text || opcode === OPCODE.Binary) {
      return !this.#messageOpen && (!h.rsv1 || this.#compression);
    }
    if (h.rsv1) return false;
    if (opcode === OPCODE.Continuation) return this.#messageOpen;
    return opcode >= 8 && opcode <= 10 && h.fin &&
      h.length <= MAX_CONTROL_PAYLOAD;
  }

  async #handleControl(opcode: number, payload: Uint8Array): Promise<void> {
    if (opcode !== OPCODE.Close) {
      const result = this.#hooks.control(opcode, payload);
      if (result) await result;
      return;
    }
    const { code, reason } = parseClosePayload(payload);
    this.#closeReceived = true;
    // The read side is over from here, even if the reply gets the
    // transport closed before the hook returns.
    const closeError = new CloseError(code, reason);
    this.#readErr = closeError;
    const result = this.#hooks.closeReceived(code, reason);
    if (result) await result;
    throw closeError;
  }

  /** Unmasks and validates payload bytes just consumed from the current frame. */
  #consume(chunk: Uint8Array): void {
    this.#remaining -= chunk.length;
    if (this.#frameMasked) {
      this.#maskPos = maskInPlace(chunk, this.#frameKey!, this.#maskPos);
    }
    if (this.#validating) this.#checkUtf8(chunk);
  }

  #checkUtf8(chunk: Uint8Array): void {
    const final = this.#remaining === 0 && this.#frameFin;
    if (!this.#utf8!.push(chunk, final)) throw invalidUtf8();
  }

  /** Fills `dest` (at most the frame's remaining bytes) with payload. */
  async #readPayloadInto(dest: Uint8Array): Promise<void> {
    let filled = 0;
    while (filled < dest.length) {
      let n = this.#rend - this.#rpos;
      if (n > 0) {
        n = Math.min(n, dest.length - filled);
        dest.set(this.#rbuf.subarray(this.#rpos, this.#rpos + n), filled);
        this.#rpos += n;
      } else if (dest.length - filled >= this.#bufferSize) {
        // Large payloads are read straight into their destination.
        const got = await this.#transportRead(dest.subarray(filled));
        n = got;
      } else {
        await this.#fill(1);
        continue;
      }
      this.#consume(dest.subarray(filled, filled + n));
      filled += n;
    }
  }

  /**
   * Reads the payload of a single-frame message into one buffer with
   * FRAME_HEADROOM free bytes in front, straight from the transport where it
   * is large, and returns the payload's view: no pieces to join. Allocating
   * the whole frame before its bytes arrive is safe up to MAX_CHUNK because
   * large buffers are committed lazily (calloc'd pages become resident only
   * when written), so a header that merely claims a big length costs
   * address space, not memory. A buffer handed back by disposing an
   * earlier message is reused instead where one fits (see _payload_pool.ts).
   */
  async #readFramePayload(): Promise<Uint8Array> {
    const length = this.#remaining;
    const buffer = takePayloadBuffer(FRAME_HEADROOM + length);
    const data = new Uint8Array(buffer, FRAME_HEADROOM, length);
    await this.#readPayloadInto(data);
    headroomBuffers.add(buffer);
    return data;
  }

  /** Consumes the rest of the current frame's payload without keeping it. */
  async #skipPayload(): Promise<void> {
    while (this.#remaining > 0) {
      if (this.#rend === this.#rpos) await this.#fill(1);
      const n = Math.min(this.#rend - this.#rpos, this.#remaining);
      const chunk = this.#rbuf.subarray(this.#rpos, this.#rpos + n);
      this.#rpos += n;
      this.#consume(chunk);
    }
  }

  /** One streaming read of message `seq` into `buffer`. */
  async #readStream(seq: number, buffer: Uint8Array): Promise<number | null> {
    if (seq !== this.#messageSeq || !this.#messagePending) {
      if (seq !== this.#messageSeq) {
        throw new TypeError(
          "Cannot read message: a newer message was started",
        );
      }
      return null;
    }
    this.#beginRead("read message", undefined, false);
    try {
      if (this.#messageCompressed) return await this.#readInflated(buffer);
      while (this.#remaining === 0) {
        if (this.#frameFin) {
          this.#messagePending = false;
          return null;
        }
        await this.#nextDataFrame();
      }
      if (buffer.length === 0) return 0;
      const dest = buffer.subarray(0, Math.min(buffer.length, this.#remaining));
      if (this.#rend === this.#rpos && dest.length < this.#bufferSize) {
        await this.#fill(1);
      }
      let n = this.#rend - this.#rpos;
      if (n > 0) {
        n = Math.min(n, dest.length);
        dest.set(this.#rbuf.subarray(this.#rpos, this.#rpos + n));
        this.#rpos += n;
      } else {
        n = await this.#transportRead(dest);
      }
      this.#consume(dest.subarray(0, n));
      if (this.#remaining === 0 && this.#frameFin) this.#messagePending = false;
      return n;
    } catch (error) {
      throw this.#failRead(error);
    } finally {
      this.#endRead();
    }
  }

  /** One streaming read of a compressed message: inflated bytes. */
  async #readInflated(buffer: Uint8Array): Promise<number | null> {
    while (true) {
      const queue = this.#inflated;
      if (queue !== undefined && queue.length > 0) {
        if (buffer.length === 0) return 0;
        const chunk = queue[0];
        const from = this.#inflatedPos;
        const n = Math.min(buffer.length, chunk.length - from);
        buffer.set(chunk.subarray(from, from + n));
        if (from + n < chunk.length) {
          this.#inflatedPos = from + n;
        } else {
          queue.shift();
          this.#inflatedPos = 0;
          if (queue.length === 0 && this.#inflateDone) this.#dropInflated();
        }
        return n;
      }
      if (this.#inflateDone) {
        this.#dropInflated();
        return null;
      }
      if (this.#remaining === 0 && !this.#frameFin) {
        await this.#nextDataFrame();
        continue;
      }
      const chunks = await this.#inflateNext();
      if (chunks.length > 0) (this.#inflated ??= []).push(...chunks);
    }
  }

  /**
   * Inflates the next piece of the current compressed message, unmasked:
   * the rest of the current frame when the read buffer holds it, otherwise
   * up to INFLATE_PIECE bytes of it gathered first (one inflate call per
   * frame is much cheaper than one per read: each call costs a few stream
   * writes), or nothing at the end of a frame. Returns the inflated chunks
   * (the caller owns them), text already checked as UTF-8.
   */
  async #inflateNext(): Promise<Uint8Array[]> {
    let piece: Uint8Array = EMPTY;
    if (this.#remaining > 0) {
      if (this.#rend - this.#rpos >= this.#remaining) {
        // A view of the read buffer: nothing reads into it until the
        // inflate below is over, and the inflater is done with it by then.
        piece = this.#rbuf.subarray(this.#rpos, this.#rpos + this.#remaining);
        this.#rpos += piece.length;
        this.#consume(piece);
      } else {
        piece = new Uint8Array(Math.min(this.#remaining, INFLATE_PIECE));
        await this.#readPayloadInto(piece);
      }
    }
    const final = this.#remaining === 0 && this.#frameFin;
    const limit = this.#readLimit === 0 ? Infinity : this.#readLimit;
    const slot = this.#inflaterSlot ??= new InflaterSlot(this.#contextTakeover);
    let chunks: Uint8Array[];
    try {
      chunks = await slot.inflate(piece, final, limit);
    } catch (error) {
      if (!(error instanceof InflateError)) throw error;
      // Either way the peer sent something we must refuse (RFC 6455 section
      // 7.4.1): 1009 past the read limit, 1007 for data that is not DEFLATE.
      if (error.code === CLOSE_CODE.MessageTooBig) {
        throw new ReadLimitError(this.#readLimit, { cause: error });
      }
      throw new ProtocolError(
        "Invalid compressed message: the payload is not a valid DEFLATE stream",
        CLOSE_CODE.InvalidFramePayloadData,
        { cause: error },
      );
    }
    if (final) this.#inflateDone = true;
    if (this.#messageType === MESSAGE_TYPE.Text) {
      const utf8 = this.#utf8!;
      for (const chunk of chunks) {
        if (!utf8.push(chunk, false)) throw invalidUtf8();
      }
      if (final && !utf8.push(EMPTY, true)) throw invalidUtf8();
    }
    return chunks;
  }

  /**
   * Forgets the current compressed message's inflated bytes; when it is
   * abandoned part-way, resets the inflater and the UTF-8 state too.
   */
  #dropInflated(): void {
    this.#inflated = undefined;
    this.#inflatedPos = 0;
    if (!this.#inflateDone) {
      this.#inflaterSlot?.release();
      this.#utf8?.reset();
      this.#inflateDone = true;
    }
    this.#messagePending = this.#remaining > 0 || !this.#frameFin;
  }

  /**
   * Reads once from the transport into the read buffer, first making room
   * for `need` unparsed bytes in total. Only a partial header or control
   * frame is ever left unparsed (payload is consumed as it comes), so the
   * bytes moved here are few. An idle connection reads into a small buffer
   * (its pending read holds just that); a read that fills the buffer makes
   * the next one full size, and a short read makes it small again.
   */
  async #fill(need: number): Promise<void> {
    const space = this.#prepareFill(need);
    this.#commitFill(space, await this.#transportRead(space));
  }

  /** The synchronous first half of {@linkcode Reader.#fill}: where to read. */
  #prepareFill(need: number): Uint8Array {
    if (this.#burst) {
      this.#burst = false;
      this.#hooks.uncork();
    }
    const pending = this.#rend - this.#rpos;
    const size = Math.max(
      need,
      this.#bigReads
        ? this.#bufferSize
        : Math.min(IDLE_READ_SIZE, this.#bufferSize),
    );
    let buf = this.#rbuf;
    if (this.#lent) {
      // The application holds views of bytes before #rpos: never move or
      // overwrite them. Read on into the free tail while it is roomy,
      // otherwise into a fresh buffer.
      if (
        buf.length !== size || buf.length - this.#rpos < need ||
        buf.length - this.#rend < MIN_TAIL
      ) {
        buf = new Uint8Array(size);
        buf.set(this.#rbuf.subarray(this.#rpos, this.#rend));
        this.#rbuf = buf;
        this.#rpos = 0;
        this.#rend = pending;
        this.#lent = false;
      }
    } else if (pending === 0) {
      this.#rpos = this.#rend = 0;
      if (buf.length !== size) buf = this.#rbuf = new Uint8Array(size);
    } else if (buf.length === this.#rend || buf.length - this.#rpos < need) {
      if (buf.length >= size) {
        buf.copyWithin(0, this.#rpos, this.#rend);
      } else {
        buf = new Uint8Array(size);
        buf.set(this.#rbuf.subarray(this.#rpos, this.#rend));
        this.#rbuf = buf;
      }
      this.#rpos = 0;
      this.#rend = pending;
    }
    if (pending === 0) this.#rview = EMPTY;
    return this.#rend === 0 ? buf : buf.subarray(this.#rend);
  }

  /** The second half of {@linkcode Reader.#fill}: `n` bytes arrived in `space`. */
  #commitFill(space: Uint8Array, n: number): void {
    this.#rend += n;
    this.#rview = this.#rbuf.subarray(0, this.#rend);
    if (n === space.length && n >= IDLE_READ_SIZE) this.#bigReads = true;
    else if (n < IDLE_READ_SIZE / 2) this.#bigReads = false;
  }

  /**
   * Starts one transport read, bounded by the read deadline and signal.
   * Not an async function: the idle wait of #nextMessage chains on it
   * directly, so an idle connection keeps no suspended call.
   */
  #startRead(buffer: Uint8Array): Promise<number | null> {
    const read = this.#transport.read(buffer);
    if (this.#readDeadline === undefined && this.#readSignal === undefined) {
      return read;
    }
    return (this.#readDeadline ??= new Deadline("read"))
      .bound(read, this.#readSignal);
  }

  /** One transport read; EOF and transport failures become errors. */
  async #transportRead(buffer: Uint8Array): Promise<number> {
    let n: number | null;
    try {
      n = await this.#startRead(buffer);
    } catch (error) {
      throw this.#readError(error);
    }
    if (n === null) throw unexpectedEOF();
    this.#arrivals++;
    return n;
  }

  /** Maps a failed transport read to what the read rejects with. */
  #readError(error: unknown): unknown {
    if (
      error instanceof Deno.errors.TimedOut || isAbort(error, this.#readSignal)
    ) {
      return error;
    }
    if (this.#closed) return this.#readErr;
    return new CloseError(
      CLOSE_CODE.AbnormalClosure,
      `transport read failed: ${(error as Error)?.message ?? error}`,
      { cause: error },
    );
  }

  /**
   * Makes a read error sticky and reacts to it: a protocol error sends its
   * close frame and closes the transport; a dead transport is closed.
   */
  #failRead(error: unknown): unknown {
    if (this.#readErr !== undefined) return this.#readErr;
    this.#readErr = error;
    if (error instanceof ProtocolError) {
      this.#hooks.fail(error);
    } else if (
      error instanceof CloseError && error.code === CLOSE_CODE.AbnormalClosure
    ) {
      this.#hooks.close();
    }
    return error;
  }
}

/** Wakes and forgets every waiter of a list. */
function wakeAll(waiters: (() => void)[] | undefined): void {
  if (waiters === undefined || waiters.length === 0) return;
  for (const wake of waiters.splice(0)) wake();
}

function unexpectedEOF(): CloseError {
  return new CloseError(CLOSE_CODE.AbnormalClosure, "unexpected EOF");
}

function invalidUtf8(): ProtocolError {
  return new ProtocolError(
    "Invalid text message: the payload is not valid UTF-8",
    CLOSE_CODE.InvalidFramePayloadData,
  );
}

/** Settles an iteration step from a read message. */
function nextResult(value: Message): IteratorResult<Message> {
  return { value, done: false };
}

/** Ends the iteration on a normal close; anything else is thrown. */
function endOnNormalClose(error: unknown): IteratorResult<Message> {
  if (
    isCloseError(
      error,
      CLOSE_CODE.NormalClosure,
      CLOSE_CODE.GoingAway,
      CLOSE_CODE.NoStatusReceived,
    )
  ) return { value: undefined, done: true };
  throw error;
}

/**
 * The iterator behind `for await (const message of conn)`: a plain object
 * rather than an async generator, which would keep a suspended frame per
 * idle connection.
 */
export class MessageIterator implements AsyncIterator<Message> {
  #reader: Reader;

  constructor(reader: Reader) {
    this.#reader = reader;
  }

  next(): Promise<IteratorResult<Message>> {
    return this.#reader.readMessage(undefined).then(
      nextResult,
      endOnNormalClose,
    );
  }
}

/**
 * Collects the payload of a message read whole: pieces are filled (or
 * copied) into the free end of the last one, and a new one, at least as
 * large as everything so far, is made only when it is full. So a message of
 * n tiny fragments costs O(log n) arrays and at most twice its size, and a
 * message that fits one piece is returned without a copy.
 */
class PayloadBuilder {
  #done: Uint8Array[] = [];
  #tail: Uint8Array = EMPTY;
  #used = 0;
  /** Bytes collected so far. */
  total = 0;

  /** The free end of the last piece, or a new piece of `size` bytes. */
  space(size: number): Uint8Array {
    if (this.#used === this.#tail.length) {
      this.#seal();
      this.#tail = new Uint8Array(size);
      this.#used = 0;
    }
    return this.#tail.subarray(this.#used);
  }

  /** Records that `n` bytes were written into what space() returned. */
  commit(n: number): void {
    this.#used += n;
    this.total += n;
  }

  /** Appends an owned chunk: kept as it is when large, copied when small. */
  add(chunk: Uint8Array): void {
    const length = chunk.length;
    if (length <= this.#tail.length - this.#used) {
      this.#tail.set(chunk, this.#used);
    } else {
      this.#seal();
      if (this.total === 0 || length >= COPY_LIMIT) {
        this.#tail = chunk;
      } else {
        this.#tail = new Uint8Array(
          Math.min(Math.max(length, this.total), MAX_CHUNK),
        );
        this.#tail.set(chunk);
      }
      this.#used = 0;
    }
    this.#used += length;
    this.total += length;
  }

  #seal(): void {
    if (this.#used === 0) return;
    this.#done.push(
      this.#used === this.#tail.length
        ? this.#tail
        : this.#tail.subarray(0, this.#used),
    );
  }

  /** The whole payload in one array. */
  result(): Uint8Array {
    if (this.#done.length === 0) {
      return this.#used === this.#tail.length
        ? this.#tail
        : this.#tail.slice(0, this.#used);
    }
    this.#seal();
    const data = new Uint8Array(this.total);
    let offset = 0;
    for (const piece of this.#done) {
      data.set(piece, offset);
      offset += piece.length;
    }
    return data;
  }
}
