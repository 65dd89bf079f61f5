/**
 * slerp's per-tensor coefficients, from sums the kernels return (SPEC §6 leaves the
 * formula to mergekit's): out = c0·A + c1·B. Computed here, in JS, for every backend,
 * so the transcendental functions are evaluated in one place and the bytes agree.
 */
import type { DotStats } from './task.js';

export const SLERP_DOT_THRESHOLD = 0.9995;
const EPS = 1e-8;

export function slerpCoefficients(t: number, s: Pick<DotStats, 'dot' | 'aa' | 'bb'>): [number, number] {
  const n0 = Math.sqrt(s.aa), n1 = Math.sqrt(s.bb);
  // mergekit normalizes each tensor when its norm exceeds eps, then takes the dot
  const dot = s.dot / ((n0 > EPS ? n0 : 1) * (n1 > EPS ? n1 : 1));
  if (Math.abs(dot) > SLERP_DOT_THRESHOLD) return [1 - t, t]; // nearly parallel: lerp
  const theta0 = Math.acos(dot);
  const sin0 = Math.sin(theta0);
  const thetaT = theta0 * t;
  return [Math.sin(theta0 - thetaT) / sin0, Math.sin(thetaT) / sin0];
}
