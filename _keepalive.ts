// Keepalive: a ping may serve "as a keepalive, or as a means to verify that
// the remote endpoint is still responsive" (RFC 6455 section 5.5.2). After
// `interval` ms in which nothing arrived, send a ping; when nothing arrives
// within `timeout` ms of it either, the peer is gone. Busy connections send
// no pings at all: their traffic already proves the peer alive.

/** What the keepalive watches and acts on: the Conn. */
export interface KeepaliveTarget {
  /** A count that moves whenever bytes arrive (the reader's reads begun). */
  readonly reads: number;
  /** Sends a ping; never rejects. */
  ping(): void;
  /** Nothing arrived within `timeout` of a ping. */
  expired(): void;
}

/** One connection's keepalive timer; `stop()` when the connection closes. */
export class Keepalive {
  readonly #target: KeepaliveTarget;
  readonly #interval: number;
  readonly #timeout: number;
  /** `reads` when last looked at. */
  #seen: number;
  #timer: ReturnType<typeof setTimeout> | undefined;
  // Made once: a connection's keepalive allocates nothing per tick.
  readonly #onIdle = () => this.#idle();
  readonly #onAnswer = () => this.#answer();

  constructor(target: KeepaliveTarget, interval: number, timeout: number) {
    this.#target = target;
    this.#interval = interval;
    this.#timeout = timeout;
    this.#seen = target.reads;
    this.#timer = setTimeout(this.#onIdle, interval);
  }

  stop(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
  }

  /** `interval` has passed: ping if it was silent. */
  #idle(): void {
    if (this.#moved()) {
      this.#timer = setTimeout(this.#onIdle, this.#interval);
      return;
    }
    this.#target.ping();
    this.#timer = setTimeout(this.#onAnswer, this.#timeout);
  }

  /** `timeout` has passed since the ping. */
  #answer(): void {
    if (this.#moved()) {
      this.#timer = setTimeout(this.#onIdle, this.#interval);
      return;
    }
    this.#timer = undefined;
    this.#target.expired();
  }

  #moved(): boolean {
    const reads = this.#target.reads;
    if (reads === this.#seen) return false;
    this.#seen = reads;
    return true;
  }
}
