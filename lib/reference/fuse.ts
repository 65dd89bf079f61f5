/** Sign election and fuse of one element (SPEC §5), fp32 in expert order. */
import { CONSENSUS_CODE } from '../merge/task.js';

export interface FuseOptions {
  consensus: number;
  normalize: boolean;
  lambda: number;
}

/** p[k] = f32(w_k) · δ'_k, w[k] = f32(w_k). Returns M, the amount added to the base. */
export function fuseElement(p: ArrayLike<number>, w: ArrayLike<number>, o: FuseOptions): number {
  const K = p.length;
  let m = 0, d = 0;
  if (o.consensus === CONSENSUS_CODE.none) {
    for (let k = 0; k < K; k++) {
      m = Math.fround(m + p[k]);
      d = Math.fround(d + w[k]);
    }
    if (Math.abs(d) < 1e-8) d = 1;
  } else {
    let positive: boolean;
    if (o.consensus === CONSENSUS_CODE.sum) {
      let s = 0;
      for (let k = 0; k < K; k++) s = Math.fround(s + p[k]);
      positive = s >= 0;
    } else {
      let s = 0;
      for (let k = 0; k < K; k++) s += Math.sign(p[k]) | 0;
      positive = s >= 0;
    }
    for (let k = 0; k < K; k++) {
      if (positive ? p[k] > 0 : p[k] < 0) {
        m = Math.fround(m + p[k]);
        d = Math.fround(d + w[k]);
      }
    }
    if (d === 0) d = 1;
  }
  if (o.normalize) m = Math.fround(m / d);
  if (o.lambda !== 1) m = Math.fround(m * Math.fround(o.lambda));
  return m;
}
