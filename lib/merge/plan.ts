/**
 * Planning: from a recipe and the opened checkpoints' headers, decide for every output
 * tensor whether it is merged or copied, its output dtype and shape, and its resolved
 * parameters. Every shape, dtype and parameter problem is found here, before a single
 * tensor byte is read.
 */
import { DellaError } from '../errors.js';
import type { Checkpoint, CheckpointTensor } from '../checkpoint/model.js';
import { DTYPE_SIZES, MERGEABLE_DTYPES } from '../checkpoint/safetensors.js';
import type { ParamValue, Recipe, TensorParams } from '../recipe/index.js';
import { layerCount, tensorParams } from '../recipe/index.js';
import { METHODS, type MethodSpec } from './methods.js';

const EMBEDDING_NAMES = ['embed_tokens', 'lm_head', 'wte', 'word_embeddings', 'embed_in', 'embed_out'];

export interface TensorPlan {
  name: string;
  kind: 'merge' | 'copy';
  base: CheckpointTensor;
  /** per expert, for merged tensors */
  experts: CheckpointTensor[];
  outDtype: string;
  shape: number[];
  numel: number;
  outBytes: number;
  /** bytes this tensor reads from all inputs */
  inBytes: number;
  params: TensorParams | null;
}

export interface MergePlan {
  method: MethodSpec;
  tensors: TensorPlan[];
  layers: number;
  warnings: string[];
  totals: {
    tensors: number;
    merged: number;
    copied: number;
    parameters: number;
    mergedParameters: number;
    bytesRead: number;
    bytesWritten: number;
  };
}

function shapeText(s: readonly number[]): string {
  return `[${s.join(', ')}]`;
}

function isEmbedding(name: string): boolean {
  return EMBEDDING_NAMES.some((e) => name.includes(e));
}

/**
 * Expert shape accepted for a base shape: equal, or (for deltas and averages) an
 * embedding larger in every dimension, of which the leading block is used.
 */
function shapeFits(name: string, base: readonly number[], expert: readonly number[], exact: boolean): boolean {
  if (base.length !== expert.length) return false;
  if (base.every((d, i) => d === expert[i])) return true;
  return !exact && isEmbedding(name) && base.length > 0 && base.every((d, i) => expert[i] > d);
}

/**
 * Why an embedding that is larger than the base's, but not in every dimension (an
 * extended vocabulary of the same hidden size), is refused: SPEC §2's rule, said.
 */
function embeddingHint(name: string, base: readonly number[], expert: readonly number[], slerp: boolean): string {
  if (!isEmbedding(name) || base.length !== expert.length || !base.every((d, i) => expert[i] >= d)) return '';
  if (slerp) return '; slerp needs equal shapes';
  const same = base.flatMap((d, i) => (expert[i] === d ? [i] : []));
  return `; an embedding may be larger than the base's only in every dimension (its leading block is then merged: SPEC §2), ` +
    `and this one is the same size in dimension ${same.join(' and ')}`;
}

