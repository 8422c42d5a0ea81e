// The per-connection settings the Upgrader and the Dialer hand to every Conn
// they make, checked once where they are given so that a mistake throws at
// construction, not at the first connection.

/** Read limit and keepalive, as `ConnOptions`, `UpgraderOptions` and `DialerOptions` spell them. */
export interface ConnSettings {
  readLimit?: number;
  pingInterval?: number;
  pongTimeout?: number;
}

/**
 * The read limit the Upgrader and the Dialer apply unless told otherwise:
 * Bun's, within the range peers use (ws allows 100 MiB). gorilla has none,
 * a known foot-gun: one message, or one decompression bomb, can take all
 * the memory there is.
 */
export const DEFAULT_READ_LIMIT = 16 * 1024 * 1024;

/**
 * Checks `settings`, naming `where` in the error.
 *
 * @throws {RangeError} `readLimit` is not a non-negative integer,
 * `pingInterval` not a finite number >= 0 or `pongTimeout` not a finite
 * number > 0.
 */
export function checkConnSettings(where: string, settings: ConnSettings): void {
  const { readLimit, pingInterval, pongTimeout } = settings;
  if (
    readLimit !== undefined &&
    (!Number.isSafeInteger(readLimit) || readLimit < 0)
  ) {
    throw new RangeError(
      `${where}: readLimit must be a non-negative integer, got ${readLimit}`,
    );
  }
  if (
    pingInterval !== undefined &&
    !(Number.isFinite(pingInterval) && pingInterval >= 0)
  ) {
    throw new RangeError(
      `${where}: pingInterval must be a finite number of milliseconds >= 0, got ${pingInterval}`,
    );
  }
  if (
    pongTimeout !== undefined &&
    !(Number.isFinite(pongTimeout) && pongTimeout > 0)
  ) {
    throw new RangeError(
      `${where}: pongTimeout must be a finite number of milliseconds > 0, got ${pongTimeout}`,
    );
  }
}

/** `settings` with the Upgrader's and the Dialer's default read limit. */
export function withDefaultReadLimit(settings: ConnSettings): ConnSettings {
  return {
    readLimit: settings.readLimit ?? DEFAULT_READ_LIMIT,
    pingInterval: settings.pingInterval,
    pongTimeout: settings.pongTimeout,
  };
}
