// Shared by bench/kernels.js and bench/peer/run.js: the benchmarked methods and their
// parameters, deterministic input tensors, the best-of timer, and the merge task that
// the native addon runs for one tensor.
import { DTYPE_CODE, SPARSIFIER_CODE, RESCALE_CODE, CONSENSUS_CODE } from '../../dist/merge/task.js';

export const METHODS = {
  della: { sparsifier: SPARSIFIER_CODE.magprune, consensus: CONSENSUS_CODE.sum, normalize: true, rescale: RESCALE_CODE.inverse, density: 0.5, epsilon: 0.1 },
  della_linear: { sparsifier: SPARSIFIER_CODE.magprune, consensus: CONSENSUS_CODE.none, normalize: false, rescale: RESCALE_CODE.inverse, density: 0.5, epsilon: 0.1 },
  dare_ties: { sparsifier: SPARSIFIER_CODE.random, consensus: CONSENSUS_CODE.sum, normalize: false, rescale: RESCALE_CODE.inverse, density: 0.5, epsilon: 0 },
  ties: { sparsifier: SPARSIFIER_CODE.magnitude, consensus: CONSENSUS_CODE.sum, normalize: true, rescale: RESCALE_CODE.none, density: 0.5, epsilon: 0 },
  task_arithmetic: { sparsifier: SPARSIFIER_CODE.none, consensus: CONSENSUS_CODE.none, normalize: false, rescale: RESCALE_CODE.none, density: 1, epsilon: 0 },
};

export const SIZE = { BF16: 2, F16: 2, F32: 4 };


// Deterministic, realistic-looking values of `numel` elements: the base uniform in
// ±0.02 (seed only), an expert the base plus a uniform delta in ±0.002 (`around` = the
// base's fp32 values). Returns the stored bytes and the fp32 values.
export function fill(dtype, numel, seed, around) {
  const out = new Uint8Array(numel * SIZE[dtype]);
  const f = new Float32Array(numel);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < numel; i++) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    const u = (x / 4294967296 - 0.5) * (around ? 0.004 : 0.04);
    f[i] = around ? around[i] + u : u;
  }
  if (dtype === 'F32') new Float32Array(out.buffer).set(f);
  else {
    const u16 = new Uint16Array(out.buffer);
    const u32 = new Uint32Array(f.buffer);
    for (let i = 0; i < numel; i++) {
      if (dtype === 'BF16') u16[i] = (u32[i] + 0x7fff + ((u32[i] >>> 16) & 1)) >>> 16;
      else {
        // f16 via a DataView round trip is slow; this bench only needs plausible halves.
        const v = f[i], a = Math.abs(v);
        const e = a === 0 ? -25 : Math.max(-25, Math.floor(Math.log2(a)));
        const h = e < -14 ? Math.round(a / 2 ** -24) : ((e + 15) << 10) | Math.round((a / 2 ** e - 1) * 1024);
        u16[i] = (v < 0 ? 0x8000 : 0) | Math.min(h, 0x7bff);
      }
    }
  }
  return { bytes: out, values: f };
}

// One warm-up call, then the best time (seconds) of repeated calls over at least
// `minSeconds` and at least 3 calls.
export async function time(fn, minSeconds) {
  await fn(); // warm: page in buffers, start the pool
  let n = 0;
  const t0 = performance.now();
  let best = Infinity;
  while (performance.now() - t0 < minSeconds * 1000 || n < 3) {
    const t = performance.now();
    await fn();
    best = Math.min(best, (performance.now() - t) / 1000);
    n++;
  }
  return best;
}

// The native merge of one [rows, cols] tensor of `dtype` with the first K of
// `experts` (stored bytes), by method `name` of METHODS, weight 1 each, seed 0.
export function mergeTask({ name, dtype, rows, cols, base, experts, out, K }) {
  const m = METHODS[name];
  return {
    name: 'model.layers.0.mlp.down_proj.weight', base, baseDtype: DTYPE_CODE[dtype], out, outDtype: DTYPE_CODE[dtype],
    shape: [rows, cols], sparsifier: m.sparsifier, rescale: m.rescale, consensus: m.consensus, normalize: m.normalize, lambda: 1, seed: 0,
    experts: experts.slice(0, K).map((data) => ({ data, dtype: DTYPE_CODE[dtype], shape: [rows, cols], weight: 1, density: m.density, epsilon: m.epsilon, gamma: 0 })),
  };
}
