/**
 * Parameter knowledge shared by parsing and resolution: names, aliases, defaults,
 * value formatting for messages, and the epsilon/density rule of magprune (SPEC §4).
 */
import { DellaError } from '../errors.js';
import { jsonForMessage } from '../util/show.js';

/** per-model parameters (SPEC §7); the global section may give defaults for them */
export const PER_MODEL_PARAMS: readonly string[] = ['weight', 'density', 'epsilon', 'gamma'];
/** parameters that only the global section may give */
export const GLOBAL_ONLY_PARAMS: readonly string[] = ['lambda', 'normalize', 'rescale', 'consensus', 't', 'int8_mask'];

export interface Alias {
  target: string;
  /** how the alias relates to its target, for messages */
  relation: string;
  toTarget: (v: number) => number;
}

/** the paper's names */
export const ALIASES: Readonly<Record<string, Alias>> = {
  window_size: { target: 'epsilon', relation: 'window_size = 2 * epsilon', toTarget: (v) => v / 2 },
  drop_rate: { target: 'density', relation: 'drop_rate = 1 - density', toTarget: (v) => 1 - v },
};

/** own-property lookup: recipe keys such as "__proto__" must not reach Object.prototype */
export function aliasOf(key: string): Alias | undefined {
  return Object.prototype.hasOwnProperty.call(ALIASES, key) ? ALIASES[key] : undefined;
}

export const NUMERIC_PARAMS: readonly string[] = ['weight', 'density', 'epsilon', 'gamma', 'lambda', 't'];

export const DEFAULTS = { weight: 1, density: 1, epsilon: 0.15, gamma: 0.01, lambda: 1 } as const;

export function recipeError(message: string): DellaError {
  return new DellaError('E_RECIPE', message);
}

/** A value as a reader would write it: NaN and Infinity stay readable, long values are cut. */
export function fmt(v: unknown): string {
  if (v === undefined) return 'nothing';
  if (typeof v === 'number') return Object.is(v, -0) ? '-0' : String(v);
  if (typeof v === 'bigint') return String(v);
  const s = jsonForMessage(v, (_k, x: unknown) =>
    typeof x === 'number' && !Number.isFinite(x) ? String(x) : typeof x === 'bigint' ? String(x) : x,
  );
  return s.length > 80 ? s.slice(0, 77) + '...' : s;
}

/** Short decimal for computed values (hides binary64 noise such as 0.04999999999999999). */
export function fmtNum(v: number): string {
  return String(Number(v.toPrecision(12)));
}

export function levenshtein(a: string, b: string): number {
  const prev = new Array<number>(b.length + 1);
  for (let j = 0; j <= b.length; j++) prev[j] = j;
  for (let i = 1; i <= a.length; i++) {
    let diag = prev[0];
    prev[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const up = prev[j];
      prev[j] = Math.min(up + 1, prev[j - 1] + 1, diag + (a[i - 1] === b[j - 1] ? 0 : 1));
      diag = up;
    }
  }
  return prev[b.length];
}

/** The candidate closest to `word` (case-insensitive; ties go to the earlier candidate). */
export function nearest(word: string, candidates: readonly string[]): { name: string; distance: number } | null {
  let best: { name: string; distance: number } | null = null;
  const w = word.toLowerCase();
  for (const c of candidates) {
    const d = levenshtein(w, c.toLowerCase());
    if (best === null || d < best.distance) best = { name: c, distance: d };
  }
  return best;
}

export function didYouMean(word: string, candidates: readonly string[]): string {
  const n = nearest(word, candidates);
  return n ? ` (did you mean "${n.name}"?)` : '';
}

/**
 * Why a magprune density/epsilon pair is invalid, or null when it is fine.
 * density >= 1 leaves the delta unchanged, so epsilon does not matter then.
 */
export function densityEpsilonProblem(density: number, epsilon: number): string | null {
  if (density >= 1) return null;
  const lo = density - epsilon;
  const hi = density + epsilon;
  if (lo > 0 && hi <= 1) return null;
  return (
    `density ${fmt(density)} and epsilon ${fmt(epsilon)} give keep probabilities from ` +
    `${fmtNum(lo)} to ${fmtNum(hi)}; magprune needs density - epsilon > 0 and density + epsilon <= 1`
  );
}
