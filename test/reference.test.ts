/** The building blocks of lib/reference against known answers and the SPEC's rules. */
import { describe, expect, it } from 'vitest';
import { loadNative } from '../lib/native.js';
import { philox4x32_10, elementUniform, seedKey } from '../lib/reference/philox.js';
import { fnv1a32, tensorId } from '../lib/reference/fnv.js';
import { bf16ToF32, bitsF32, f16ToF32, f32ToBf16, f32ToF16, loadF32, loadF32Row, magnitudeKey, magnitudeKeys } from '../lib/reference/dtypes.js';
import { magpruneQ, stableRanks } from '../lib/reference/sparsify.js';
import { fuseElement } from '../lib/reference/fuse.js';
import { DTYPE_CODE, CONSENSUS_CODE, type DTypeCode } from '../lib/merge/task.js';
import { rng, testSeed } from './helpers/random.js';
import { reference } from '../lib/index.js';

// Random123's kat_vectors for philox4x32_10.
const KATS: Array<[number[], number[], number[]]> = [
  [[0, 0, 0, 0], [0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]],
  [[0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff], [0xffffffff, 0xffffffff], [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]],
  [[0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0], [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]],
];

describe('the reference namespace', () => {
  it('exports the codes its functions and MergeTaskSpec take (a dtype name was read as F32)', () => {
    expect(reference.DTYPE_CODE).toEqual({ F32: 0, F16: 1, BF16: 2, F64: 3 });
    expect(reference.SPARSIFIER_CODE.magprune).toBe(1);
    expect(reference.RESCALE_CODE.l2).toBe(3);
    expect(reference.CONSENSUS_CODE.sum).toBe(1);
    expect(reference.magnitudeKey(-1, reference.DTYPE_CODE.BF16)).toBe(0x3f80);
  });
});

describe('Philox4x32-10', () => {
  it('passes the known-answer vectors in the reference and the native kernels', () => {
    const native = loadNative();
    for (const [c, k, want] of KATS) {
      expect(philox4x32_10(c[0], c[1], c[2], c[3], k[0], k[1])).toEqual(want);
      expect(native.philoxBlock(c[0], c[1], c[2], c[3], k[0], k[1])).toEqual(want);
    }
  });

  it('agrees with the native generator on random counters and keys', () => {
    const seed = testSeed();
    const r = rng(seed);
    const native = loadNative();
    for (let t = 0; t < 2000; t++) {
      const a = Array.from({ length: 6 }, () => Math.floor(r() * 2 ** 32));
      expect(philox4x32_10(a[0], a[1], a[2], a[3], a[4], a[5]), `DELLA_TEST_SEED=${seed}`).toEqual(
        native.philoxBlock(a[0], a[1], a[2], a[3], a[4], a[5]));
    }
  });

  it('maps elements to counters and seeds to keys as SPEC §3 says', () => {
    expect(seedKey(0)).toEqual([0, 0]);
    expect(seedKey(2 ** 52 + 5)).toEqual([5, 2 ** 20]);
    const block = philox4x32_10(1, 0, 77, 2, 9, 0);
    expect(elementUniform(9, 77, 2, 6)).toBe((block[2] >>> 8) * 2 ** -24);
    const high = philox4x32_10(0, 1, 77, 0, 0, 0);
    expect(elementUniform(0, 77, 0, 4 * 2 ** 32 + 3)).toBe((high[3] >>> 8) * 2 ** -24);
  });
});

describe('FNV-1a tensor ids', () => {
  it('matches the published test values', () => {
    expect(fnv1a32(new Uint8Array())).toBe(0x811c9dc5);
    expect(tensorId('a')).toBe(0xe40c292c);
    expect(tensorId('foobar')).toBe(0xbf9cf968);
  });
  it('hashes UTF-8 bytes', () => {
    expect(tensorId('é')).toBe(fnv1a32(new Uint8Array([0xc3, 0xa9])));
  });
});

