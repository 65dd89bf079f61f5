/** The sparsifiers and rescales of SPEC §4, applied to one expert's whole delta. */
import { magnitudeKey } from './dtypes.js';
import type { DTypeCode } from '../merge/task.js';
import { RESCALE_CODE, SPARSIFIER_CODE } from '../merge/task.js';
import { elementUniform } from './philox.js';

/**
 * Stable ascending ranks: r_i = #{j : key_j < key_i} + #{j < i : key_j == key_i}.
 * Sorting indices by (key, index) puts element i at position r_i.
 */
export function stableRanks(keys: ArrayLike<number>): Uint32Array {
  const n = keys.length;
  const order = Array.from({ length: n }, (_, i) => i);
  order.sort((a, b) => keys[a] - keys[b] || a - b);
  const ranks = new Uint32Array(n);
  order.forEach((i, position) => { ranks[i] = position; });
  return ranks;
}

/** MAGPRUNE keep probability of rank r in a row of n (two fp32 operations). */
export function magpruneQ(r: number, n: number, density: number, epsilon: number): number {
  const lo = Math.fround(density - epsilon);
  const span = Math.fround(2 * epsilon);
  const u = n >= 2 ? Math.fround(Math.fround(r) / Math.fround(n - 1)) : 0.5;
  return Math.fround(lo + Math.fround(span * u));
}

/** Breadcrumbs' window of kept ascending ranks [bottom, numel - top). */
export function breadcrumbsWindow(numel: number, density: number, gamma: number): { bottom: number; top: number } {
  const target = Math.floor(density * numel);
  let top = Math.floor(gamma * numel);
  let bottom = numel - target - top;
  if (bottom < 0) {
    top += bottom;
    bottom = 0;
  }
  return { bottom, top };
}

export interface SparsifyContext {
  sparsifier: number;
  rescale: number;
  baseDtype: DTypeCode;
  seed: number;
  tensorId: number;
  expert: number;
  density: number;
  epsilon: number;
  gamma: number;
  /** flat index of delta[0] in its tensor (non-zero when a single row is recomputed) */
  offset?: number;
}

/**
 * Sparsifies a whole delta (flat, rows of length n) in place: dropped elements become
 * +0, kept ones are rescaled. Returns the number kept.
 */
export function sparsifyDelta(delta: Float64Array, n: number, c: SparsifyContext): number {
  const numel = delta.length;
  if (c.sparsifier === SPARSIFIER_CODE.none || c.density >= 1) return numel;
  const keep = new Uint8Array(numel);
  const q = new Float64Array(numel); // keep probability, for the inverse rescale
  const x = (i: number) => elementUniform(c.seed, c.tensorId, c.expert, (c.offset ?? 0) + i);
  switch (c.sparsifier) {
    case SPARSIFIER_CODE.magprune:
      for (let i0 = 0; i0 < numel; i0 += n) {
        const keys = Array.from(delta.subarray(i0, i0 + n), (v) => magnitudeKey(v, c.baseDtype));
        const ranks = stableRanks(keys);
        for (let j = 0; j < n; j++) {
          q[i0 + j] = magpruneQ(ranks[j], n, c.density, c.epsilon);
          keep[i0 + j] = x(i0 + j) < q[i0 + j] ? 1 : 0;
        }
      }
      break;
    case SPARSIFIER_CODE.random:
      for (let i = 0; i < numel; i++) {
        q[i] = Math.fround(c.density);
        keep[i] = x(i) < q[i] ? 1 : 0;
      }
      break;
    case SPARSIFIER_CODE.magnitude: {
      const keys = Array.from(delta, (v) => magnitudeKey(v, c.baseDtype));
      const k = Math.floor(c.density * numel);
      const order = Array.from({ length: numel }, (_, i) => i);
      order.sort((a, b) => keys[b] - keys[a] || a - b); // descending key, ascending index
      for (let p = 0; p < k && p < numel; p++) keep[order[p]] = 1;
      break;
    }
    case SPARSIFIER_CODE.breadcrumbs: {
      const ranks = stableRanks(Array.from(delta, (v) => magnitudeKey(v, c.baseDtype)));
      const { bottom, top } = breadcrumbsWindow(numel, c.density, c.gamma);
      for (let i = 0; i < numel; i++) keep[i] = ranks[i] >= bottom && ranks[i] < numel - top ? 1 : 0;
      break;
    }
    default:
      throw new Error(`reference: unknown sparsifier ${c.sparsifier}`);
  }
  let scale = 1;
  if (c.rescale === RESCALE_CODE.l1 || c.rescale === RESCALE_CODE.l2 || c.rescale === RESCALE_CODE.linf) {
    scale = Math.fround(normScale(delta, keep, n, c.rescale));
  }
  let kept = 0;
  for (let i = 0; i < numel; i++) {
    if (!keep[i]) {
      delta[i] = 0;
      continue;
    }
    kept++;
    if (c.rescale === RESCALE_CODE.inverse) delta[i] = Math.fround(delta[i] * Math.fround(1 / q[i]));
    else if (c.rescale !== RESCALE_CODE.none) delta[i] = Math.fround(delta[i] * scale);
  }
  return kept;
}

/**
 * ‖δ‖ / ‖δ ⊙ mask‖ in binary64: row partial sums in index order, rows summed in index
 * order; 1 when either norm is below 1e-7.
 */
export function normScale(delta: Float64Array, keep: Uint8Array, n: number, rescale: number): number {
  let full = 0, kept = 0;
  for (let i0 = 0; i0 < delta.length; i0 += n) {
    let rowFull = 0, rowKept = 0;
    for (let j = 0; j < n; j++) {
      const v = delta[i0 + j];
      const m = rescale === RESCALE_CODE.l1 ? Math.abs(v) : rescale === RESCALE_CODE.l2 ? v * v : Math.abs(v);
      if (rescale === RESCALE_CODE.linf) {
        rowFull = Math.max(rowFull, m);
        if (keep[i0 + j]) rowKept = Math.max(rowKept, m);
      } else {
        rowFull += m;
        if (keep[i0 + j]) rowKept += m;
      }
    }
    if (rescale === RESCALE_CODE.linf) {
      full = Math.max(full, rowFull);
      kept = Math.max(kept, rowKept);
    } else {
      full += rowFull;
      kept += rowKept;
    }
  }
  if (rescale === RESCALE_CODE.l2) {
    full = Math.sqrt(full);
    kept = Math.sqrt(kept);
  }
  return full < 1e-7 || kept < 1e-7 ? 1 : full / kept;
}
