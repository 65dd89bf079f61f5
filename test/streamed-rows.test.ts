// lib/reference/streamed.ts recomputes rows of tensors whose sparsifier or rescale looks
// at the whole tensor, in memory bounded by a row: its rows must equal those of
// referenceMergeTensor (the executable SPEC, which holds the whole tensor) bit for bit,
// with the same probe values, on fresh random tasks.
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { saveModel } from '../lib/index.js';
import { openInput } from '../lib/checkpoint/model.js';
import { streamedMergeRows } from '../lib/reference/streamed.js';
import { tempDir } from './helpers/models.js';
import { CONSENSUS_CODE, DTYPE_CODE, RESCALE_CODE, SPARSIFIER_CODE, type DTypeCode, type MergeTaskSpec } from '../lib/merge/task.js';
import { dtypeSize } from '../lib/reference/dtypes.js';
import { referenceMergeTensor } from '../lib/reference/merge-tensor.js';
import { needsWholeTensor, referenceMergeInto, referenceMergeRows } from '../lib/reference/rows.js';
import { drawBaseAndExperts, tensorBytes } from './helpers/tensors.js';
import { int, pick, rng, testSeed } from './helpers/random.js';

const seed = testSeed();
const DTYPES: DTypeCode[] = [DTYPE_CODE.BF16, DTYPE_CODE.F16, DTYPE_CODE.F32, DTYPE_CODE.F64];

/** The bytes at an odd address, sometimes: typed arrays cannot view them in place. */
function placed(r: () => number, bytes: Uint8Array): Uint8Array {
  if (r() < 0.7) return bytes;
  const held = new Uint8Array(bytes.byteLength + 1);
  held.set(bytes, 1);
  return held.subarray(1);
}

function randomTask(r: () => number, i: number): MergeTaskSpec {
  const rows = int(r, 1, 12), n = pick(r, [1, 2, 7, 64, 300]);
  const shape = r() < 0.15 ? [rows * n] : [rows, n];
  const numel = rows * n;
  const K = int(r, 1, 3);
  const sparsifier = pick(r, [SPARSIFIER_CODE.magnitude, SPARSIFIER_CODE.breadcrumbs, SPARSIFIER_CODE.magprune, SPARSIFIER_CODE.random]);
  const norms = [RESCALE_CODE.l1, RESCALE_CODE.l2, RESCALE_CODE.linf];
  // magprune and random need the whole tensor only for a norm rescale
  const rescale = sparsifier === SPARSIFIER_CODE.magprune || sparsifier === SPARSIFIER_CODE.random || r() < 0.5
    ? pick(r, norms) : pick(r, [RESCALE_CODE.none, RESCALE_CODE.inverse]);
  const baseDtype = pick(r, DTYPES), outDtype = pick(r, DTYPES);
  // Few distinct values sometimes: ties at the cuts, all within one 16-bit key bin or not.
  const drawn = drawBaseAndExperts(r, numel, K, r() < 0.3 ? 1e-3 : 0.02);
  if (r() < 0.3) for (const e of drawn.experts) for (let j = 0; j < numel; j++) e[j] = drawn.base[j] + Math.round((e[j] - drawn.base[j]) * 2000) / 2000;
  return {
    name: `t${i}`,
    base: placed(r, tensorBytes(drawn.base, baseDtype)),
    baseDtype,
    out: new Uint8Array(numel * dtypeSize(outDtype)),
    outDtype,
    shape,
    experts: drawn.experts.map((e) => {
      const dtype = pick(r, DTYPES);
      return {
        data: placed(r, tensorBytes(e, dtype)), dtype, shape, weight: pick(r, [1, 0.5, -0.7, 1.3]),
        density: pick(r, [0, 0.1, 0.5, 0.9, 1, 1 / 3]), epsilon: pick(r, [0, 0.05, 0.1]), gamma: pick(r, [0, 0.01, 0.2, 1]),
      };
    }),
    sparsifier,
    rescale,
    consensus: pick(r, [CONSENSUS_CODE.none, CONSENSUS_CODE.sum, CONSENSUS_CODE.count]),
    normalize: r() < 0.5,
    lambda: pick(r, [1, 0.7]),
    seed: int(r, 0, 1e9),
  };
}