describe('half-precision conversions', () => {
  it('round-trip every F16 and BF16 pattern that is not NaN', () => {
    for (let h = 0; h < 0x10000; h++) {
      if ((h & 0x7c00) !== 0x7c00 || (h & 0x3ff) === 0) expect(f32ToF16(f16ToF32(h))).toBe(h);
      if ((h & 0x7f80) !== 0x7f80 || (h & 0x7f) === 0) expect(f32ToBf16(bf16ToF32(h))).toBe(h);
    }
  });
  it('round to nearest even at ties, overflow and subnormals', () => {
    expect(f32ToF16(65520)).toBe(0x7c00);
    expect(f32ToF16(65519.99)).toBe(0x7bff);
    expect(f32ToF16(2 ** -25)).toBe(0);
    expect(f32ToF16(1.5 * 2 ** -25)).toBe(1);
    expect(f32ToF16(3 * 2 ** -25)).toBe(2); // 1.5 ulps: tie, to even
    expect(f32ToF16(-0)).toBe(0x8000);
    expect(f32ToBf16(1.00390625)).toBe(0x3f80); // tie, to even
    expect(f32ToBf16(1.01171875)).toBe(0x3f82); // tie, to even (up)
    expect(f32ToBf16(NaN) & 0x7fc0).toBe(0x7fc0);
  });
  it('builds 15-bit keys from the base dtype', () => {
    expect(magnitudeKey(-1, DTYPE_CODE.F16)).toBe(0x3c00);
    expect(magnitudeKey(-1, DTYPE_CODE.BF16)).toBe(0x3f80);
    expect(magnitudeKey(-1, DTYPE_CODE.F32)).toBe(0x3f800000);
    expect(magnitudeKey(1e-9, DTYPE_CODE.F16)).toBe(0);
  });
  // The row-at-a-time forms (streamed.ts's passes over whole tensors) against the scalar ones.
  it('loads rows and builds keys as loadF32 and magnitudeKey do, element for element', () => {
    const seed = testSeed();
    const r = rng(seed);
    const n = 0x10000;
    // every half pattern; fp32 and fp64 bits drawn at random, specials included
    const words = new Uint32Array(2 * n);
    for (let i = 0; i < words.length; i++) words[i] = (r() * 2 ** 32) >>> 0;
    const specials = [0, 0x80000000, 0x7f800000, 0xff800000, 0x7fc00000, 0xffc00001, 0x7f800001, 1, 0x807fffff, 0x7f7fffff, 0x477ff000, 0x33000000];
    specials.forEach((v, i) => { words[i] = v; });
    const halves = Uint16Array.from({ length: n }, (_, h) => h);
    const cases: Array<[DTypeCode, Uint8Array]> = [
      [DTYPE_CODE.BF16, new Uint8Array(halves.buffer)],
      [DTYPE_CODE.F16, new Uint8Array(halves.buffer)],
      [DTYPE_CODE.F32, new Uint8Array(words.buffer, 0, 4 * n)],
      [DTYPE_CODE.F64, new Uint8Array(words.buffer)],
    ];
    for (const [dtype, bytes] of cases) {
      for (const shift of [0, 1, 3]) { // aligned, and not: the row is copied first
        const held = new Uint8Array(bytes.byteLength + 8);
        held.set(bytes, shift);
        const view = held.subarray(shift);
        const from = 5, m = n - 9;
        const row = new Float32Array(m);
        loadF32Row(view, dtype, from, m, row);
        const dv = new DataView(view.buffer, view.byteOffset, view.byteLength);
        for (let j = 0; j < m; j++) {
          const want = loadF32(dv, dtype, from + j);
          if (!Object.is(row[j], want) && !(Number.isNaN(row[j]) && Number.isNaN(want))) {
            expect(row[j], `dtype ${dtype}, element ${from + j}, byte shift ${shift} (DELLA_TEST_SEED=${seed})`).toBe(want);
          }
        }
      }
    }
    // a view shorter than the row is an error, not a read of the bytes beyond it
    const short = new Uint8Array(new ArrayBuffer(64), 0, 12);
    expect(() => loadF32Row(short, DTYPE_CODE.F32, 2, 2, new Float32Array(2))).toThrow(RangeError);
    expect(() => loadF32Row(short, DTYPE_CODE.BF16, 5, 1, new Float32Array(1))).not.toThrow();
    const values = new Float32Array(words.buffer, 0, n);
    for (const base of [DTYPE_CODE.BF16, DTYPE_CODE.F16, DTYPE_CODE.F32, DTYPE_CODE.F64] as DTypeCode[]) {
      const keys = new Uint32Array(n);
      magnitudeKeys(values, base, n, keys);
      for (let j = 0; j < n; j++) {
        if (keys[j] !== magnitudeKey(bitsF32(words[j]), base)) {
          expect(keys[j], `base dtype ${base}, bits 0x${words[j].toString(16)} (DELLA_TEST_SEED=${seed})`).toBe(magnitudeKey(bitsF32(words[j]), base));
        }
      }
    }
  });
});

describe('ranks and keep probabilities', () => {
  it('ranks ascending and stable', () => {
    expect(Array.from(stableRanks([5, 1, 5, 0, 1]))).toEqual([3, 1, 4, 0, 2]);
    expect(Array.from(stableRanks([7]))).toEqual([0]);
  });
  it('spreads keep probability linearly over the window', () => {
    expect(magpruneQ(0, 11, 0.5, 0.1)).toBe(Math.fround(0.4));
    expect(magpruneQ(10, 11, 0.5, 0.1)).toBe(Math.fround(Math.fround(0.4) + Math.fround(0.2)));
    expect(magpruneQ(0, 1, 0.5, 0.1)).toBe(Math.fround(Math.fround(0.4) + Math.fround(Math.fround(0.2) * 0.5)));
  });
});

describe('election and fuse', () => {
  const w = [1, 1, 1];
  it('keeps the experts that agree with the elected sign and averages them', () => {
    expect(fuseElement([0.5, -0.25, 0.25], w, { consensus: CONSENSUS_CODE.sum, normalize: true, lambda: 1 }))
      .toBe(Math.fround(0.75 / 2));
    expect(fuseElement([0.5, -0.25, -0.5], w, { consensus: CONSENSUS_CODE.sum, normalize: true, lambda: 1 }))
      .toBe(Math.fround(-0.75 / 2));
    // count: two negatives beat one large positive
    expect(fuseElement([2, -0.25, -0.5], w, { consensus: CONSENSUS_CODE.count, normalize: true, lambda: 1 }))
      .toBe(Math.fround(-0.75 / 2));
  });
  it('treats an empty agreement as zero and skips normalization by default', () => {
    expect(fuseElement([0, 0, 0], w, { consensus: CONSENSUS_CODE.sum, normalize: true, lambda: 1 })).toBe(0);
    expect(fuseElement([0.5, 0.25, 0], [0.5, 0.5, 1], { consensus: CONSENSUS_CODE.none, normalize: false, lambda: 2 }))
      .toBe(1.5);
  });
});
