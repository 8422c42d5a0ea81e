// Racing an operation against a time or a signal, the one way the library
// does it. `Deadline` is the deadline of one side of a Conn (reading or
// writing), with the meaning of Go's net.Conn deadlines that gorilla passes
// on: it bounds the operation in flight as well as later ones, so moving it
// while a read waits (or setting it to now, to wake a blocked reader) takes
// effect at once. `TimeoutSignal` and `abortable` bound the steps of a
// handshake.

const noop = () => {};

/** Bounds transport operations of one side by a movable deadline. */
export class Deadline {
  readonly #action: string;
  /** Milliseconds since the epoch; 0: none. */
  #at = 0;
  #timer: ReturnType<typeof setTimeout> | undefined;
  /** Rejects the operation in flight; undefined when none is. */
  #fail: ((error: Error) => void) | undefined;

  /** @param action What the side does ("read", "write"), for the error. */
  constructor(action: string) {
    this.#action = action;
  }

  /** Moves the deadline (0: none); the operation in flight sees it too. */
  set(at: number): void {
    this.#at = at;
    if (this.#fail !== undefined) this.#arm();
  }

  /**
   * Settles like `operation` unless the deadline passes (rejecting with
   * `Deno.errors.TimedOut`) or `signal` aborts first. The loser is still
   * observed, so its later rejection is never unhandled. One operation at a
   * time: the side's own code never overlaps them.
   */
  bound<T>(operation: Promise<T>, signal?: AbortSignal): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      if (signal?.aborted) {
        operation.catch(noop);
        reject(signal.reason);
        return;
      }
      const finish = () => {
        if (this.#fail !== fail) return;
        this.#fail = undefined;
        this.#arm();
        signal?.removeEventListener("abort", onAbort);
      };
      const fail = (error: Error) => {
        finish();
        reject(error);
      };
      const onAbort = () => fail(signal!.reason);
      this.#fail = fail;
      this.#arm();
      signal?.addEventListener("abort", onAbort, { once: true });
      operation.then((value) => {
        finish();
        resolve(value);
      }, fail);
    });
  }

  /** (Re)starts the timer for the operation in flight, if there is one. */
  #arm(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    const fail = this.#fail;
    if (fail === undefined || this.#at === 0) return;
    const action = this.#action;
    this.#timer = setTimeout(
      () =>
        fail(
          new Deno.errors.TimedOut(
            `Cannot ${action}: the ${action} deadline passed`,
          ),
        ),
      Math.max(0, this.#at - Date.now()),
    );
  }
}

/**
 * Milliseconds since the epoch of a deadline given as a `Date`, 0 for `null`
 * (none).
 *
 * @throws {TypeError} `time` is neither a valid `Date` nor `null`.
 */
export function deadlineTime(time: Date | null, action: string): number {
  if (time === null) return 0;
  if (!(time instanceof Date) || Number.isNaN(time.getTime())) {
    throw new TypeError(`Cannot ${action}: expected a valid Date or null`);
  }
  return Math.max(time.getTime(), 1);
}

/** Whether `error` is the reason `signal` aborted with. */
export function isAbort(
  error: unknown,
  signal: AbortSignal | undefined,
): boolean {
  return signal !== undefined && signal.aborted && error === signal.reason;
}

/**
 * A signal that aborts with its parent's reason, or with
 * `Deno.errors.TimedOut` once `timeoutMs` (0: never) has passed: one signal
 * bounds every step of a multi-step operation such as a handshake.
 */
export class TimeoutSignal {
  readonly #controller = new AbortController();
  readonly #parent: AbortSignal | undefined;
  readonly #onParentAbort = () => this.#controller.abort(this.#parent!.reason);
  #timer: ReturnType<typeof setTimeout> | undefined;

  /** @param timeoutMessage The `TimedOut` error's message. */
  constructor(
    timeoutMs: number,
    parent: AbortSignal | undefined,
    timeoutMessage: string,
  ) {
    this.#parent = parent;
    if (parent?.aborted) {
      this.#controller.abort(parent.reason);
      return;
    }
    parent?.addEventListener("abort", this.#onParentAbort, { once: true });
    if (timeoutMs > 0) {
      this.#timer = setTimeout(
        () => this.#controller.abort(new Deno.errors.TimedOut(timeoutMessage)),
        timeoutMs,
      );
    }
  }

  get signal(): AbortSignal {
    return this.#controller.signal;
  }

  /** Stops the timer and lets go of the parent. */
  clear(): void {
    clearTimeout(this.#timer);
    this.#parent?.removeEventListener("abort", this.#onParentAbort);
  }
}

/**
 * Settles with `promise`, or rejects with the signal's reason as soon as it
 * aborts. The promise is still observed afterwards, so it never rejects
 * unhandled.
 */
export function abortable<T>(
  promise: Promise<T>,
  signal: AbortSignal,
): Promise<T> {
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    if (signal.aborted) onAbort();
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(resolve, reject).finally(() =>
      signal.removeEventListener("abort", onAbort)
    );
  });
}
