/**
 * The executable SPEC: merges one tensor exactly as SPEC §1-5 say, slowly and
 * obviously. Takes the same task object as the native kernels.
 */
import type { MergeTaskSpec, MergeTaskStats } from '../merge/task.js';
import { dataView, loadF32, storeF32 } from './dtypes.js';
import { tensorId } from './fnv.js';
import { fuseElement } from './fuse.js';
import { sparsifyRow } from './sparsify.js';

function product(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** Flat offset of base row r inside an expert larger in every dimension (SPEC §2). */
export function expertRowOffset(base: readonly number[], expert: readonly number[], r: number, n: number): number {
  if (base.length === expert.length && base.every((d, i) => d === expert[i])) return r * n;
  if (base.length <= 1) return 0;
  let offset = 0;
  let stride = expert[expert.length - 1];
  for (let d = base.length - 2; d >= 0; d--) {
    offset += (r % base[d]) * stride;
    r = Math.floor(r / base[d]);
    stride *= expert[d];
  }
  return offset;
}

export function referenceMergeTensor(t: MergeTaskSpec): MergeTaskStats {
  const numel = product(t.shape);
  const n = t.shape.length >= 2 ? t.shape[t.shape.length - 1] : numel;
  const rows = n === 0 ? 0 : numel / n;
  const K = t.experts.length;
  const id = tensorId(t.name);
  const baseView = dataView(t.base);
  const outView = dataView(t.out);
  const expertViews = t.experts.map((e) => dataView(e.data));
  const w = t.experts.map((e) => Math.fround(e.weight));
  const stats: MergeTaskStats = { nonfinite: new Array(K + 1).fill(0), kept: new Array(K).fill(0), numel };
  const b = new Float64Array(n);
  const deltas = t.experts.map(() => new Float64Array(n));
  const p = new Float64Array(K);
  const fuse = { consensus: t.consensus, normalize: t.normalize, lambda: t.lambda };

  for (let r = 0; r < rows; r++) {
    const i0 = r * n;
    for (let j = 0; j < n; j++) {
      b[j] = loadF32(baseView, t.baseDtype, i0 + j);
      if (!Number.isFinite(b[j])) stats.nonfinite[0]++;
    }
    for (let k = 0; k < K; k++) {
      const e = t.experts[k];
      const off = expertRowOffset(t.shape, e.shape, r, n);
      const d = deltas[k];
      for (let j = 0; j < n; j++) {
        const x = loadF32(expertViews[k], e.dtype, off + j);
        if (!Number.isFinite(x)) stats.nonfinite[k + 1]++;
        d[j] = Math.fround(x - b[j]);
      }
      stats.kept[k] += sparsifyRow(d, i0, {
        sparsifier: t.sparsifier, rescale: t.rescale, baseDtype: t.baseDtype, seed: t.seed,
        tensorId: id, expert: k, density: e.density, epsilon: e.epsilon,
      });
    }
    for (let j = 0; j < n; j++) {
      for (let k = 0; k < K; k++) p[k] = Math.fround(w[k] * deltas[k][j]);
      storeF32(outView, t.outDtype, i0 + j, Math.fround(b[j] + fuseElement(p, w, fuse)));
    }
  }
  return stats;
}
