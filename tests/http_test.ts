import assert from "node:assert/strict";
import {
  HttpError,
  parseRequestHead,
  parseResponseHead,
  readHead,
} from "../_http.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** A reader that hands out the given pieces one read at a time, then EOF. */
function reader(...pieces: (string | Uint8Array)[]) {
  const queue = pieces.map((p) =>
    typeof p === "string" ? encoder.encode(p) : p
  );
  let reads = 0;
  return {
    get reads() {
      return reads;
    },
    read(buffer: Uint8Array): Promise<number | null> {
      reads++;
      const next = queue.shift();
      if (next === undefined) return Promise.resolve(null);
      const n = Math.min(next.length, buffer.length);
      buffer.set(next.subarray(0, n));
      if (n < next.length) queue.unshift(next.subarray(n));
      return Promise.resolve(n);
    },
  };
}

function bytes(text: string): Uint8Array {
  return encoder.encode(text);
}

async function rejectsWithStatus(
  promise: Promise<unknown>,
  status: number,
): Promise<HttpError> {
  let caught: unknown;
  await promise.catch((error) => caught = error);
  assert.ok(caught instanceof HttpError, `expected HttpError, got ${caught}`);
  assert.equal(caught.status, status);
  return caught;
}

function throwsWithStatus(fn: () => unknown, status: number): HttpError {
  try {
    fn();
  } catch (error) {
    assert.ok(error instanceof HttpError, `expected HttpError, got ${error}`);
    assert.equal(error.status, status);
    assert.equal(error.name, "HttpError");
    assert.doesNotMatch(error.message, /\.$/);
    return error;
  }
  assert.fail(`expected an HttpError with status ${status}`);
}

const REQUEST = "GET /chat?x=1 HTTP/1.1\r\nHost: example.com\r\n\r\n";

Deno.test("readHead() returns the head and the bytes behind it", async () => {
  const result = await readHead(reader(REQUEST + "frame bytes"), {
    maxHeadBytes: 1024,
  });
  assert.ok(result);
  assert.equal(decoder.decode(result.head), REQUEST);
  assert.equal(decoder.decode(result.rest), "frame bytes");
});

Deno.test("readHead() reads a small head in one small read and a large one in more", async () => {
  // The first read is small (an idle connection's pending read holds it);
  // a head longer than that takes further reads and arrives whole.
  const small = reader(REQUEST + "x".repeat(8000));
  const first = await readHead(small, { maxHeadBytes: 16384 });
  assert.equal(decoder.decode(first!.head), REQUEST);
  assert.equal(small.reads, 1);
  assert.ok(first!.head.buffer.byteLength <= 1024);

  const large = "GET / HTTP/1.1\r\nX-Big: " + "y".repeat(6000) + "\r\n\r\n";
  const many = reader(large + "rest");
  const second = await readHead(many, { maxHeadBytes: 16384 });
  assert.equal(decoder.decode(second!.head), large);
  assert.equal(decoder.decode(second!.rest), "rest");
  assert.ok(many.reads > 1);
});

Deno.test("readHead() finds the blank line when the head arrives byte by byte", async () => {
  const text = REQUEST + "rest";
  const pieces = [...text].map((c) => c);
  const result = await readHead(reader(...pieces), { maxHeadBytes: 1024 });
  assert.ok(result);
  assert.equal(decoder.decode(result.head), REQUEST);
  // Reads stop at the blank line: the byte after it is never requested.
  assert.equal(decoder.decode(result.rest), "");
});

Deno.test("readHead() finds the blank line split at every point", async () => {
  for (let cut = 1; cut < REQUEST.length; cut++) {
    const result = await readHead(
      reader(REQUEST.slice(0, cut), REQUEST.slice(cut) + "x"),
      { maxHeadBytes: 1024 },
    );
    assert.ok(result);
    assert.equal(decoder.decode(result.head), REQUEST, `cut at ${cut}`);
  }
});

Deno.test("readHead() skips empty lines before the start line", async () => {
  const result = await readHead(reader("\r\n\r\n" + REQUEST), {
    maxHeadBytes: 1024,
  });
  assert.ok(result);
  assert.equal(decoder.decode(result.head), REQUEST);
});

Deno.test("readHead() resolves null on EOF before any byte", async () => {
  assert.equal(await readHead(reader(), { maxHeadBytes: 1024 }), null);
});

