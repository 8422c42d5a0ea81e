// Command-line handling shared by the example servers: `--port` (default
// 8080) and `--hostname` (default 127.0.0.1) for all of them, plus each
// example's own flags. A bad command line prints the reason and the usage
// and exits with status 2 instead of throwing a stack trace at the user.
import { parseArgs } from "node:util";

/** An example's own flags: string-valued or boolean switches. */
export type FlagSpec = Record<
  string,
  { type: "string" | "boolean"; default?: string | boolean }
>;

/** A parsed command line. */
export interface ServerArgs {
  port: number;
  hostname: string;
  /** The example's own flags, by name (absent when not given and no default). */
  flags: FlagValues;
  positionals: string[];
}

/** Prints `message` and the usage, then exits with status 2. */
export function exitWithUsage(message: string, usage: string): never {
  console.error(`${message}\n${usage}`);
  Deno.exit(2);
}

/** Parses a port number, 0-65535. */
export function parsePort(value: string): number {
  const port = Number(value);
  if (!/^\d+$/.test(value) || port > 65535) {
    throw new RangeError(
      `--port must be a number from 0 to 65535, got "${value}"`,
    );
  }
  return port;
}

/**
 * Drops a leading `--`: `deno task NAME -- --port 9000` passes it on, and
 * `parseArgs` would take everything after it for positionals.
 */
function withoutSeparator(args: string[]): string[] {
  return args[0] === "--" ? args.slice(1) : args;
}

/** Flag values by name, as `parseArgs` returns them. */
export type FlagValues = Record<string, string | boolean | undefined>;

/**
 * Parses `args` (normally `Deno.args`) against `flags`; on a bad command line
 * prints the reason and the usage and exits with status 2.
 */
export function parseFlags(
  args: string[],
  usage: string,
  flags: FlagSpec,
  allowPositionals = false,
): { values: FlagValues; positionals: string[] } {
  try {
    return parseArgs({
      args: withoutSeparator(args),
      allowPositionals,
      options: flags,
    });
  } catch (error) {
    exitWithUsage(`Cannot start: ${(error as Error).message}`, usage);
  }
}

/** Parses a server's command line: `--port`, `--hostname` and `flags`. */
export function parseServerArgs(
  args: string[],
  usage: string,
  flags: FlagSpec = {},
  allowPositionals = false,
): ServerArgs {
  const { values, positionals } = parseFlags(args, usage, {
    ...flags,
    port: { type: "string", default: "8080" },
    hostname: { type: "string", default: "127.0.0.1" },
  }, allowPositionals);
  const { port, hostname, ...rest } = values;
  try {
    return {
      port: parsePort(port as string),
      hostname: hostname as string,
      flags: rest,
      positionals,
    };
  } catch (error) {
    exitWithUsage(`Cannot start: ${(error as Error).message}`, usage);
  }
}
