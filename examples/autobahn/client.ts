/**
 * Autobahn testee client: drives the Autobahn WebSocket conformance suite's
 * `fuzzingserver` through every case it has.
 *
 * It asks the server for the number of cases (`/getCaseCount`), connects to
 * `/runCase?case=N&agent=A` for each one and echoes every message until the
 * server closes, then asks for the reports to be written
 * (`/updateReports?agent=A`). Compression (permessage-deflate) is offered on
 * every connection.
 *
 * ```sh
 * deno task autobahn:client -- --url ws://127.0.0.1:9001
 * ```
 *
 * @module
 */
import { type Conn, Dialer, isCloseError, MESSAGE_TYPE } from "../../mod.ts";
import { parseFlags } from "../_cli.ts";

/** Options for {@linkcode runSuite}. */
export interface SuiteOptions {
  /** The fuzzing server's base URL, e.g. `ws://127.0.0.1:9001`. */
  url: string;
  /** The name the reports file the results under (default `denows`). */
  agent?: string;
  /** Called before each case runs. */
  onCase?: (index: number, count: number) => void;
}

/** The suite's largest messages are 16 MiB (cases 9.x). */
const READ_LIMIT = 64 * 1024 * 1024;

function endpoint(base: string, path: string, query: Record<string, string>) {
  const url = new URL(path, base.endsWith("/") ? base : `${base}/`);
  for (const [name, value] of Object.entries(query)) {
    url.searchParams.set(name, value);
  }
  return url;
}

async function connect(dialer: Dialer, url: URL): Promise<Conn> {
  const { conn } = await dialer.dial(url);
  conn.setReadLimit(READ_LIMIT);
  return conn;
}

/** Reads until the server closes; the close itself is the expected end. */
async function drain(conn: Conn): Promise<void> {
  try {
    for (;;) await conn.readMessage();
  } catch (error) {
    if (!isCloseError(error)) throw error;
  } finally {
    conn.close();
  }
}

/**
 * Asks the server how many cases it has.
 *
 * @param dialer The dialer to connect with.
 * @param base The fuzzing server's base URL.
 * @returns The number of cases.
 * @throws {TypeError} If the answer is not a count.
 * @throws {BadHandshakeError} If the server refuses the connection.
 */
export async function getCaseCount(
  dialer: Dialer,
  base: string,
): Promise<number> {
  const conn = await connect(dialer, endpoint(base, "getCaseCount", {}));
  let count: number;
  try {
    const { type, data } = await conn.readMessage();
    const text = new TextDecoder().decode(data);
    count = Number(text);
    if (type !== MESSAGE_TYPE.Text || !Number.isInteger(count) || count < 0) {
      throw new TypeError(
        `Cannot run the suite: /getCaseCount answered ${JSON.stringify(text)}`,
      );
    }
  } catch (error) {
    conn.close();
    throw error;
  }
  await drain(conn);
  return count;
}

/**
 * Runs one case: echoes every message until the connection ends. The case's
 * verdict is the server's to give, so failures here are not errors.
 *
 * @param dialer The dialer to connect with.
 * @param base The fuzzing server's base URL.
 * @param index The case number, from 1.
 * @param agent The name the results are filed under.
 * @returns Settles when the case is over; never rejects.
 */
export async function runCase(
  dialer: Dialer,
  base: string,
  index: number,
  agent: string,
): Promise<void> {
  let conn: Conn;
  try {
    conn = await connect(
      dialer,
      endpoint(base, "runCase", { case: String(index), agent }),
    );
  } catch (error) {
    console.error(`case ${index}: cannot connect:`, error);
    return;
  }
  try {
    for (;;) {
      const { type, data } = await conn.readMessage();
      await conn.writeMessage(type, data);
    }
  } catch {
    // Closed by the server, or failed by a case that sends bad frames.
  } finally {
    conn.close();
  }
}

/**
 * Tells the server to write its reports for `agent`.
 *
 * @param dialer The dialer to connect with.
 * @param base The fuzzing server's base URL.
 * @param agent The name the results are filed under.
 * @throws {BadHandshakeError} If the server refuses the connection.
 */
export async function updateReports(
  dialer: Dialer,
  base: string,
  agent: string,
): Promise<void> {
  await drain(
    await connect(dialer, endpoint(base, "updateReports", { agent })),
  );
}

/**
 * Runs every case the server has, then updates the reports.
 *
 * @param options The server's URL, the agent name and a progress callback.
 * @returns The number of cases run.
 * @throws {TypeError} If the server's case count is not a number.
 * @throws {BadHandshakeError} If the server refuses a connection.
 */
export async function runSuite(options: SuiteOptions): Promise<number> {
  const agent = options.agent ?? "denows";
  // Context takeover allowed, so that every permessage-deflate case the
  // fuzzing server offers is negotiated, none left unimplemented.
  const dialer = new Dialer({ enableCompression: true, contextTakeover: true });
  const count = await getCaseCount(dialer, options.url);
  for (let index = 1; index <= count; index++) {
    options.onCase?.(index, count);
    await runCase(dialer, options.url, index, agent);
  }
  await updateReports(dialer, options.url, agent);
  return count;
}

if (import.meta.main) {
  const usage = "Usage: client.ts [--url ws://HOST:PORT] [--agent NAME]";
  const { values } = parseFlags(Deno.args, usage, {
    url: { type: "string", default: "ws://127.0.0.1:9001" },
    agent: { type: "string", default: "denows" },
  });
  const url = values.url as string;
  const agent = values.agent as string;
  try {
    const count = await runSuite({
      url,
      agent,
      onCase: (index, count) =>
        console.log(`Running case ${index} of ${count}`),
    });
    console.log(`Ran ${count} cases; reports updated for ${agent}`);
  } catch (error) {
    console.error(`Cannot run the suite at ${url}:`, error);
    Deno.exit(1);
  }
}
