// The per-connection settings the Upgrader and the Dialer hand to every Conn
// they make, checked once where they are given so that a mistake throws at
// construction, not at the first connection.

import {
  MAX_COMPRESSION_LEVEL,
  MIN_COMPRESSION_LEVEL,
} from "./_deflate_stream.ts";

/**
 * Read limit, keepalive and compression level, as `ConnOptions`,
 * `UpgraderOptions` and `DialerOptions` spell them.
 */
export interface ConnSettings {
  readLimit?: number;
  pingInterval?: number;
  pongTimeout?: number;
  compressionLevel?: number;
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
 * `pingInterval` not a finite number >= 0, `pongTimeout` not a finite
 * number > 0, or `compressionLevel` not an integer from -2 to 9.
 */
export function checkConnSettings(where: string, settings: ConnSettings): void {
  const { readLimit, pingInterval, pongTimeout, compressionLevel } = settings;
  if (compressionLevel !== undefined) {
    checkCompressionLevel(where, compressionLevel);
  }
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

/**
 * Checks a compression level: gorilla's range, -2 (Huffman only) to 9 (best
 * compression).
 *
 * @throws {RangeError} It is not an integer in that range.
 */
export function checkCompressionLevel(where: string, level: number): void {
  if (
    !Number.isInteger(level) || level < MIN_COMPRESSION_LEVEL ||
    level > MAX_COMPRESSION_LEVEL
  ) {
    throw new RangeError(
      `${where}: compressionLevel must be an integer from ${MIN_COMPRESSION_LEVEL} to ${MAX_COMPRESSION_LEVEL}, got ${level}`,
    );
  }
}

/** `settings` with the Upgrader's and the Dialer's default read limit. */
export function withDefaultReadLimit(settings: ConnSettings): ConnSettings {
  return {
    readLimit: settings.readLimit ?? DEFAULT_READ_LIMIT,
    pingInterval: settings.pingInterval,
    pongTimeout: settings.pongTimeout,
    compressionLevel: settings.compressionLevel,
  };
}
