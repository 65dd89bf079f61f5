/**
 * The executable SPEC: merges one tensor exactly as SPEC §1-5 say, slowly and
 * obviously. Takes the same task object as the native kernels.
 */
import type { DotStats, DotTaskSpec, MergeTaskSpec, MergeTaskStats } from '../merge/task.js';
import { dataView, loadF32, storeF32 } from './dtypes.js';
import { tensorId } from './fnv.js';
import { fuseElement } from './fuse.js';
import { sparsifyDelta } from './sparsify.js';

/**
 * A tensor's rows (SPEC §1): rows of its last dimension `n`, or one row of all its
 * elements when its rank is 0 or 1 (della::geometry in the kernels).
 */
export function geometry(shape: readonly number[]): { numel: number; n: number; rows: number } {
  const numel = shape.reduce((a, b) => a * b, 1);
  const n = shape.length >= 2 ? shape[shape.length - 1] : numel;
  return { numel, n, rows: n === 0 ? 0 : numel / n };
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

/** Sees every element: its raw and sparsified delta per expert, and M, the merged change. */
export type ElementProbe = (i: number, raw: ArrayLike<number>, sparsified: ArrayLike<number>, m: number) => void;

export function referenceMergeTensor(t: MergeTaskSpec, probe?: ElementProbe): MergeTaskStats {
  const { numel, n, rows } = geometry(t.shape);
  const K = t.experts.length;
  const id = tensorId(t.name);
  const baseView = t.base ? dataView(t.base) : null;
  const outView = dataView(t.out);
  const expertViews = t.experts.map((e) => dataView(e.data));
  const w = t.experts.map((e) => Math.fround(e.weight));
  const stats: MergeTaskStats = { nonfinite: new Array(K + 1).fill(0), kept: new Array(K).fill(0), outNonfinite: 0, numel };
  const b = new Float64Array(numel);
  for (let i = 0; baseView && i < numel; i++) {
    b[i] = loadF32(baseView, t.baseDtype, i);
    if (!Number.isFinite(b[i])) stats.nonfinite[0]++;
  }
  const raws: Float64Array[] = [];
  // Each expert's whole delta, then its sparsifier (some look at the whole tensor).
  const deltas = t.experts.map((e, k) => {
    const d = new Float64Array(numel);
    for (let r = 0; r < rows; r++) {
      const off = expertRowOffset(t.shape, e.shape, r, n);
      for (let j = 0; j < n; j++) {
        const x = loadF32(expertViews[k], e.dtype, off + j);
        if (!Number.isFinite(x)) stats.nonfinite[k + 1]++;
        d[r * n + j] = baseView ? Math.fround(x - b[r * n + j]) : x;
      }
    }
    if (probe) raws[k] = d.slice();
    stats.kept[k] = !baseView ? numel : sparsifyDelta(d, n, {
      sparsifier: t.sparsifier, rescale: t.rescale, baseDtype: t.baseDtype, seed: t.seed,
      tensorId: id, expert: k, density: e.density, epsilon: e.epsilon, gamma: e.gamma, offset: t.flatOffset,
    });
    return d;
  });
  const p = new Float64Array(K);
  const fuse = { consensus: t.consensus, normalize: t.normalize, lambda: t.lambda };
  for (let i = 0; i < numel; i++) {
    for (let k = 0; k < K; k++) p[k] = Math.fround(w[k] * deltas[k][i]);
    const m = fuseElement(p, w, fuse);
    storeF32(outView, t.outDtype, i, baseView ? Math.fround(b[i] + m) : m);
    // What was stored: a finite value beyond the dtype's range is stored as infinity.
    if (!Number.isFinite(loadF32(outView, t.outDtype, i))) stats.outNonfinite++;
    if (probe) probe(i, raws.map((d) => d[i]), deltas.map((d) => d[i]), m);
  }
  return stats;
}

/** Sums over two tensors for slerp: binary64, row partials in index order, rows in order. */
export function referenceDots(t: DotTaskSpec): DotStats {
  const { numel, n } = geometry(t.shape);
  const a = dataView(t.a), b = dataView(t.b);
  const s: DotStats = { dot: 0, aa: 0, bb: 0, nonfinite: [0, 0] };
  for (let i0 = 0; n > 0 && i0 < numel; i0 += n) {
    let d = 0, x = 0, y = 0;
    for (let j = 0; j < n; j++) {
      const u = loadF32(a, t.aDtype, i0 + j), v = loadF32(b, t.bDtype, i0 + j);
      if (!Number.isFinite(u)) s.nonfinite[0]++;
      if (!Number.isFinite(v)) s.nonfinite[1]++;
      d += u * v;
      x += u * u;
      y += v * v;
    }
    s.dot += d;
    s.aa += x;
    s.bb += y;
  }
  return s;
}
