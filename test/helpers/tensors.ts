/** Builders of random tensor bytes in the stored dtypes. */
import { DTYPE_CODE, type DTypeCode } from '../../lib/merge/task.js';
import { dtypeSize, storeF32 } from '../../lib/reference/dtypes.js';
import { normal } from './random.js';

export function tensorBytes(values: ArrayLike<number>, dtype: DTypeCode): Uint8Array {
  const out = new Uint8Array(values.length * dtypeSize(dtype));
  const dv = new DataView(out.buffer);
  for (let i = 0; i < values.length; i++) {
    if (dtype === DTYPE_CODE.F64) dv.setFloat64(8 * i, values[i], true);
    else storeF32(dv, dtype, i, Math.fround(values[i]));
  }
  return out;
}

/**
 * Base-like values plus expert values that differ by small deltas. Some deltas are
 * exactly zero or repeated so that ties in ranking are exercised.
 */
export function drawBaseAndExperts(r: () => number, numel: number, experts: number, scale = 0.02) {
  const base = new Float64Array(numel);
  for (let i = 0; i < numel; i++) base[i] = normal(r) * scale;
  const ex = Array.from({ length: experts }, () => {
    const e = new Float64Array(numel);
    const style = r();
    for (let i = 0; i < numel; i++) {
      const u = r();
      let d = normal(r) * scale * 0.1;
      if (style < 0.3 && u < 0.2) d = 0; // untouched parameters
      else if (style < 0.5 && u < 0.3) d = Math.round(d * 1000) / 1000; // repeated magnitudes
      e[i] = base[i] + d;
    }
    return e;
  });
  return { base, experts: ex };
}

export const POISON = 0xa5;

export function poisoned(bytes: number): Uint8Array {
  return new Uint8Array(bytes).fill(POISON);
}
