import assert from "node:assert/strict";
import {
  CLOSE_CODE,
  encodeHeader,
  formatCloseMessage,
  headerLength,
  isValidCloseCode,
  mask,
  MAX_HEADER_LENGTH,
  OPCODE,
  parseClosePayload,
  parseHeader,
  ProtocolError,
} from "../frame.ts";
import {
  closePayload,
  frame,
  INVALID_CLOSE_CODES,
  LENGTH_EDGES,
  VALID_CLOSE_CODES,
} from "./_frames.ts";
import { prng } from "../_pipe.ts";

function naiveMask(data: Uint8Array, key: Uint8Array, offset: number) {
  const out = data.slice();
  for (let i = 0; i < out.length; i++) out[i] ^= key[(offset + i) % 4];
  return out;
}

Deno.test("parseHeader() reads every size boundary, masked and unmasked", () => {
  for (const size of LENGTH_EDGES) {
    for (const masked of [false, true]) {
      const key = new Uint8Array([9, 8, 7, 6]);
      const bytes = frame({
        opcode: OPCODE.Binary,
        payload: new Uint8Array(size),
        mask: masked ? key : false,
      });
      const header = parseHeader(bytes)!;
      assert.equal(header.length, size, `size ${size}`);
      assert.equal(header.masked, masked);
      assert.equal(header.fin, true);
      assert.equal(header.opcode, OPCODE.Binary);
      assert.equal(header.headerLength, headerLength(size, masked));
      assert.equal(bytes.length, header.headerLength + size);
      if (masked) assert.deepEqual(header.maskKey, key);
    }
  }
});

Deno.test("parseHeader() returns null for every incomplete prefix", () => {
  for (const size of [5, 300, 70000]) {
    const bytes = frame({
      opcode: 2,
      payload: new Uint8Array(size),
      mask: true,
    });
    const full = headerLength(size, true);
    for (let cut = 0; cut < full; cut++) {
      assert.equal(parseHeader(bytes.subarray(0, cut)), null, `cut ${cut}`);
    }
    assert.notEqual(parseHeader(bytes.subarray(0, full)), null);
  }
});

Deno.test("parseHeader() reads FIN, RSV bits and the raw opcode", () => {
  const bytes = frame({
    fin: false,
    rsv1: true,
    rsv2: false,
    rsv3: true,
    opcode: 0xb,
  });
  const header = parseHeader(bytes)!;
  assert.deepEqual(
    [header.fin, header.rsv1, header.rsv2, header.rsv3, header.opcode],
    [false, true, false, true, 0xb],
  );
});

Deno.test("parseHeader() parses at an offset into a reused object", () => {
  const bytes = new Uint8Array([
    0xff,
    0xff,
    ...frame({ opcode: 1, payload: "abc" }),
  ]);
  const into = parseHeader(frame({ opcode: 2, payload: "x", mask: true }))!;
  const header = parseHeader(bytes, 2, into);
  assert.equal(header, into);
  assert.equal(header!.opcode, 1);
  assert.equal(header!.length, 3);
  assert.equal(header!.masked, false);
});

Deno.test("parseHeader() rejects a 64-bit length with the top bit set (1002)", () => {
  const bytes = frame({ opcode: 2, declaredLength: 1n << 63n });
  assert.throws(
    () => parseHeader(bytes),
    (e) => e instanceof ProtocolError && e.code === 1002,
  );
});

Deno.test("parseHeader() rejects lengths above 2^53 - 1 (1009) and accepts 2^53 - 1", () => {
  assert.throws(
    () => parseHeader(frame({ opcode: 2, declaredLength: 1n << 53n })),
    (e) => e instanceof ProtocolError && e.code === 1009,
  );
  assert.throws(
    () => parseHeader(frame({ opcode: 2, declaredLength: 1n << 62n })),
    (e) => e instanceof ProtocolError && e.code === 1009,
  );
  const max = parseHeader(
    frame({ opcode: 2, declaredLength: (1n << 53n) - 1n }),
  )!;
  assert.equal(max.length, Number.MAX_SAFE_INTEGER);
});

Deno.test("encodeHeader() writes the bytes RFC 6455 draws, at every size boundary", () => {
  for (const size of LENGTH_EDGES) {
    for (const key of [undefined, new Uint8Array([1, 2, 3, 4])]) {
      const expected = frame({
        opcode: 2,
        payload: new Uint8Array(size),
        mask: key ?? false,
      })
        .subarray(0, headerLength(size, key !== undefined));
      const target = new Uint8Array(MAX_HEADER_LENGTH + 2);
      const n = encodeHeader(target, {
        fin: true,
        opcode: 2,
        length: size,
        maskKey: key,
      }, 2);
      assert.equal(n, expected.length);
      assert.deepEqual(target.subarray(2, 2 + n), expected);
    }
  }
});

Deno.test("encodeHeader() sets FIN and RSV bits", () => {
  const target = new Uint8Array(2);
  encodeHeader(target, {
    fin: false,
    rsv1: true,
    rsv2: true,
    rsv3: true,
    opcode: 0,
    length: 0,
  });
  assert.equal(target[0], 0x70);
});