describe(`streamed whole-tensor rows equal the reference's (DELLA_TEST_SEED=${seed})`, () => {
  it('on 300 random tasks: every row, and some rows alone, with the probe', () => {
    const r = rng(seed);
    for (let i = 0; i < 300; i++) {
      const t = randomTask(r, i);
      expect(needsWholeTensor(t)).toBe(true);
      const numel = t.shape.reduce((a, b) => a * b, 1);
      const n = t.shape.length >= 2 ? t.shape[t.shape.length - 1] : numel;
      const rows = numel / n;
      const whole = new Map<number, number[][]>();
      referenceMergeTensor(t, (idx, raw, sparse, m) => whole.set(idx, [[...raw], [...sparse], [m]]));
      const size = dtypeSize(t.outDtype);
      const asked = r() < 0.5 ? Array.from({ length: rows }, (_, k) => k) : [int(r, 0, rows - 1), rows - 1, 0];
      const seen = new Map<number, number[][]>();
      const got = referenceMergeRows(t, asked, (idx, raw, sparse, m) => seen.set(idx, [[...raw], [...sparse], [m]]));
      const label = `task ${i} (DELLA_TEST_SEED=${seed}): sparsifier ${t.sparsifier} rescale ${t.rescale} shape [${t.shape}]`;
      if (i === 0) expect(() => streamedMergeRows(t, [rows])).toThrow(RangeError);
      // The cuts' counts before each row from a third pass rather than histogram copies.
      const counted = streamedMergeRows(t, asked, undefined, { snapshotBytes: 0 });
      asked.forEach((row, k) => {
        const want = (t.out as Uint8Array).subarray(row * n * size, (row + 1) * n * size);
        expect(Buffer.from(got.rows[k] as Uint8Array).equals(Buffer.from(want)), `${label}, row ${row}`).toBe(true);
        expect(Buffer.from(counted.rows[k] as Uint8Array).equals(Buffer.from(want)), `${label}, row ${row}, counted in a third pass`).toBe(true);
        for (let j = row * n; j < (row + 1) * n; j++) expect(seen.get(j), `${label}, element ${j}`).toEqual(whole.get(j));
      });
    }
  });

  it('the reference backend merges large tensors row by row: the same bytes and statistics as whole', () => {
    const r = rng(seed ^ 0xb16);
    for (let i = 0; i < 150; i++) {
      const t = randomTask(r, i);
      // row-local tasks too (DARE and DELLA rescaled by 1/q, task arithmetic), and tasks without a base (linear)
      const variant = pick(r, ['whole', 'rows', 'none', 'linear']);
      if (variant === 'rows') {
        t.sparsifier = pick(r, [SPARSIFIER_CODE.magprune, SPARSIFIER_CODE.random]);
        t.rescale = pick(r, [RESCALE_CODE.none, RESCALE_CODE.inverse]);
      } else if (variant === 'none' || variant === 'linear') {
        t.sparsifier = SPARSIFIER_CODE.none;
        t.rescale = RESCALE_CODE.none;
        if (variant === 'linear') t.base = null;
      }
      const whole = { ...t, out: new Uint8Array(t.out.byteLength).fill(0xa5) };
      const want = referenceMergeTensor(whole);
      const byRows = { ...t, out: new Uint8Array(t.out.byteLength).fill(0x5a) }; // poisoned: unwritten bytes show
      const got = referenceMergeInto(byRows, 0);
      const label = `task ${i} (${variant}, DELLA_TEST_SEED=${seed}): sparsifier ${t.sparsifier} rescale ${t.rescale} shape [${t.shape}]`;
      expect(Buffer.from(byRows.out).equals(Buffer.from(whole.out)), label).toBe(true);
      expect(got, label).toEqual(want);
    }
    // results that overflow the output dtype (float16 past 65504) are counted alike; the
    // shape is fixed, since a random one of one element keeps nothing at density 0.5
    const t = randomTask(rng(seed), 0);
    t.shape = [4, 16];
    const numel = 64;
    t.base = tensorBytes(new Float64Array(numel).fill(65000), DTYPE_CODE.F32);
    t.baseDtype = DTYPE_CODE.F32;
    t.outDtype = DTYPE_CODE.F16;
    t.experts = t.experts.map((e) => ({ ...e, data: tensorBytes(new Float64Array(numel).fill(66000), DTYPE_CODE.F32), dtype: DTYPE_CODE.F32, shape: t.shape, density: 0.5, weight: 1 }));
    for (const sparsifier of [SPARSIFIER_CODE.none, SPARSIFIER_CODE.magnitude]) {
      const whole = { ...t, sparsifier, out: new Uint8Array(numel * 2) }, byRows = { ...whole, out: new Uint8Array(numel * 2).fill(0x5a) };
      const want = referenceMergeTensor(whole);
      expect(want.outNonfinite).toBeGreaterThan(0);
      expect(referenceMergeInto(byRows, 0)).toEqual(want);
      expect(Buffer.from(byRows.out).equals(Buffer.from(whole.out))).toBe(true);
    }
  });

  it('reads mapped inputs a block of rows at a time, experts larger than the base included', () => {
    const r = rng(seed ^ 0x5eed);
    const dir = tempDir('della-streamed-');
    for (let i = 0; i < 40; i++) {
      const t = randomTask(r, i);
      if (t.shape.length < 2) continue;
      // One expert larger in every dimension (the embedding rule): its rows are strided.
      const [rows, n] = t.shape;
      const big = [rows + 2, n + 3];
      const e0 = t.experts[0];
      const src = e0.data as Uint8Array, size = dtypeSize(e0.dtype);
      const wide = new Uint8Array(big[0] * big[1] * size);
      for (let row = 0; row < rows; row++) wide.set(src.subarray(row * n * size, (row + 1) * n * size), row * big[1] * size);
      const dt = (c: DTypeCode) => (['F32', 'F16', 'BF16', 'F64'] as const)[c];
      saveModel(join(dir, `m${i}`), [
        { name: 'base', dtype: dt(t.baseDtype), shape: t.shape, data: t.base as Uint8Array },
        { name: 'e0', dtype: dt(e0.dtype), shape: big, data: wide },
        ...t.experts.slice(1).map((e, k) => ({ name: `e${k + 1}`, dtype: dt(e.dtype), shape: t.shape, data: e.data as Uint8Array })),
      ]);
      const whole = { ...t, experts: [{ ...e0, data: wide, shape: big }, ...t.experts.slice(1)] };
      referenceMergeTensor(whole);
      const outSize = dtypeSize(t.outDtype), out = t.out as Uint8Array;
      const want = [0, rows - 1].map((row) => [...out.subarray(row * n * outSize, (row + 1) * n * outSize)]);
      const c = openInput(join(dir, `m${i}`));
      try {
        const mapped: MergeTaskSpec = {
          ...t,
          base: c.slice('base'),
          experts: t.experts.map((e, k) => ({ ...e, data: c.slice(`e${k}`), shape: k === 0 ? big : t.shape })),
        };
        // blocks of about one row, and of three
        for (const block of [1, 3 * n * 4]) {
          const got = streamedMergeRows(mapped, [0, rows - 1], undefined, { blockBytes: block });
          expect(got.rows.map((b) => [...(b as Uint8Array)]), `task ${i} (DELLA_TEST_SEED=${seed}), blocks of ${block} bytes`).toEqual(want);
        }
      } finally {
        c.close();
      }
    }
  });
});
