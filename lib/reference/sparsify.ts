/** The sparsifiers of SPEC §4 applied to one expert's delta, row by row. */
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

export interface SparsifyContext {
  sparsifier: number;
  rescale: number;
  baseDtype: DTypeCode;
  seed: number;
  tensorId: number;
  expert: number;
  density: number;
  epsilon: number;
}

/**
 * Sparsifies delta[0..n) in place: the row whose first element has flat index i0.
 * Dropped elements become +0, kept ones are rescaled. Returns the number kept.
 */
export function sparsifyRow(delta: Float64Array, i0: number, c: SparsifyContext): number {
  const n = delta.length;
  if (c.sparsifier === SPARSIFIER_CODE.none || c.density >= 1) return n;
  const inverse = c.rescale === RESCALE_CODE.inverse;
  let kept = 0;
  if (c.sparsifier === SPARSIFIER_CODE.random) {
    const q = Math.fround(c.density);
    for (let j = 0; j < n; j++) {
      const keep = elementUniform(c.seed, c.tensorId, c.expert, i0 + j) < q;
      if (keep) kept++;
      delta[j] = keep ? (inverse ? Math.fround(delta[j] * Math.fround(1 / q)) : delta[j]) : 0;
    }
    return kept;
  }
  if (c.sparsifier !== SPARSIFIER_CODE.magprune) {
    throw new Error(`reference: sparsifier ${c.sparsifier} is not implemented`);
  }
  const keys = new Float64Array(n);
  for (let j = 0; j < n; j++) keys[j] = magnitudeKey(delta[j], c.baseDtype);
  const ranks = stableRanks(keys);
  for (let j = 0; j < n; j++) {
    const q = magpruneQ(ranks[j], n, c.density, c.epsilon);
    const keep = elementUniform(c.seed, c.tensorId, c.expert, i0 + j) < q;
    if (keep) kept++;
    delta[j] = keep ? (inverse ? Math.fround(delta[j] * Math.fround(1 / q)) : delta[j]) : 0;
  }
  return kept;
}
