/**
 * Native CPU kernels against lib/reference, bit for bit, on fresh random inputs:
 * shapes (rows of length 1, 1-D tensors, rows over 64k, scalars, sub-blocks), dtypes,
 * densities, epsilons, seeds and methods, for one and several threads. Outputs are
 * poisoned first so unwritten elements show.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadNative } from '../lib/native.js';
import { CONSENSUS_CODE, DTYPE_CODE, RESCALE_CODE, SPARSIFIER_CODE, type DTypeCode, type MergeTaskSpec } from '../lib/merge/task.js';
import { referenceDots, referenceMergeTensor } from '../lib/reference/merge-tensor.js';
import { dtypeSize } from '../lib/reference/dtypes.js';
import { drawBaseAndExperts, poisoned, tensorBytes } from './helpers/tensors.js';
import { tempDir } from './helpers/models.js';
import { int, pick, rng, testSeed } from './helpers/random.js';

const native = loadNative();
const seed = testSeed();
const DTYPES: DTypeCode[] = [DTYPE_CODE.F32, DTYPE_CODE.F16, DTYPE_CODE.BF16, DTYPE_CODE.F64];

const METHODS = {
  della: { sparsifier: SPARSIFIER_CODE.magprune, consensus: CONSENSUS_CODE.sum, normalize: true, rescale: RESCALE_CODE.inverse },
  della_linear: { sparsifier: SPARSIFIER_CODE.magprune, consensus: CONSENSUS_CODE.none, normalize: false, rescale: RESCALE_CODE.inverse },
  della_norescale: { sparsifier: SPARSIFIER_CODE.magprune, consensus: CONSENSUS_CODE.count, normalize: true, rescale: RESCALE_CODE.none },
  dare_ties: { sparsifier: SPARSIFIER_CODE.random, consensus: CONSENSUS_CODE.sum, normalize: false, rescale: RESCALE_CODE.inverse },
  dare_linear: { sparsifier: SPARSIFIER_CODE.random, consensus: CONSENSUS_CODE.none, normalize: false, rescale: RESCALE_CODE.inverse },
  task_arithmetic: { sparsifier: SPARSIFIER_CODE.none, consensus: CONSENSUS_CODE.none, normalize: false, rescale: RESCALE_CODE.none },
  ties: { sparsifier: SPARSIFIER_CODE.magnitude, consensus: CONSENSUS_CODE.sum, normalize: true, rescale: RESCALE_CODE.none },
  ties_l1: { sparsifier: SPARSIFIER_CODE.magnitude, consensus: CONSENSUS_CODE.sum, normalize: true, rescale: RESCALE_CODE.l1 },
  breadcrumbs: { sparsifier: SPARSIFIER_CODE.breadcrumbs, consensus: CONSENSUS_CODE.none, normalize: false, rescale: RESCALE_CODE.none },
  breadcrumbs_ties_l2: { sparsifier: SPARSIFIER_CODE.breadcrumbs, consensus: CONSENSUS_CODE.sum, normalize: false, rescale: RESCALE_CODE.l2 },
  della_linf: { sparsifier: SPARSIFIER_CODE.magprune, consensus: CONSENSUS_CODE.sum, normalize: true, rescale: RESCALE_CODE.linf },
  dare_l1: { sparsifier: SPARSIFIER_CODE.random, consensus: CONSENSUS_CODE.count, normalize: true, rescale: RESCALE_CODE.l1 },
  linear: { sparsifier: SPARSIFIER_CODE.none, consensus: CONSENSUS_CODE.none, normalize: true, rescale: RESCALE_CODE.none },
} as const;

function numelOf(shape: number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** Draws one random task; `outBytes()` makes a poisoned output buffer for it. */
function drawTask(r: () => number, shape: number[], method: keyof typeof METHODS, subBlock = false) {
  const K = int(r, 1, 4);
  const numel = numelOf(shape);
  const baseDtype = pick(r, DTYPES);
  const outDtype = r() < 0.7 ? baseDtype : pick(r, DTYPES);
  const expertShape = subBlock ? shape.map((d) => d + int(r, 1, 3)) : shape;
  const { base, experts } = drawBaseAndExperts(r, numelOf(expertShape), K);
  const density = pick(r, [1, 0.9, 0.5, 0.3, 0.1, 0.05, r() * 0.9 + 0.05]);
  const task: MergeTaskSpec = {
    name: `model.layers.${int(r, 0, 40)}.mlp.w${int(r, 0, 1e6)}`,
    base: method === 'linear' ? null : tensorBytes(base.subarray(0, numel), baseDtype),
    baseDtype,
    out: new Uint8Array(0),
    outDtype,
    shape,
    experts: experts.map((values) => {
      const dtype = r() < 0.8 ? baseDtype : pick(r, DTYPES);
      const d = density === 1 ? 1 : Math.min(1, Math.max(0.02, density + (r() - 0.5) * 0.1));
      const eps = d >= 1 ? 0.15 : Math.min(d, 1 - d) * r() * 0.999;
      return {
        data: tensorBytes(values, dtype), dtype, shape: expertShape,
        weight: pick(r, [1, 0.5, 0.3 + r(), -0.5, 0]), density: d, epsilon: eps, gamma: pick(r, [0, 0.01, 0.1, r() * 0.5]),
      };
    }),
    ...METHODS[method],
    lambda: pick(r, [1, 1.1, 0.7]),
    seed: pick(r, [0, 42, int(r, 0, 2 ** 31), 2 ** 52 + int(r, 0, 1000)]),
  };
  return task;
}

