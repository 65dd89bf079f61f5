/**
 * Per-tensor parameter resolution (SPEC §7): per-model value, else global, else default;
 * filter lists pick by tensor name, gradients are read at the tensor's layer position.
 */
import { DellaError } from '../errors.js';
import { METHODS, resolveRescale, type RescaleName } from '../merge/methods.js';
import { DEFAULTS, densityEpsilonProblem, fmt, recipeError } from './params.js';
import { expectRecipe } from './parse.js';
import type { ExpertParams, ParamScalar, ParamValue, Recipe, TensorParams } from './types.js';

// SPEC §7: `layers.N.` — the index is followed by a dot; a name ending in `.N` has no layer.
const LAYER = /(?:^|\.)(?:layers|h|blocks|layer|block)\.(\d+)\./;

/** The layer index of a tensor, or null for tensors outside the layers (embeddings, final norm). */
export function layerIndex(tensorName: string): number | null {
  const m = LAYER.exec(tensorName);
  return m ? Number(m[1]) : null;
}

/** L = 1 + the largest layer index; 0 when no tensor has a layer. */
export function layerCount(baseTensorNames: Iterable<string>): number {
  if (baseTensorNames === null || typeof (baseTensorNames as Iterable<string>)?.[Symbol.iterator] !== 'function' || typeof baseTensorNames === 'string') {
    throw new DellaError('E_ARGS', 'layerCount(names) takes the base model\'s tensor names (an array or other iterable of strings)');
  }
  let max = -1;
  for (const n of baseTensorNames) {
    if (typeof n !== 'string') throw new DellaError('E_ARGS', `layerCount(names) takes the base model's tensor names (strings), got ${fmt(n)} among them`);
    const i = layerIndex(n);
    if (i !== null && i > max) max = i;
  }
  return max + 1;
}

/** Where a gradient is read for this tensor: t in [0, 1]. */
export function gradientPosition(tensorName: string, layers: number): number {
  const i = layerIndex(tensorName);
  if (i === null) return 0;
  if (layers <= 1) return 1;
  return i / (layers - 1);
}

/** Linear interpolation in binary64; t beyond the last entry clamps to it. */
export function interpolate(gradient: readonly number[], t: number): number {
  const m = gradient.length;
  if (m === 1) return gradient[0];
  const s = t * (m - 1);
  const i = Math.floor(s);
  if (i >= m - 1) return gradient[m - 1];
  if (i < 0) return gradient[0];
  const a = gradient[i];
  const b = gradient[i + 1];
  return a + (b - a) * (s - i);
}

type Entry = { filter?: string; value: ParamScalar | number[] };

function isFilterList(v: ParamValue): v is Entry[] {
  return Array.isArray(v) && v.length > 0 && typeof v[0] === 'object' && v[0] !== null;
}

/** The value a level gives this tensor, or undefined to fall through to the next level. */
function pick(v: ParamValue | undefined, tensorName: string, t: number): ParamScalar | undefined {
  if (v === undefined) return undefined;
  let x: ParamScalar | number[];
  if (isFilterList(v)) {
    // "*" matches every tensor, as in mergekit (no tensor name holds a literal "*").
    const hit = v.find((e) => e.filter === undefined || e.filter === '*' || tensorName.includes(e.filter));
    if (hit === undefined) return undefined;
    x = hit.value;
  } else {
    x = v as ParamScalar | number[];
  }
  return Array.isArray(x) ? interpolate(x, t) : x;
}

function lookup(
  own: Record<string, ParamValue> | null,
  global: Record<string, ParamValue>,
  name: string,
  tensorName: string,
  t: number,
): ParamScalar | undefined {
  return pick(own?.[name], tensorName, t) ?? pick(global[name], tensorName, t);
}

function num(v: ParamScalar | undefined, fallback: number, what: string): number {
  if (v === undefined) return fallback;
  if (typeof v !== 'number' || !Number.isFinite(v)) throw recipeError(`${what} must be a finite number, got ${fmt(v)}`);
  return v;
}

/**
 * The parameters a merge uses for one tensor (SPEC §7): per model, else global, else
 * the default; filter lists picked by `tensorName`, gradients read at its layer's
 * position among `layers` (layerCount of the base model's tensor names). A Recipe
 * changed since it was parsed is checked again first, as merge() checks it.
 */
export function resolveTensorParams(recipe: Recipe, tensorName: string, layers: number): TensorParams {
  const r = expectRecipe(recipe, 'resolveTensorParams(recipe, tensorName, layers)');
  if (typeof tensorName !== 'string') {
    throw new DellaError('E_ARGS', `resolveTensorParams(recipe, tensorName, layers): tensorName must be a string, got ${fmt(tensorName)}`);
  }
  if (!Number.isSafeInteger(layers) || layers < 0) {
    throw new DellaError('E_ARGS', `resolveTensorParams(recipe, tensorName, layers): layers must be a whole number >= 0 (layerCount of the base model's tensor names), got ${fmt(layers)}`);
  }
  return tensorParams(r, tensorName, layers);
}

/** resolveTensorParams for a checked recipe and arguments (the plan's, per tensor). */
export function tensorParams(recipe: Recipe, tensorName: string, layers: number): TensorParams {
  const method = METHODS[recipe.mergeMethod];
  if (method === undefined) throw recipeError(`unknown merge_method "${recipe.mergeMethod}"`);
  const pos = gradientPosition(tensorName, layers);
  const g = recipe.parameters;

  const experts: ExpertParams[] = recipe.models.map((m) => {
    const get = (name: 'weight' | 'density' | 'epsilon' | 'gamma'): number =>
      num(lookup(m.parameters, g, name, tensorName, pos), DEFAULTS[name], `model "${m.model}": ${name} for tensor "${tensorName}"`);
    const p: ExpertParams = { weight: get('weight'), density: get('density'), epsilon: get('epsilon'), gamma: get('gamma') };
    if (method.sparsifier === 'magprune') {
      const problem = densityEpsilonProblem(p.density, p.epsilon);
      if (problem) throw recipeError(`model "${m.model}": ${problem} (tensor "${tensorName}")`);
    }
    return p;
  });

  const lambda = num(lookup(null, g, 'lambda', tensorName, pos), DEFAULTS.lambda, `lambda for tensor "${tensorName}"`);

  const n = lookup(null, g, 'normalize', tensorName, pos);
  const normalize = n === undefined ? method.normalize : n === true;

  const c = lookup(null, g, 'consensus', tensorName, pos);
  const consensus = c === 'sum' || c === 'count' || c === 'none' ? c : method.consensus;

  const r = lookup(null, g, 'rescale', tensorName, pos);
  const rescaleValue: boolean | RescaleName =
    r === undefined ? method.rescale : typeof r === 'boolean' ? r : (r as RescaleName);
  const rescale = resolveRescale(method.sparsifier, rescaleValue);

  // slerp's t has no default: a filter list that matches nothing here is an error.
  const tValue = lookup(null, g, 't', tensorName, pos);
  if (method.kind === 'slerp' && tValue === undefined) {
    throw recipeError(`parameter "t" has no value for tensor "${tensorName}": no filter entry matches it (end the list with an entry without a filter)`);
  }
  const t = num(tValue, 0.5, `t for tensor "${tensorName}"`);

  return { experts, lambda, normalize, consensus, rescale, t };
}
