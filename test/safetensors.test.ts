import { describe, it, expect } from 'vitest';
import {
  DTYPE_SIZES,
  MERGEABLE_DTYPES,
  MAX_HEADER_LENGTH,
  readHeaderLength,
  parseHeader,
  encodeHeader,
  type SafetensorsHeader,
} from '../lib/checkpoint/safetensors.js';
import { DellaError } from '../lib/errors.js';
import { rng as mulberry32 } from './helpers/random.js';

const FILE = 'model.safetensors';

function prefix(n: number | bigint): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(n), true);
  return b;
}

/** Parses a whole file the way a reader would: prefix, then header bytes. */
function parseFile(bytes: Uint8Array, fileSize = bytes.length): SafetensorsHeader {
  const n = readHeaderLength(bytes.subarray(0, 8), fileSize, FILE);
  return parseHeader(bytes.subarray(8, 8 + n), n, fileSize, FILE);
}

/** A header from raw JSON text (or bytes) followed by `dataSize` bytes of data. */
function parseJson(json: string | Uint8Array, dataSize = 0): SafetensorsHeader {
  const body = typeof json === 'string' ? new TextEncoder().encode(json) : json;
  const bytes = new Uint8Array(8 + body.length);
  bytes.set(prefix(body.length));
  bytes.set(body, 8);
  // The data bytes themselves are never read, so only the size matters.
  return parseFile(bytes, bytes.length + dataSize);
}

function expectReject(fn: () => unknown, fragment: string | RegExp): DellaError {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(caught, 'expected a rejection').toBeInstanceOf(DellaError);
  const err = caught as DellaError;
  expect(err.code).toBe('E_CHECKPOINT');
  expect(err.message.startsWith(`${FILE}: `)).toBe(true);
  if (typeof fragment === 'string') expect(err.message).toContain(fragment);
  else expect(err.message).toMatch(fragment);
  return err;
}

const t = (dtype: string, shape: unknown, offs: unknown) =>
  ({ dtype, shape, data_offsets: offs }) as Record<string, unknown>;

describe('constants', () => {
  it('has the documented dtypes and sizes', () => {
    expect(DTYPE_SIZES).toEqual({
      F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U64: 8, U32: 4,
      U16: 2, U8: 1, BOOL: 1, F8_E4M3: 1, F8_E5M2: 1, F8_E8M0: 1, C64: 8,
    });
    expect([...MERGEABLE_DTYPES].sort()).toEqual(['BF16', 'F16', 'F32', 'F64']);
    expect(MAX_HEADER_LENGTH).toBe(100_000_000);
  });
});

describe('encodeHeader', () => {
  it('writes the exact layout: LE length, compact JSON with metadata first, space padding', () => {
    const bytes = encodeHeader([{ name: 'a', dtype: 'F32', shape: [2], begin: 0, end: 8 }], { format: 'pt' });
    const json = '{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}';
    const n = Math.ceil(json.length / 8) * 8;
    expect(bytes.length).toBe(8 + n);
    expect(new DataView(bytes.buffer).getBigUint64(0, true)).toBe(BigInt(n));
    expect(new TextDecoder().decode(bytes.subarray(8))).toBe(json + ' '.repeat(n - json.length));
  });

  it('keeps the given order even for integer-like names', () => {
    const bytes = encodeHeader(
      [
        { name: 'b', dtype: 'U8', shape: [1], begin: 0, end: 1 },
        { name: '0', dtype: 'U8', shape: [1], begin: 1, end: 2 },
      ],
      null,
    );
    const text = new TextDecoder().decode(bytes.subarray(8)).trimEnd();
    expect(text.indexOf('"b"')).toBeLessThan(text.indexOf('"0"'));
    expect(text).not.toContain('__metadata__');
  });

  it('encodes an empty header as {} padded', () => {
    const bytes = encodeHeader([], null);
    expect(bytes.length).toBe(16);
    const h = parseFile(bytes);
    expect(h.tensors).toEqual([]);
    expect(h.metadata).toBeNull();
    expect(h.dataOffset).toBe(16);
  });
});