Deno.test("encodeHeader() throws RangeError on bad input", () => {
  const target = new Uint8Array(14);
  assert.throws(
    () => encodeHeader(target, { fin: true, opcode: 16, length: 0 }),
    RangeError,
  );
  assert.throws(
    () => encodeHeader(target, { fin: true, opcode: 1, length: -1 }),
    RangeError,
  );
  assert.throws(
    () => encodeHeader(target, { fin: true, opcode: 1, length: 2 ** 53 }),
    RangeError,
  );
  assert.throws(
    () =>
      encodeHeader(target, {
        fin: true,
        opcode: 1,
        length: 1,
        maskKey: new Uint8Array(3),
      }),
    RangeError,
  );
  assert.throws(
    () =>
      encodeHeader(new Uint8Array(3), { fin: true, opcode: 1, length: 200 }),
    /4 bytes needed, 3 available/,
  );
});

Deno.test("mask() matches a naive XOR at every size, alignment and key offset", () => {
  const random = prng(7);
  const key = new Uint8Array([0xa1, 0xb2, 0xc3, 0xd4]);
  for (
    const size of [0, 1, 2, 3, 4, 5, 7, 31, 32, 33, 127, 128, 129, 1000, 4099]
  ) {
    for (let align = 0; align < 4; align++) {
      for (let offset = 0; offset < 4; offset++) {
        const backing = new Uint8Array(size + 4).map(() => random() * 256);
        const before = backing.slice();
        const data = backing.subarray(align, align + size);
        const expected = naiveMask(data, key, offset);
        const next = mask(data, key, offset);
        assert.deepEqual(
          data,
          expected,
          `size ${size} align ${align} offset ${offset}`,
        );
        assert.equal(next, (offset + size) % 4);
        assert.deepEqual(
          backing.subarray(0, align),
          before.subarray(0, align),
        );
        assert.deepEqual(
          backing.subarray(align + size),
          before.subarray(align + size),
        );
      }
    }
  }
});

Deno.test("mask() leaves bytes outside the view untouched", () => {
  const backing = new Uint8Array(300).fill(0x55);
  mask(backing.subarray(1, 299), new Uint8Array([0xff, 0xff, 0xff, 0xff]));
  assert.equal(backing[0], 0x55);
  assert.equal(backing[299], 0x55);
  assert.equal(backing[1], 0xaa);
  assert.equal(backing[298], 0xaa);
});

Deno.test("mask() resumes across pieces split at random points", () => {
  const random = prng(11);
  const key = new Uint8Array([1, 22, 133, 244]);
  for (const size of [10, 200, 70000]) {
    const data = new Uint8Array(size).map(() => random() * 256);
    const expected = naiveMask(data, key, 0);
    let offset = 0;
    let position = 0;
    while (position < size) {
      const end = Math.min(size, position + 1 + Math.floor(random() * 300));
      offset = mask(data.subarray(position, end), key, offset);
      position = end;
    }
    assert.deepEqual(data, expected);
  }
});

Deno.test("mask() throws RangeError for a key that is not 4 bytes", () => {
  assert.throws(() => mask(new Uint8Array(4), new Uint8Array(5)), /not 4/);
});

Deno.test("isValidCloseCode() follows RFC 6455 section 7.4", () => {
  for (const code of VALID_CLOSE_CODES) {
    assert.equal(isValidCloseCode(code), true, `${code}`);
  }
  for (const code of INVALID_CLOSE_CODES) {
    assert.equal(isValidCloseCode(code), false, `${code}`);
  }
});

Deno.test("formatCloseMessage() encodes code and reason; 1005 gives an empty payload", () => {
  assert.deepEqual(formatCloseMessage(1000, "ok"), closePayload(1000, "ok"));
  assert.deepEqual(formatCloseMessage(4001), closePayload(4001));
  assert.equal(formatCloseMessage(CLOSE_CODE.NoStatusReceived, "x").length, 0);
  assert.throws(() => formatCloseMessage(1000, "x".repeat(124)), RangeError);
  assert.throws(() => formatCloseMessage(70000), RangeError);
  assert.equal(formatCloseMessage(1000, "é".repeat(61)).length, 124);
});

Deno.test("parseClosePayload() accepts empty and valid payloads", () => {
  assert.deepEqual(parseClosePayload(new Uint8Array(0)), {
    code: 1005,
    reason: "",
  });
  assert.deepEqual(parseClosePayload(closePayload(1001, "bye ✓")), {
    code: 1001,
    reason: "bye ✓",
  });
  assert.deepEqual(parseClosePayload(closePayload(1000, "\ufeffbom")), {
    code: 1000,
    reason: "\ufeffbom",
  });
});

Deno.test("parseClosePayload() rejects a 1-byte payload and forbidden codes with 1002", () => {
  for (
    const payload of [
      new Uint8Array([3]),
      closePayload(1005),
      closePayload(1006),
      closePayload(999),
      closePayload(5000),
    ]
  ) {
    assert.throws(
      () => parseClosePayload(payload),
      (e) => e instanceof ProtocolError && e.code === 1002,
    );
  }
});

Deno.test("parseClosePayload() rejects a reason that is not UTF-8 with 1007", () => {
  for (const bad of [[0xff], [0xc0, 0x80], [0xed, 0xa0, 0x80], [0xe2, 0x82]]) {
    const payload = new Uint8Array([0x03, 0xe8, ...bad]);
    assert.throws(
      () => parseClosePayload(payload),
      (e) => e instanceof ProtocolError && e.code === 1007,
    );
  }
});