Deno.test("readHead() rejects with 400 on EOF in the middle of a head", async () => {
  const error = await rejectsWithStatus(
    readHead(reader("GET / HTTP/1.1\r\nHo"), { maxHeadBytes: 1024 }),
    400,
  );
  assert.match(error.message, /closed after 18 bytes/);
});

Deno.test("readHead() rejects with 431 past maxHeadBytes and accepts exactly the limit", async () => {
  const head = "GET / HTTP/1.1\r\nHost: a\r\nX: " + "a".repeat(100) +
    "\r\n\r\n";
  const exact = await readHead(reader(head), { maxHeadBytes: head.length });
  assert.ok(exact);
  assert.equal(exact.head.length, head.length);
  await rejectsWithStatus(
    readHead(reader(head), { maxHeadBytes: head.length - 1 }),
    431,
  );
  // An endless head is refused without waiting for its end.
  const endless = {
    read(buffer: Uint8Array) {
      buffer.fill(0x61);
      return Promise.resolve(buffer.length);
    },
  };
  await rejectsWithStatus(readHead(endless, { maxHeadBytes: 10_000 }), 431);
});

Deno.test("readHead() parses buffered bytes first and reads only when they hold no whole head", async () => {
  const whole = reader("unused");
  const result = await readHead(whole, {
    maxHeadBytes: 1024,
    buffered: bytes(REQUEST + REQUEST),
  });
  assert.ok(result);
  assert.equal(whole.reads, 0);
  assert.equal(decoder.decode(result.head), REQUEST);
  assert.equal(decoder.decode(result.rest), REQUEST);

  const partial = reader(REQUEST.slice(10));
  const joined = await readHead(partial, {
    maxHeadBytes: 1024,
    buffered: bytes(REQUEST.slice(0, 10)),
  });
  assert.ok(joined);
  assert.equal(decoder.decode(joined.head), REQUEST);
  // Buffered bytes count as a started head: EOF then is an error, not null.
  await rejectsWithStatus(
    readHead(reader(), { maxHeadBytes: 1024, buffered: bytes("GET") }),
    400,
  );
});

Deno.test("readHead() rejects with the signal's reason and leaves no read unobserved", async () => {
  const controller = new AbortController();
  let failRead!: (error: Error) => void;
  const hanging = {
    read: () => new Promise<number | null>((_, reject) => failRead = reject),
  };
  const pending = readHead(hanging, {
    maxHeadBytes: 1024,
    signal: controller.signal,
  });
  const reason = new Error("stop");
  controller.abort(reason);
  await assert.rejects(pending, (error) => error === reason);
  // The abandoned read failing later must not be an unhandled rejection.
  failRead(new Error("connection closed"));
  await new Promise((resolve) => setTimeout(resolve, 0));
  await assert.rejects(
    readHead(reader(REQUEST), {
      maxHeadBytes: 1024,
      signal: controller.signal,
    }),
    (error) => error === reason,
  );
});

Deno.test("parseRequestHead() returns method, target, version and headers", () => {
  const head = parseRequestHead(bytes(
    "POST /a/b?c=d HTTP/1.1\r\nHost: example.com:8080\r\n" +
      "Accept: a\r\naccept: b\r\nX-Empty:\r\nX-Spaces: \t value \t\r\n\r\n",
  ));
  assert.equal(head.method, "POST");
  assert.equal(head.target, "/a/b?c=d");
  assert.equal(head.version, "HTTP/1.1");
  assert.deepEqual({ ...head.fields }, {
    host: "example.com:8080",
    accept: "a, b",
    "x-empty": "",
    "x-spaces": "value",
  });
  assert.equal(Object.getPrototypeOf(head.fields), null);
});

Deno.test("parseRequestHead() keeps a field named like an Object property as a field", () => {
  const head = parseRequestHead(
    bytes(
      "GET / HTTP/1.1\r\nHost: a\r\n__proto__: x\r\nConstructor: y\r\n\r\n",
    ),
  );
  assert.equal(head.fields["__proto__"], "x");
  assert.equal(head.fields.constructor, "y");
  assert.equal(head.fields.toString, undefined);
});

Deno.test("parseRequestHead() accepts HTTP/1.0 without Host and keeps obs-text bytes", () => {
  const head = parseRequestHead(
    new Uint8Array([
      ...bytes("GET / HTTP/1.0\r\nX: caf"),
      0xe9,
      13,
      10,
      13,
      10,
    ]),
  );
  assert.equal(head.version, "HTTP/1.0");
  assert.equal(head.fields.x, "caf\u00e9");
});