describe('round trip', () => {
  const NAME_PARTS = ['model', 'layers', 'weight', 'bias', 'é', 'ß', '模型', '🙂', 'Ω', 'q"uote', 'back\\slash', 'tab\t', '0', '12'];
  const DTYPES = Object.keys(DTYPE_SIZES);

  function randomCase(seed: number) {
    const rnd = mulberry32(seed);
    const pick = <T,>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)];
    const count = Math.floor(rnd() * 40);
    const names = new Set<string>();
    while (names.size < count) {
      const k = 1 + Math.floor(rnd() * 4);
      const parts = Array.from({ length: k }, () => pick(NAME_PARTS));
      names.add(`${parts.join('.')}.${names.size}`);
    }
    const specs = [...names].map((name) => {
      const dtype = pick(DTYPES);
      const rank = Math.floor(rnd() * 4); // includes shape []
      const shape = Array.from({ length: rank }, () => (rnd() < 0.1 ? 0 : 1 + Math.floor(rnd() * 7)));
      const numel = shape.reduce((a, b) => a * b, 1);
      return { name, dtype, shape, nbytes: numel * DTYPE_SIZES[dtype] };
    });
    // Lay the data out in a random order unrelated to the listing order.
    const layout = [...specs.keys()].sort(() => rnd() - 0.5);
    const offsets = new Map<number, [number, number]>();
    let pos = 0;
    for (const i of layout) {
      offsets.set(i, [pos, pos + specs[i].nbytes]);
      pos += specs[i].nbytes;
    }
    const tensors = specs.map((s, i) => ({
      name: s.name,
      dtype: s.dtype,
      shape: s.shape,
      begin: offsets.get(i)![0],
      end: offsets.get(i)![1],
    }));
    const metadata =
      rnd() < 0.3
        ? null
        : { format: 'pt', 'ключ': 'значение 🙂', '7': 'digits', empty: '', quote: 'a"b\\c\n' };
    return { tensors, metadata, dataSize: pos };
  }

  for (let seed = 1; seed <= 60; seed++) {
    it(`survives encode -> readHeaderLength -> parseHeader (seed ${seed})`, () => {
      const { tensors, metadata, dataSize } = randomCase(seed);
      const head = encodeHeader(tensors, metadata);
      expect(head.length % 8).toBe(0);
      const padded = new TextDecoder().decode(head.subarray(8));
      expect(padded).toMatch(/^\{.*\} *$/s);
      expect(padded.length - padded.trimEnd().length).toBeLessThan(8);

      const h = parseFile(head, head.length + dataSize);
      expect(h.headerLength).toBe(head.length - 8);
      expect(h.dataOffset).toBe(head.length);
      expect(h.metadata).toEqual(metadata);
      expect(h.tensors.length).toBe(tensors.length);
      for (let i = 1; i < h.tensors.length; i++) {
        expect(h.tensors[i].begin).toBeGreaterThanOrEqual(h.tensors[i - 1].begin);
      }
      const byName = new Map(h.tensors.map((x) => [x.name, x]));
      for (const x of tensors) {
        const got = byName.get(x.name);
        expect(got).toEqual({
          name: x.name,
          dtype: x.dtype,
          shape: x.shape,
          numel: x.shape.reduce((a, b) => a * b, 1),
          begin: x.begin,
          end: x.end,
        });
      }
    });
  }

  it('parses 10,000 tensors quickly', () => {
    const tensors = Array.from({ length: 10_000 }, (_, i) => ({
      name: `model.layers.${i}.weight`,
      dtype: 'F16',
      shape: [4, 2],
      begin: (9_999 - i) * 16,
      end: (10_000 - i) * 16,
    }));
    const head = encodeHeader(tensors, { format: 'pt' });
    const t0 = performance.now();
    const h = parseFile(head, head.length + 160_000);
    expect(performance.now() - t0).toBeLessThan(1000);
    expect(h.tensors[0].name).toBe('model.layers.9999.weight');
    expect(h.tensors[9_999].end).toBe(160_000);
  });

  it('accepts zero-size tensors at boundaries and whitespace around the JSON', () => {
    const json = JSON.stringify({
      a: t('F32', [2], [0, 8]),
      z: t('F32', [0, 3], [8, 8]),
      s: t('F64', [], [8, 16]),
      e: t('BF16', [5, 0], [16, 16]),
    });
    const h = parseJson(`  \n${json}\t  `, 16);
    expect(h.tensors.map((x) => x.name)).toEqual(['a', 'z', 's', 'e']);
    expect(h.tensors[2].numel).toBe(1);
    expect(h.tensors[1].numel).toBe(0);
  });

  it('reads the prefix from a subarray at any offset', () => {
    const head = encodeHeader([{ name: 'x', dtype: 'U8', shape: [3], begin: 0, end: 3 }], null);
    const big = new Uint8Array(head.length + 5);
    big.set(head, 5);
    expect(readHeaderLength(big.subarray(5, 13), head.length + 3, FILE)).toBe(head.length - 8);
  });
});

