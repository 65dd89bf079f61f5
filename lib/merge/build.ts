/**
 * From a plan to kernel tasks: the models a recipe names, opened, and the task object
 * (lib/merge/task.ts) of each merged tensor. Shared by the scheduler and verification.
 */
import { DellaError } from '../errors.js';
import { openInput, type Checkpoint } from '../checkpoint/model.js';
import { expectRecipe, type Recipe } from '../recipe/index.js';
import { planMerge, type MergePlan, type TensorPlan } from './plan.js';
import { MAX_UINT8ARRAY } from '../util/bytes.js';
import { CONSENSUS_CODE, DTYPE_CODE, RESCALE_CODE, SPARSIFIER_CODE, type FileOutput, type FloatDType, type MergeTaskSpec } from './task.js';

export interface OpenedModels {
  base: Checkpoint;
  experts: Checkpoint[];
  close(): void;
}

export function openModels(recipe: Recipe): OpenedModels {
  const opened: Checkpoint[] = [];
  try {
    const base = openInput(recipe.baseModel.path);
    opened.push(base);
    const experts = recipe.models.map((m) => {
      const c = openInput(m.path);
      opened.push(c);
      return c;
    });
    return { base, experts, close: () => opened.forEach((c) => c.close()) };
  } catch (e) {
    opened.forEach((c) => c.close());
    throw e;
  }
}

/** Plans a merge without writing anything (for --dry-run and checks). */
export function planRecipe(recipe: Recipe): { plan: MergePlan; models: OpenedModels } {
  const checked = expectRecipe(recipe, 'planRecipe(recipe)');
  const models = openModels(checked);
  try {
    return { plan: planMerge(checked, models.base, models.experts), models };
  } catch (e) {
    models.close();
    throw inRecipe(e, checked);
  }
}

/** A recipe's error found while planning (a parameter with no value for some tensor)
 * names the recipe file, as those found while parsing it do. */
export function inRecipe(e: unknown, recipe: Recipe): unknown {
  if (!(e instanceof DellaError) || e.code !== 'E_RECIPE' || !recipe.source || e.message.startsWith(recipe.source)) return e;
  return new DellaError('E_RECIPE', `${recipe.source}: ${e.message}`, { cause: e.cause });
}

/**
 * The kernel task of a merged tensor; slerp needs its coefficients (see slerp.ts).
 * `forNative`: every input as a slice of its file's map (the addon reads it without a JS buffer).
 */
export function buildMergeTask<Out extends ArrayBufferView | FileOutput = ArrayBufferView>(
  plan: MergePlan, t: TensorPlan, models: OpenedModels, out: Out, seed: number, slerp: [number, number] | null,
  forNative = false,
): Omit<MergeTaskSpec, 'out'> & { out: Out } {
  const p = t.params!;
  const { base, experts } = models;
  // lib/reference views a tensor over 4 GiB through its slice (see inputView): one row
  // at a time where it can, rather than a copy of the whole.
  const input = (c: Checkpoint) => (forNative || c.tensors.get(t.name)!.byteLength > MAX_UINT8ARRAY ? c.slice(t.name) : c.data(t.name));
  const common = {
    name: t.name,
    baseDtype: DTYPE_CODE[t.base.dtype as FloatDType],
    out,
    outDtype: DTYPE_CODE[t.outDtype as FloatDType],
    shape: t.shape,
    seed,
  };
  const expert = (k: number, weight: number) => ({
    data: input(experts[k]),
    dtype: DTYPE_CODE[t.experts[k].dtype as FloatDType],
    shape: t.experts[k].shape,
    weight,
    density: p.experts[k].density,
    epsilon: p.experts[k].epsilon,
    gamma: p.experts[k].gamma,
  });
  const plain = { sparsifier: SPARSIFIER_CODE.none, rescale: RESCALE_CODE.none, consensus: CONSENSUS_CODE.none, lambda: 1 };
  if (plan.method.kind === 'linear') {
    // A weighted average of the models' values: no base, no deltas.
    return { ...common, ...plain, base: null, normalize: p.normalize, experts: t.experts.map((_, k) => expert(k, p.experts[k].weight)) };
  }
  if (plan.method.kind === 'slerp') {
    const [c0, c1] = slerp!;
    const a = { data: input(base), dtype: common.baseDtype, shape: t.shape, weight: c0, density: 1, epsilon: 0, gamma: 0 };
    return { ...common, ...plain, base: null, normalize: false, experts: [a, expert(0, c1)] };
  }
  return {
    ...common,
    base: input(base),
    experts: t.experts.map((_, k) => expert(k, p.experts[k].weight)),
    sparsifier: SPARSIFIER_CODE[plan.method.sparsifier],
    rescale: RESCALE_CODE[p.rescale],
    consensus: CONSENSUS_CODE[p.consensus],
    normalize: p.normalize,
    lambda: p.lambda,
  };
}