Deno.test("parseRequestHead() refuses malformed heads with 400", () => {
  const bad = [
    "GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", // obs-fold
    "GET / HTTP/1.1\r\nHost: a\r\n\tfolded\r\n\r\n", // obs-fold with HTAB
    "GET / HTTP/1.1\r\nHost : a\r\n\r\n", // space before the colon
    "GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", // bare LF
    "GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", // bare CR
    "GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", // NUL in a value
    "GET / HTTP/1.1\r\nHost: a\r\nNo colon\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\n: empty name\r\n\r\n",
    "GET / HTTP/1.1\r\n\r\n", // HTTP/1.1 needs a Host
    "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", // two Hosts
    "GET /  HTTP/1.1\r\nHost: a\r\n\r\n", // two spaces
    "GET / x HTTP/1.1\r\nHost: a\r\n\r\n", // space in the target
    "G(T / HTTP/1.1\r\nHost: a\r\n\r\n", // not a token
    "GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
    "GET / FTP/1.1\r\nHost: a\r\n\r\n",
    "GET / HTTP/11\r\nHost: a\r\n\r\n",
    "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", // TLS on a plain port
  ];
  for (const text of bad) {
    const error = throwsWithStatus(
      () => parseRequestHead(encoder.encode(text)),
      400,
    );
    assert.match(error.message, /^Cannot /, JSON.stringify(text));
  }
});

Deno.test("parseRequestHead() refuses HTTP versions other than 1.0 and 1.1 with 505", () => {
  for (const version of ["HTTP/2.0", "HTTP/0.9", "HTTP/1.2"]) {
    throwsWithStatus(
      () => parseRequestHead(bytes(`GET / ${version}\r\nHost: a\r\n\r\n`)),
      505,
    );
  }
});

Deno.test("parseRequestHead() refuses a request line over the limit with 414", () => {
  const line = `GET /${"a".repeat(100)} HTTP/1.1`;
  const head = bytes(`${line}\r\nHost: a\r\n\r\n`);
  assert.equal(
    parseRequestHead(head, { maxRequestLineBytes: line.length }).target.length,
    101,
  );
  throwsWithStatus(
    () => parseRequestHead(head, { maxRequestLineBytes: line.length - 1 }),
    414,
  );
});

Deno.test("parseRequestHead() refuses more header fields than the limit with 431", () => {
  const fields = Array.from({ length: 10 }, (_, i) => `X-${i}: v\r\n`).join("");
  const head = bytes(`GET / HTTP/1.1\r\nHost: a\r\n${fields}\r\n`);
  assert.equal(
    parseRequestHead(head, { maxHeaders: 11 }).fields["x-9"],
    "v",
  );
  throwsWithStatus(() => parseRequestHead(head, { maxHeaders: 10 }), 431);
});

Deno.test("parseResponseHead() parses a 101 and a status line without a reason", () => {
  const head = parseResponseHead(bytes(
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n" +
      "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRrKMk+o=\r\n\r\n",
  ));
  assert.equal(head.status, 101);
  assert.equal(head.statusText, "Switching Protocols");
  assert.equal(head.version, "HTTP/1.1");
  assert.equal(
    head.headers.get("sec-websocket-accept"),
    "s3pPLMBiTxaQ9kYGzzhZRrKMk+o=",
  );
  const bare = parseResponseHead(bytes("HTTP/1.0 404 \r\n\r\n"));
  assert.equal(bare.status, 404);
  assert.equal(bare.statusText, "");
  const noSpace = parseResponseHead(bytes("HTTP/1.1 200\r\n\r\n"));
  assert.equal(noSpace.status, 200);
});

Deno.test("parseResponseHead() refuses malformed status lines", () => {
  for (
    const text of [
      "HTTP/1.1 20 OK\r\n\r\n",
      "HTTP/1.1 2000 OK\r\n\r\n",
      "HTTP/1.1 abc OK\r\n\r\n",
      "SSH-2.0-OpenSSH\r\n\r\n",
      "HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
    ]
  ) {
    throwsWithStatus(() => parseResponseHead(bytes(text)), 400);
  }
  throwsWithStatus(
    () => parseResponseHead(bytes("HTTP/2.0 200 OK\r\n\r\n")),
    505,
  );
});