describe('rejections', () => {
  it('file shorter than 8 bytes', () => {
    expectReject(() => readHeaderLength(new Uint8Array(5), 5, FILE), 'truncated');
    expectReject(() => readHeaderLength(new Uint8Array(0), 0, FILE), 'truncated');
    expectReject(() => readHeaderLength(new Uint8Array(4), 100, FILE), 'truncated');
  });

  it('header length beyond the file', () => {
    expectReject(() => readHeaderLength(prefix(100), 50, FILE), 'header length 100 runs past the end of the file');
    expectReject(() => readHeaderLength(prefix(2n ** 64n - 1n), 50, FILE), 'exceeds the maximum');
  });

  it('header length over 100 MB', () => {
    expectReject(() => readHeaderLength(prefix(MAX_HEADER_LENGTH + 1), 2 ** 40, FILE), 'exceeds the maximum of 100000000');
    expect(readHeaderLength(prefix(MAX_HEADER_LENGTH), 8 + MAX_HEADER_LENGTH, FILE)).toBe(MAX_HEADER_LENGTH);
  });

  it('header bytes shorter than the declared length', () => {
    expectReject(() => parseHeader(new Uint8Array(4), 10, 100, FILE), 'header is truncated');
  });

  it('invalid UTF-8', () => {
    const bad = new Uint8Array([0x7b, 0x22, 0xff, 0xfe, 0x22, 0x3a, 0x31, 0x7d]); // {"\xff\xfe":1}
    expectReject(() => parseJson(bad), 'not valid UTF-8');
    // A lone surrogate encoded as UTF-8 bytes is also invalid.
    expectReject(() => parseJson(new Uint8Array([0x7b, 0x22, 0xed, 0xa0, 0x80, 0x22, 0x3a, 0x31, 0x7d])), 'not valid UTF-8');
  });

  it('not JSON', () => {
    expectReject(() => parseJson('{"a": '), 'not valid JSON');
    expectReject(() => parseJson(''), 'not valid JSON');
    expectReject(() => parseJson("{'a': 1}"), 'not valid JSON');
    expectReject(() => parseJson('\ufeff{}'), 'not valid JSON');
  });

  it('JSON array / null / number / string at top level', () => {
    expectReject(() => parseJson('[]'), 'must be a JSON object, got an array');
    expectReject(() => parseJson('null'), 'must be a JSON object, got null');
    expectReject(() => parseJson('42'), 'must be a JSON object, got a number');
    expectReject(() => parseJson('"x"'), 'must be a JSON object, got a string');
  });

  it('duplicate tensor names', () => {
    const e = '{"dtype":"U8","shape":[1],"data_offsets":[0,1]}';
    expectReject(() => parseJson(`{"w":${e},"w":${e}}`, 1), 'duplicate tensor name "w"');
    // Escapes spelling the same key still collide.
    expectReject(() => parseJson(`{"w":${e},"\\u0077":${e}}`, 1), 'duplicate tensor name "w"');
    // Same-looking keys inside strings or nested values are not top-level duplicates.
    const ok = parseJson(`{"__metadata__":{"w":"\\"w\\":"},"w":${e}}`, 1);
    expect(ok.tensors.map((x) => x.name)).toEqual(['w']);
    expectReject(() => parseJson(`{"__metadata__":{},"__metadata__":{}}`), '"__metadata__" appears more than once');
  });

  it('duplicate keys inside an entry or metadata', () => {
    expectReject(
      () => parseJson('{"w":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', 1),
      'duplicate key "dtype" in the entry for tensor "w"',
    );
    expectReject(() => parseJson('{"__metadata__":{"a":"1","a":"2"}}'), 'duplicate key "a" in "__metadata__"');
  });

  it('unknown dtype', () => {
    expectReject(() => parseJson(JSON.stringify({ w: t('F4', [2], [0, 1]) }), 1), 'tensor "w": unknown dtype "F4"');
    expectReject(() => parseJson(JSON.stringify({ w: t('f32', [1], [0, 4]) }), 4), 'unknown dtype "f32"');
    expectReject(() => parseJson(JSON.stringify({ w: t('F6_E2M3', [1], [0, 1]) }), 1), 'unknown dtype "F6_E2M3"');
    expectReject(() => parseJson(JSON.stringify({ w: { dtype: 4, shape: [1], data_offsets: [0, 4] } }), 4), 'dtype must be a string');
    // Prototype names are not dtypes.
    expectReject(() => parseJson(JSON.stringify({ w: t('toString', [1], [0, 4]) }), 4), 'unknown dtype "toString"');
  });

  it('negative / fractional / string shape dims', () => {
    expectReject(() => parseJson(JSON.stringify({ w: t('U8', [2, -1], [0, 0]) })), 'tensor "w": shape dimension 1 must be a non-negative integer, got -1');
    expectReject(() => parseJson(JSON.stringify({ w: t('U8', [1.5], [0, 1]) }), 1), 'shape dimension 0 must be a non-negative integer, got 1.5');
    expectReject(() => parseJson(JSON.stringify({ w: t('U8', ['2'], [0, 2]) }), 2), 'got "2"');
    expectReject(() => parseJson(JSON.stringify({ w: t('U8', [null], [0, 1]) }), 1), 'got null');
    expectReject(() => parseJson(JSON.stringify({ w: t('U8', 3, [0, 3]) }), 3), 'shape must be an array');
    expectReject(() => parseJson('{"w":{"dtype":"U8","shape":[1e300],"data_offsets":[0,1]}}', 1), 'must be a non-negative integer');
  });

  it('overflowing shape', () => {
    expectReject(() => parseJson(JSON.stringify({ w: t('U8', [2 ** 30, 2 ** 30, 2 ** 30], [0, 1]) }), 1), 'too large');
    // numel fits but the byte size does not.
    expectReject(() => parseJson(JSON.stringify({ w: t('F64', [2 ** 51], [0, 1]) }), 1), 'too large');
    // A zero dimension makes the product 0 however large the others are.
    const h = parseJson(JSON.stringify({ w: t('U8', [2 ** 40, 2 ** 40, 0], [0, 0]) }));
    expect(h.tensors[0].numel).toBe(0);
  });

  it('data_offsets wrong length / begin > end / non-integer', () => {
    expectReject(() => parseJson(JSON.stringify({ w: t('U8', [1], [0]) }), 1), 'data_offsets must be an array of 2 integers, got [0]');
    expectReject(() => parseJson(JSON.stringify({ w: t('U8', [1], [0, 1, 2]) }), 1), 'data_offsets must be an array of 2 integers');
    expectReject(() => parseJson(JSON.stringify({ w: t('U8', [1], { 0: 0, 1: 1 }) }), 1), 'data_offsets must be an array of 2 integers');
    expectReject(() => parseJson(JSON.stringify({ w: t('U8', [0], [5, 4]) }), 5), 'data_offsets [5, 4] begin after they end');
    expectReject(() => parseJson(JSON.stringify({ w: t('U8', [1], [0.5, 1.5]) }), 2), 'data_offsets must be non-negative integers, got [0.5,1.5]');
    expectReject(() => parseJson(JSON.stringify({ w: t('U8', [1], [-1, 0]) }), 1), 'data_offsets must be non-negative integers');
    expectReject(() => parseJson(JSON.stringify({ w: t('U8', [1], ['0', '1']) }), 1), 'data_offsets must be non-negative integers');
    expectReject(() => parseJson(JSON.stringify({ w: t('U8', [1], [0, 2 ** 53]) }), 1), 'data_offsets must be non-negative integers');
  });

  it('size not matching shape', () => {
    expectReject(
      () => parseJson(JSON.stringify({ 'a.weight': t('F32', [3, 2], [0, 10]) }), 10),
      'tensor "a.weight": data_offsets [0, 10] hold 10 bytes but shape [3, 2] of F32 needs 24',
    );
    expectReject(() => parseJson(JSON.stringify({ s: t('BF16', [], [0, 4]) }), 4), 'hold 4 bytes but shape [] of BF16 needs 2');
  });

  it('gap between tensors', () => {
    expectReject(
      () => parseJson(JSON.stringify({ a: t('U8', [4], [0, 4]), b: t('U8', [4], [6, 10]) }), 10),
      'gap of 2 bytes between tensor "a" (ends at 4) and tensor "b" (begins at 6)',
    );
    expectReject(
      () => parseJson(JSON.stringify({ a: t('U8', [4], [3, 7]) }), 7),
      'gap of 3 bytes at the start of the data section before tensor "a"',
    );
  });

  it('overlapping tensors', () => {
    expectReject(
      () => parseJson(JSON.stringify({ a: t('U8', [4], [0, 4]), b: t('U8', [4], [2, 6]) }), 6),
      'tensor "a" [0, 4] overlaps tensor "b" [2, 6]',
    );
    // Same range twice, and a zero-size tensor strictly inside another.
    expectReject(() => parseJson(JSON.stringify({ a: t('U8', [4], [0, 4]), b: t('I32', [], [0, 4]) }), 4), 'overlaps');
    expectReject(() => parseJson(JSON.stringify({ a: t('U8', [4], [0, 4]), z: t('U8', [0], [2, 2]) }), 4), 'tensor "a" [0, 4] overlaps tensor "z" [2, 2]');
  });

  it('offsets past the end of file', () => {
    expectReject(
      () => parseJson(JSON.stringify({ a: t('U8', [4], [0, 4]), b: t('U8', [4], [4, 8]) }), 6),
      'tensor "b": data_offsets [4, 8] run past the end of the file (the data section holds 6 bytes)',
    );
    expectReject(() => parseJson(JSON.stringify({ z: t('U8', [0], [9, 9]) }), 0), 'run past the end of the file');
  });

  it('trailing bytes after the last tensor', () => {
    expectReject(
      () => parseJson(JSON.stringify({ a: t('U8', [4], [0, 4]) }), 7),
      '3 trailing bytes after the last tensor "a"',
    );
    expectReject(() => parseJson('{}', 5), '5 bytes of data but the header lists no tensors');
    expectReject(() => parseJson('{"__metadata__":{"format":"pt"}}', 1), 'lists no tensors');
  });

  it('non-string metadata values', () => {
    expectReject(() => parseJson('{"__metadata__":{"format":"pt","n":3}}'), '"__metadata__" value for "n" must be a string, got 3');
    expectReject(() => parseJson('{"__metadata__":{"x":null}}'), 'value for "x" must be a string, got null');
    expectReject(() => parseJson('{"__metadata__":{"x":{"y":"z"}}}'), 'must be a string');
    expectReject(() => parseJson('{"__metadata__":["a"]}'), '"__metadata__" must be an object of strings');
    expectReject(() => parseJson('{"__metadata__":"pt"}'), '"__metadata__" must be an object of strings');
    expectReject(() => parseJson('{"__metadata__":null}'), '"__metadata__" must be an object of strings');
  });

  it('a tensor entry that is not an object', () => {
    expectReject(() => parseJson('{"w":[1,2]}'), 'tensor "w": entry must be an object, got [1,2]');
    expectReject(() => parseJson('{"w":"F32"}'), 'tensor "w": entry must be an object');
    expectReject(() => parseJson('{"w":null}'), 'tensor "w": entry must be an object, got null');
  });

  it('an extra or missing field', () => {
    expectReject(
      () => parseJson(JSON.stringify({ w: { ...t('U8', [1], [0, 1]), offset: 0 } }), 1),
      'tensor "w": unexpected field "offset"',
    );
    expectReject(() => parseJson('{"w":{"dtype":"U8","shape":[1]}}', 1), 'tensor "w": missing field "data_offsets"');
    expectReject(() => parseJson('{"w":{"shape":[1],"data_offsets":[0,1]}}', 1), 'missing field "dtype"');
  });

  it('an empty tensor name', () => {
    expectReject(() => parseJson(JSON.stringify({ '': t('U8', [1], [0, 1]) }), 1), 'empty name');
  });

  it('names tensors with JSON quoting so odd names stay readable', () => {
    const err = expectReject(() => parseJson(JSON.stringify({ 'a"b\n': t('XX', [1], [0, 1]) }), 1), 'unknown dtype');
    expect(err.message).toContain('tensor "a\\"b\\n"');
  });
});