async function compare(task: MergeTaskSpec, threads: number, label: string) {
  const bytes = numelOf(task.shape) * dtypeSize(task.outDtype);
  const ref = { ...task, out: poisoned(bytes) };
  const nat = { ...task, out: poisoned(bytes) };
  const refStats = referenceMergeTensor(ref);
  // Several threads also hash the output as its work items finish (as `run` asks).
  const digests = threads > 1;
  const [natStats] = await native.mergeBatch({ threads, merges: [nat], copies: [], digests });
  const a = ref.out as Uint8Array, b = nat.out as Uint8Array;
  let first = -1;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) { first = i; break; }
  expect(first, `${label}: first differing byte ${first} (DELLA_TEST_SEED=${seed})`).toBe(-1);
  const { xxh64, ...counts } = natStats;
  expect(xxh64, `${label} digest (DELLA_TEST_SEED=${seed})`).toBe(digests ? native.xxh64(b) : undefined);
  expect(counts, `${label} stats (DELLA_TEST_SEED=${seed})`).toEqual(refStats);
}

describe(`native CPU kernels equal lib/reference (DELLA_TEST_SEED=${seed})`, () => {
  const shapes: Array<[string, (r: () => number) => number[]]> = [
    ['2-D', (r) => [int(r, 1, 40), int(r, 2, 300)]],
    ['rows of length 1', (r) => [int(r, 1, 50), 1]],
    ['1-D', (r) => [int(r, 1, 5000)]],
    ['scalar', () => []],
    ['3-D', (r) => [int(r, 1, 4), int(r, 1, 6), int(r, 1, 70)]],
    ['rows over 64k', (r) => [int(r, 1, 2), 65536 + int(r, 1, 5000)]],
    ['zero-size', (r) => [0, int(r, 1, 9)]],
  ];
  for (const method of Object.keys(METHODS) as Array<keyof typeof METHODS>) {
    for (const [label, shapeOf] of shapes) {
      it(`${method}, ${label}`, async () => {
        const r = rng(seed ^ (label.length * 7919 + method.length * 104729));
        const trials = label === 'rows over 64k' ? 1 : 3;
        for (let t = 0; t < trials; t++) {
          const task = drawTask(r, shapeOf(r), method);
          for (const threads of [1, 3]) await compare(task, threads, `${method} ${JSON.stringify(task.shape)} threads=${threads}`);
        }
      });
    }
  }

  it('merged values beyond float16\'s range: stored as infinities and counted alike (outNonfinite)', async () => {
    const r = rng(seed ^ 0x0f16);
    const overflowed: Record<string, number> = {};
    for (const method of ['della', 'dare_ties', 'ties', 'breadcrumbs', 'task_arithmetic', 'linear'] as const) {
      const task = drawTask(r, [int(r, 2, 12), int(r, 200, 400)], method);
      const numel = numelOf(task.shape);
      // Bases spread to about ±65000 and experts up to 20000 away, weighted 1: some merged
      // values pass 65504 (sparsified ones less often), every input stays finite in F32.
      const base = Float32Array.from({ length: numel }, () => (r() - 0.5) * 130_000);
      task.baseDtype = DTYPE_CODE.F32;
      task.outDtype = DTYPE_CODE.F16;
      if (method === 'linear') {
        task.normalize = false; // a sum of the experts, not their mean
        task.lambda = 1;
      }
      if (task.base) task.base = tensorBytes(base, DTYPE_CODE.F32);
      for (const e of task.experts) {
        e.dtype = DTYPE_CODE.F32;
        e.shape = task.shape;
        e.weight = 1;
        e.data = tensorBytes(base.map((b) => b + (r() - 0.5) * 40_000), DTYPE_CODE.F32);
      }
      const stats = referenceMergeTensor({ ...task, out: poisoned(numel * 2) });
      expect(stats.nonfinite.every((c) => c === 0), method).toBe(true);
      overflowed[method] = stats.outNonfinite;
      for (const threads of [1, 3]) await compare(task, threads, `${method} overflow ${JSON.stringify(task.shape)} threads=${threads}`);
    }
    // Dense merges overflow for certain; a sparse one may keep none of the deltas that would.
    expect(overflowed.task_arithmetic, `DELLA_TEST_SEED=${seed}`).toBeGreaterThan(0);
    expect(overflowed.linear, `DELLA_TEST_SEED=${seed}`).toBeGreaterThan(0);
    expect(Object.values(overflowed).filter((c) => c > 0).length, `${JSON.stringify(overflowed)} DELLA_TEST_SEED=${seed}`).toBeGreaterThanOrEqual(4);
  });

  it('whole-tensor cuts over many work items: the counts of cut keys stop after the cut', async () => {
    // 520 rows of 1024: work items of 64 rows, so the counting runs in several waves and
    // stops before the last rows wherever the cut falls earlier.
    const r = rng(seed ^ 0x5eed);
    for (const method of ['ties', 'ties_l1', 'breadcrumbs'] as const) {
      for (let t = 0; t < 2; t++) {
        const task = drawTask(r, [520, 1024], method);
        for (const threads of [1, 2]) await compare(task, threads, `${method} [520,1024] threads=${threads}`);
      }
    }
  }, 120_000);

  // One test per DELLA_CUT_BRACKET mode: together they ran over a minute under ASan, and a
  // test that long loses vitest's worker RPC ("Timeout calling onTaskUpdate").
  for (const [m, mode] of ['', 'miss', 'overfull', 'off'].entries()) it(`whole-tensor cuts: the sampled key bracket, its fallback and full histograms all equal the reference (DELLA_CUT_BRACKET=${mode || 'unset'})`, async () => {
    // Every base takes a key bracket chosen on a sample of 16384 elements (half
    // precision: counted; fp32 keys: listed); DELLA_CUT_BRACKET=miss shifts every
    // bracket off its cut and =overfull leaves fp32 lists no room (the exact fallback
    // runs either way), =off skips the bracket. Experts a
    // few units in the last place from the base put millions of equal keys around the
    // cuts, as in fine-tuned checkpoints.
    const r = rng(seed ^ 0xb7ac ^ (m << 20));
    const fewUlp = (task: MergeTaskSpec) => {
      if (task.baseDtype === DTYPE_CODE.F32) {
        const base = new Uint32Array((task.base as Uint8Array).slice().buffer);
        for (const [k, e] of task.experts.entries()) {
          if (e.dtype !== task.baseDtype || JSON.stringify(e.shape) !== JSON.stringify(task.shape)) continue;
          const bits = base.map((b) => {
            const x = (b + int(r, -4, 3) * (k + 1)) >>> 0;
            return (x & 0x7f800000) === 0x7f800000 ? b : x;
          });
          e.data = new Uint8Array(bits.buffer);
        }
        return;
      }
      if (task.baseDtype !== DTYPE_CODE.BF16 && task.baseDtype !== DTYPE_CODE.F16) return;
      const base = new Uint16Array((task.base as Uint8Array).slice().buffer);
      for (const [k, e] of task.experts.entries()) {
        if (e.dtype !== task.baseDtype || JSON.stringify(e.shape) !== JSON.stringify(task.shape)) continue;
        const inf = task.baseDtype === DTYPE_CODE.BF16 ? 0x7f80 : 0x7c00;
        const bits = base.map((b) => {
          const x = (b + int(r, -4, 3) * (k + 1)) & 0xffff;
          return (x & inf) === inf ? b : x; // stays finite (near zero the bits would wrap to NaN)
        });
        e.data = new Uint8Array(bits.buffer);
      }
    };
    try {
      if (mode) process.env.DELLA_CUT_BRACKET = mode;
      else delete process.env.DELLA_CUT_BRACKET;
      for (const method of ['ties', 'breadcrumbs', 'breadcrumbs_ties_l2'] as const) {
        for (const [ulp, half] of [[false, true], [true, true], [false, false], [true, false]]) {
          const task = drawTask(r, [int(r, 150, 300), 2048], method);
          task.baseDtype = half ? pick(r, [DTYPE_CODE.BF16, DTYPE_CODE.F16]) : pick(r, [DTYPE_CODE.F32, DTYPE_CODE.F64]);
          const values = new Float64Array(numelOf(task.shape)).map(() => (r() - 0.5) * 0.04);
          task.base = tensorBytes(values, task.baseDtype);
          if (ulp) fewUlp(task);
          await compare(task, 2, `${method} ${JSON.stringify(task.shape)} base dtype ${task.baseDtype} few-ulp=${ulp} DELLA_CUT_BRACKET=${mode}`);
        }
      }
    } finally {
      delete process.env.DELLA_CUT_BRACKET;
    }
  }, 300_000);

  it('embedding sub-blocks read the leading block of a larger expert', async () => {
    const r = rng(seed + 1);
    for (const shape of [[7, 13], [9], [2, 3, 5]]) {
      const task = drawTask(r, shape, 'della', true);
      await compare(task, 2, `sub-block ${JSON.stringify(shape)}`);
    }
  });

  it('a batch of many small tensors equals tensor-by-tensor results for any thread count', async () => {
    const r = rng(seed + 2);
    const tasks = Array.from({ length: 20 }, () => drawTask(r, [int(r, 1, 30), int(r, 1, 90)], 'della'));
    const outputs = async (threads: number) => {
      const merges = tasks.map((t) => ({ ...t, out: poisoned(numelOf(t.shape) * dtypeSize(t.outDtype)) }));
      const stats = await native.mergeBatch({ threads, merges, copies: [], digests: true });
      // Each task's digest covers its own output, whichever thread hashed which rows.
      stats.forEach((st, i) => expect(st.xxh64, `task ${i} digest, ${threads} threads`).toBe(native.xxh64(merges[i].out as Uint8Array)));
      return merges.map((m) => Buffer.from(m.out as Uint8Array).toString('hex'));
    };
    const one = await outputs(1);
    expect(await outputs(2)).toEqual(one);
    expect(await outputs(7)).toEqual(one);
    for (const [i, t] of tasks.entries()) {
      const ref = { ...t, out: poisoned(numelOf(t.shape) * dtypeSize(t.outDtype)) };
      referenceMergeTensor(ref);
      expect(Buffer.from(ref.out as Uint8Array).toString('hex'), `task ${i} (DELLA_TEST_SEED=${seed})`).toBe(one[i]);
    }
  });

  it('slerp sums (dot and squared norms) equal the reference', async () => {
    const r = rng(seed + 3);
    for (const shape of [[int(r, 1, 30), int(r, 1, 200)], [int(r, 1, 3000)], [], [2, 70000]]) {
      const numel = numelOf(shape);
      const { base, experts } = drawBaseAndExperts(r, numel, 1);
      const aDtype = pick(r, DTYPES), bDtype = pick(r, DTYPES);
      const task = { a: tensorBytes(base, aDtype), aDtype, b: tensorBytes(experts[0], bDtype), bDtype, shape };
      const [got] = await native.dotBatch({ threads: 2, tasks: [task] });
      expect(got, `slerp sums ${JSON.stringify(shape)} (DELLA_TEST_SEED=${seed})`).toEqual(referenceDots(task));
    }
  });

  it('non-finite inputs (--allow-nonfinite): every NaN is stored as the canonical NaN, equal to the reference', async () => {
    // NaNs of both signs, quiet and signaling, with payloads, and infinities, in the
    // base and the experts of every dtype: the bytes of a NaN depend on the hardware
    // (and on the JavaScript engine), so a stored NaN is always the dtype's canonical
    // quiet NaN, and all NaNs share one magnitude key.
    const r = rng(seed ^ 0x7a7a);
    const nonFiniteBits: Record<DTypeCode, number[]> = {
      [DTYPE_CODE.F32]: [0x7fc00000, 0xffc00000, 0x7f800001, 0xff812345, 0x7f800000, 0xff800000],
      [DTYPE_CODE.F16]: [0x7e00, 0xfe00, 0x7c01, 0xfd55, 0x7c00, 0xfc00],
      [DTYPE_CODE.BF16]: [0x7fc0, 0xffc0, 0x7f81, 0xffa5, 0x7f80, 0xff80],
      [DTYPE_CODE.F64]: [],
    } as Record<DTypeCode, number[]>;
    const sprinkle = (bytes: Uint8Array, dtype: DTypeCode) => {
      const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      const size = dtypeSize(dtype);
      for (let i = 0; i < bytes.length / size; i++) {
        if (r() > 0.05) continue;
        if (dtype === DTYPE_CODE.F64) dv.setFloat64(8 * i, pick(r, [NaN, Infinity, -Infinity]), true);
        else if (size === 4) dv.setUint32(4 * i, pick(r, nonFiniteBits[dtype]), true);
        else dv.setUint16(2 * i, pick(r, nonFiniteBits[dtype]), true);
      }
    };
    for (const method of Object.keys(METHODS) as Array<keyof typeof METHODS>) {
      for (let t = 0; t < 2; t++) {
        const task = drawTask(r, [int(r, 1, 30), int(r, 2, 200)], method);
        if (task.base) sprinkle(task.base as Uint8Array, task.baseDtype);
        for (const e of task.experts) sprinkle(e.data as Uint8Array, e.dtype);
        await compare(task, 2, `${method} ${JSON.stringify(task.shape)} with non-finite inputs`);
      }
    }
  });

  it('counts non-finite inputs per model', async () => {
    const base = tensorBytes([1, NaN, 3, 4], DTYPE_CODE.F32);
    const e = tensorBytes([Infinity, 2, -Infinity, 4], DTYPE_CODE.F32);
    const task: MergeTaskSpec = {
      name: 't', base, baseDtype: DTYPE_CODE.F32, out: poisoned(16), outDtype: DTYPE_CODE.F32, shape: [4],
      experts: [{ data: e, dtype: DTYPE_CODE.F32, shape: [4], weight: 1, density: 1, epsilon: 0, gamma: 0 }],
      ...METHODS.della, lambda: 1, seed: 0,
    };
    const [stats] = await native.mergeBatch({ threads: 1, merges: [task], copies: [] });
    expect(stats.nonfinite).toEqual([1, 2]);
  });

  it('rejects buffers that do not match their shape and dtype', async () => {
    const task: MergeTaskSpec = {
      name: 't', base: new Uint8Array(10), baseDtype: DTYPE_CODE.F32, out: new Uint8Array(16), outDtype: DTYPE_CODE.F32,
      shape: [4], experts: [], ...METHODS.della, lambda: 1, seed: 0,
    };
    expect(() => native.mergeBatch({ threads: 1, merges: [task], copies: [] })).toThrow(/merges\[0\]\.base has 10 bytes/);
    const fine = { ...task, base: new Uint8Array(16), experts: [{ data: new Uint8Array(16), dtype: DTYPE_CODE.F32, shape: [4], weight: 1, density: 1, epsilon: 0, gamma: 0 }] };
    expect(() => native.mergeBatch({ threads: 1, merges: [fine], copies: [], digests: 'yes' as unknown as boolean })).toThrow(/batch\.digests must be a boolean/);
  });

  it('a task without a base and a norm rescale equals the reference (it read the missing base: SIGSEGV)', async () => {
    for (const rescale of ['l1', 'l2', 'linf'] as const) {
      const task: MergeTaskSpec = {
        name: 't', base: null, baseDtype: DTYPE_CODE.F32, out: poisoned(8), outDtype: DTYPE_CODE.F32, shape: [2],
        experts: [{ data: new Float32Array([0.5, -2]), dtype: DTYPE_CODE.F32, shape: [2], weight: 1, density: 1, epsilon: 0, gamma: 0 }],
        sparsifier: SPARSIFIER_CODE.none, rescale: RESCALE_CODE[rescale], consensus: CONSENSUS_CODE.none, normalize: true, lambda: 1, seed: 0,
      };
      const ref = { ...task, out: poisoned(8) };
      referenceMergeTensor(ref);
      await native.mergeBatch({ threads: 2, merges: [task], copies: [] });
      expect(Array.from(new Float32Array((task.out as Uint8Array).buffer)), rescale).toEqual([0.5, -2]);
      expect(task.out).toEqual(ref.out);
    }
  });

  it('refuses a density that is NaN or negative, and a breadcrumbs gamma outside [0, 1] (they merged unlike the reference)', () => {
    const task = (sparsifier: keyof typeof SPARSIFIER_CODE, density: number, gamma: number): MergeTaskSpec => ({
      name: 't', base: new Float32Array(8), baseDtype: DTYPE_CODE.F32, out: new Uint8Array(32), outDtype: DTYPE_CODE.F32, shape: [8],
      experts: [{ data: new Float32Array([1, 2, 3, 4, 5, 6, 7, 8]), dtype: DTYPE_CODE.F32, shape: [8], weight: 1, density, epsilon: 0, gamma }],
      sparsifier: SPARSIFIER_CODE[sparsifier], rescale: RESCALE_CODE.none, consensus: CONSENSUS_CODE.sum, normalize: true, lambda: 1, seed: 0,
    });
    const run = (t: MergeTaskSpec) => () => native.mergeBatch({ threads: 1, merges: [t], copies: [] });
    for (const s of ['random', 'magprune', 'magnitude', 'breadcrumbs'] as const) {
      for (const d of [NaN, -0.5, -1e-300, -Infinity]) expect(run(task(s, d, 0.1)), `${s} ${d}`).toThrow(/merges\[0\]: density must be a number >= 0/);
    }
    for (const g of [NaN, -0.1, 1.5, Infinity, -Infinity]) expect(run(task('breadcrumbs', 0.5, g)), `${g}`).toThrow(/merges\[0\]: gamma must be a number from 0 to 1/);
    expect(run(task('magnitude', 0.5, NaN))).not.toThrow(); // gamma means nothing there
  });

  it('reads inputs from slices of mapped files as from typed arrays, and refuses bad slices', async () => {
    const r = rng(seed + 77);
    const dir = tempDir('della-slice-');
    const { base, experts } = drawBaseAndExperts(r, 3 * 40, 2);
    const file = join(dir, 'inputs.bin');
    const parts = [base, ...experts].map((v) => tensorBytes(v, DTYPE_CODE.BF16));
    writeFileSync(file, Buffer.concat([Buffer.alloc(100), ...parts.map((p) => Buffer.from(p.buffer, p.byteOffset, p.byteLength))]));
    const map = new native.MappedFile(file);
    const slice = (i: number) => ({ map, offset: 100 + i * 240, length: 240 });
    const task = (b: MergeTaskSpec['base'], e: Array<MergeTaskSpec['base']>, out: Uint8Array): MergeTaskSpec => ({
      name: 'model.t', base: b, baseDtype: DTYPE_CODE.BF16, out, outDtype: DTYPE_CODE.BF16, shape: [3, 40],
      experts: e.map((data) => ({ data: data!, dtype: DTYPE_CODE.BF16, shape: [3, 40], weight: 1, density: 0.5, epsilon: 0.1, gamma: 0 })),
      ...METHODS.della, lambda: 1, seed: 3,
    });
    const fromArrays = poisoned(240), fromSlices = poisoned(240);
    await native.mergeBatch({ threads: 2, merges: [task(parts[0], parts.slice(1), fromArrays)], copies: [] });
    await native.mergeBatch({ threads: 2, merges: [task(slice(0), [slice(1), slice(2)], fromSlices)], copies: [] });
    expect(Buffer.compare(Buffer.from(fromArrays), Buffer.from(fromSlices))).toBe(0);
    const copied = poisoned(240);
    await native.mergeBatch({ threads: 1, merges: [], copies: [{ src: slice(1), dst: copied }] });
    expect(Buffer.compare(Buffer.from(copied), Buffer.from(parts[1]))).toBe(0);
    const run = (b: unknown) => native.mergeBatch({ threads: 1, merges: [task(b as MergeTaskSpec['base'], [slice(1)], poisoned(240))], copies: [] });
    expect(() => run({ map, offset: 100 + 3 * 240 - 10, length: 240 })).toThrow(/merges\[0\]\.base: \[.*\) is outside .*inputs\.bin/);
    expect(() => run({ map: {}, offset: 0, length: 240 })).toThrow(/must be a typed array or a \{ map, offset, length \} slice/);
    expect(() => run({ map, offset: -1, length: 240 })).toThrow(/offset must be an integer/);
    map.close();
    expect(() => run(slice(0))).toThrow(/is closed/);
  });

  it('copies bytes', async () => {
    const src = new Uint8Array(20_000_000).map((_, i) => i * 31);
    const dst = poisoned(src.length);
    await native.mergeBatch({ threads: 2, merges: [], copies: [{ src, dst }] });
    expect(Buffer.compare(Buffer.from(src), Buffer.from(dst))).toBe(0);
  });
});
