// Keepalive: a ping may serve "as a keepalive, or as a means to verify that
// the remote endpoint is still responsive" (RFC 6455 section 5.5.2). After
// `interval` ms in which nothing arrived, send a ping; when nothing arrives
// within `timeout` ms of it either, the peer is gone. Busy connections send
// no pings at all: their traffic already proves the peer alive.

/**
 * The text of the 1006 `CloseError` that reads reject with once a
 * keepalive ping went unanswered: how a wrapper tells this end from others.
 */
export const KEEPALIVE_EXPIRED =
  "the peer did not answer a keepalive ping in time";

/** What the keepalive watches and acts on: the Conn. */
export interface KeepaliveTarget {
  /** A count that moves whenever bytes arrive. */
  readonly arrivals: number;
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
  /** `arrivals` when last looked at. */
  #seen: number;
  #timer: ReturnType<typeof setTimeout> | undefined;
  // Made once: a connection's keepalive allocates nothing per tick.
  readonly #onIdle = () => this.#idle();
  readonly #onAnswer = () => this.#answer();

  constructor(target: KeepaliveTarget, interval: number, timeout: number) {
    this.#target = target;
    this.#interval = interval;
    this.#timeout = timeout;
    this.#seen = target.arrivals;
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
    const arrivals = this.#target.arrivals;
    if (arrivals === this.#seen) return false;
    this.#seen = arrivals;
    return true;
  }
}