export function planMerge(recipe: Recipe, base: Checkpoint, experts: readonly Checkpoint[]): MergePlan {
  const method = METHODS[recipe.mergeMethod];
  if (!method) throw new DellaError('E_RECIPE', `unknown merge_method "${recipe.mergeMethod}"`);
  const layers = layerCount(base.names);
  const warnings: string[] = [];
  const tensors: TensorPlan[] = [];
  const baseName = recipe.baseModel.model;
  const onlyInBase: string[] = [];
  // A model without a single tensor of the base's (an empty index, the wrong directory)
  // would otherwise give a merge that copies the base, with only a warning.
  if (base.names.length === 0) throw new DellaError('E_CHECKPOINT', `the base model ${baseName} (${base.path}) holds no tensors`);
  experts.forEach((e, k) => {
    if (!e.names.some((n) => base.tensors.has(n))) {
      const has = e.names.length === 0 ? 'holds no tensors' : `has none of the base model's tensors (its ${e.names.length}, first "${e.names[0]}", are not in ${baseName})`;
      throw new DellaError('E_SHAPE', `${recipe.models[k].model} (${e.path}) ${has}`);
    }
  });

  for (const name of base.names) {
    const bt = base.tensors.get(name)!;
    const found = experts.map((e) => e.tensors.get(name));
    const mergeable = MERGEABLE_DTYPES.has(bt.dtype);
    const present = found.filter((t) => t !== undefined).length;
    if (!mergeable || present === 0) {
      if (mergeable) onlyInBase.push(name);
      tensors.push({
        name, kind: 'copy', base: bt, experts: [], outDtype: bt.dtype, shape: bt.shape, numel: bt.numel,
        outBytes: bt.byteLength, inBytes: bt.byteLength, params: null,
      });
      continue;
    }
    const ets: CheckpointTensor[] = [];
    found.forEach((t, k) => {
      const model = recipe.models[k].model;
      if (!t) {
        throw new DellaError('E_SHAPE', `tensor "${name}" is in the base model ${baseName} but missing from ${model}`);
      }
      if (!MERGEABLE_DTYPES.has(t.dtype)) {
        throw new DellaError('E_SHAPE', `tensor "${name}" is ${bt.dtype} in the base model ${baseName} but ${t.dtype} in ${model}, which cannot be merged`);
      }
      if (!shapeFits(name, bt.shape, t.shape, method.kind === 'slerp')) {
        throw new DellaError('E_SHAPE',
          `tensor "${name}" has shape ${shapeText(bt.shape)} in the base model ${baseName} but ${shapeText(t.shape)} in ${model}${embeddingHint(name, bt.shape, t.shape, method.kind === 'slerp')}`);
      }
      ets.push(t);
    });
    const outDtype = recipe.outDtype ?? recipe.dtype ?? bt.dtype;
    const outBytes = bt.numel * DTYPE_SIZES[outDtype];
    tensors.push({
      name, kind: 'merge', base: bt, experts: ets, outDtype, shape: bt.shape, numel: bt.numel, outBytes,
      inBytes: bt.byteLength + ets.reduce((a, t) => a + t.byteLength, 0),
      params: tensorParams(recipe, name, layers),
    });
  }
  if (onlyInBase.length > 0) {
    const list = onlyInBase.slice(0, 5).map((n) => `"${n}"`).join(', ');
    warnings.push(`${onlyInBase.length} tensor(s) are only in the base model and are copied unchanged: ${list}${onlyInBase.length > 5 ? ', ...' : ''}`);
  }
  experts.forEach((e, k) => {
    const extra = e.names.filter((n) => !base.tensors.has(n));
    if (extra.length > 0) {
      warnings.push(`${recipe.models[k].model} has ${extra.length} tensor(s) the base model lacks; they are ignored (first: "${extra[0]}")`);
    }
  });
  // The kernels take f32(w) and f32(λ): 1e-50 is 0 there too. One warning per expert
  // (and for λ), naming the first tensor, not one per tensor.
  const zero = (v: number) => (v === 0 ? '0' : `${v} (0 in float32)`);
  const merged = tensors.filter((t) => t.kind === 'merge' && t.params);
  recipe.models.forEach((m, k) => {
    const off = merged.filter((t) => Math.fround(t.params!.experts[k].weight) === 0);
    if (off.length > 0) {
      warnings.push(`weight ${zero(off[0].params!.experts[k].weight)} for ${m.model} on ${off.length} tensor(s) (first: "${off[0].name}"): it contributes nothing there`);
    }
  });
  const still = merged.filter((t) => Math.fround(t.params!.lambda) === 0);
  if (still.length > 0) {
    warnings.push(`lambda ${zero(still[0].params!.lambda)} on ${still.length} tensor(s) (first: "${still[0].name}"): the merged changes there are all zero, so they keep the base model's values`);
  }
  if (method.sparsifier === 'magnitude' || method.sparsifier === 'breadcrumbs') {
    const empty = tensors.filter((t) => t.params?.experts.some((p) => p.density < 1 && Math.floor(p.density * t.numel) === 0));
    if (empty.length > 0) {
      warnings.push(`${empty.length} tensor(s) are too small for their density: floor(density × size) = 0 drops every delta there (first: "${empty[0].name}", ${empty[0].numel} elements)`);
    }
  }
  warnings.push(...unmatchedFilters(recipe, merged));
  return { method, tensors, layers, warnings: dedupe(warnings), totals: planTotals(tensors) };
}

/**
 * Filter entries that no merged tensor's name contains. A filter is a substring match,
 * so a typo ("mpl" for "mlp") never errs: its tensors fall through to the next entry,
 * and the merge runs with values the recipe did not mean. mergekit says nothing; we warn.
 */
function unmatchedFilters(recipe: Recipe, merged: readonly TensorPlan[]): string[] {
  const out: string[] = [];
  const scan = (params: Record<string, ParamValue>, owner: string) => {
    for (const [param, v] of Object.entries(params)) {
      if (!Array.isArray(v)) continue;
      for (const e of v) {
        if (typeof e !== 'object' || e === null || e.filter === undefined || e.filter === '*') continue;
        const f = e.filter;
        if (!merged.some((t) => t.name.includes(f))) {
          out.push(`filter "${f}" of ${owner}parameter "${param}" matches none of the ${merged.length} merged tensors' names, so its value is never used (a filter matches names containing it)`);
        }
      }
    }
  };
  scan(recipe.parameters, '');
  for (const m of recipe.models) scan(m.parameters, `${m.model}'s `);
  return out;
}

/** The counts and bytes of a plan's tensors (or of one part's, for --dry-run --part). */
export function planTotals(tensors: readonly TensorPlan[]): MergePlan['totals'] {
  const merged = tensors.filter((t) => t.kind === 'merge');
  return {
    tensors: tensors.length,
    merged: merged.length,
    copied: tensors.length - merged.length,
    parameters: tensors.reduce((a, t) => a + t.numel, 0),
    mergedParameters: merged.reduce((a, t) => a + t.numel, 0),
    bytesRead: tensors.reduce((a, t) => a + t.inBytes, 0),
    bytesWritten: tensors.reduce((a, t) => a + t.outBytes, 0),
  };
}

function dedupe(xs: string[]): string[] {
  const seen = new Set<string>();
  const out: string[] = [];
  for (const x of xs) {
    if (!seen.has(x)) {
      seen.add(x);
      out.push(x);
    }
  }
  // A weight-0 warning per tensor would flood the report: keep the first few.
  const zero = out.filter((x) => x.startsWith('weight 0'));
  return zero.length > 3 ? [...out.filter((x) => !x.startsWith('weight 0')), ...zero.slice(0, 3), `... and ${zero.length - 3} more weight-0 notes`] : out;
}
