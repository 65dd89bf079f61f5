/**
 * della-merge: DELLA, DARE and task-arithmetic merging of safetensors checkpoints.
 *
 *   import { merge } from 'della-merge';
 *   const report = await merge('recipe.yaml', { out: 'merged', onProgress: console.log });
 */
import { resolve } from 'node:path';
import { stringify as yamlStringify } from 'yaml';
import { DellaError } from './errors.js';
import { brokenRecipeProblem, checkedRecipe, isParsedRecipe, loadRecipe, makeResolver, parseRecipe, type Recipe } from './recipe/index.js';
import { checkMergeOptions, runMerge, type MergeOptions, type MergeReport } from './merge/run.js';
import { expectStreamOptions, streamMerge, type MergedTensor, type TensorStreamOptions } from './merge/stream.js';

export { DellaError, isDellaError, type ErrorCode } from './errors.js';
export { openCheckpoint, type Checkpoint, type CheckpointTensor, type TensorArray } from './checkpoint/model.js';
export type { Bytes } from './util/bytes.js';
export { saveModel, type InMemoryTensor } from './checkpoint/save.js';
export type { TensorInfo } from './checkpoint/safetensors.js';
export { loadRecipe, parseRecipe, resolveTensorParams, layerCount, layerIndex } from './recipe/index.js';
export type { Recipe, RecipeModel, TensorParams, ExpertParams, ParamValue, ParamScalar, OutDType, ParseOptions } from './recipe/index.js';
export type { MergePlan, TensorPlan } from './merge/plan.js';
export type { OpenedModels } from './merge/build.js';
export type { ConsensusName, SparsifierName, RescaleName } from './merge/methods.js';
export type {
  MergeTaskSpec, ExpertTask, CopyTaskSpec, DotTaskSpec, DotStats, MergeTaskStats, DTypeCode, FloatDType,
} from './merge/task.js';
export { planRecipe, type MergeOptions, type MergeReport, type ProgressEvent, type TensorReport } from './merge/run.js';
export type { MergedTensor, TensorStreamOptions } from './merge/stream.js';
export { assemble, type AssembleReport } from './merge/parts.js';
export { verifyMerge, type VerifyReport, type VerifyOptions, type TensorCheck } from './validate/verify.js';
export type { MemoryTensor, TensorSet } from './checkpoint/memory.js';
export { METHODS, type MethodSpec } from './merge/methods.js';
export * as reference from './reference/index.js';

/**
 * Merges the models of a recipe into `options.out`.
 * `recipe` is a path to a YAML/JSON recipe file, a parsed Recipe, or a recipe document
 * in mergekit's layout (its relative model paths are taken from the current directory).
 * Resolves to the report; rejects with a DellaError naming the problem, leaving no
 * output behind.
 */
export async function merge(recipe: string | Recipe | Record<string, unknown>, options: MergeOptions): Promise<MergeReport> {
  if (!options || typeof options.out !== 'string' || options.out === '') {
    throw new DellaError('E_ARGS', 'merge(recipe, options) needs options.out, the output directory');
  }
  checkMergeOptions(options); // a misspelt option is named before a recipe's problems
  return runMerge(await toRecipe(recipe), options);
}

/**
 * Merges and yields the merged tensors instead of writing files:
 *
 *   for await (const t of mergeTensors(recipe, { base, models })) use(t.name, t.data);
 *
 * With `base` and `models` (tensor sets in memory, by recipe position) nothing is read
 * from disk and the recipe's model names are only labels (they may be left out).
 * Cancel with `signal`; break out of the loop to stop early.
 */
export async function* mergeTensors(
  recipe: string | Recipe | Record<string, unknown>, options: TensorStreamOptions = {},
): AsyncGenerator<MergedTensor> {
  expectStreamOptions(options);
  const inMemory = options.base !== undefined || options.models !== undefined;
  yield* streamMerge(await toRecipe(recipe, inMemory, options.base !== undefined), options);
}

/** A recipe object as YAML text, for parseRecipe to check like a file's. */
function documentText(doc: object): string {
  try {
    return yamlStringify(doc);
  } catch (e) {
    throw new DellaError('E_RECIPE', `the recipe object is not plain data (${(e as Error).message})`);
  }
}

async function toRecipe(recipe: string | Recipe | Record<string, unknown>, inMemory = false, baseGiven = true): Promise<Recipe> {
  if (typeof recipe === 'string') return loadRecipe(recipe);
  if (isParsedRecipe(recipe)) return checkedRecipe(recipe);
  const broken = brokenRecipeProblem(recipe);
  if (broken) throw new DellaError('E_ARGS', broken);
  if (recipe && typeof recipe === 'object' && !Array.isArray(recipe)) {
    // Model references as in a file recipe: paths from the current directory, else hub ids.
    if (!inMemory) return parseRecipe(documentText(recipe), { resolvePath: makeResolver(resolve('recipe'), process.cwd()) });
    // In memory, model names are labels: fill in the ones left out.
    const doc = { ...recipe } as Record<string, unknown>;
    // (linear needs none: without options.base, the first model supplies the names, as from files)
    if (doc.base_model === undefined && (doc.merge_method !== 'linear' || baseGiven)) doc.base_model = 'base';
    if (Array.isArray(doc.models)) {
      doc.models = doc.models.map((m: unknown, k: number) =>
        m && typeof m === 'object' && !('model' in m) ? { model: `model-${k}`, ...m } : m);
    }
    return parseRecipe(documentText(doc), { resolvePath: (m) => m });
  }
  throw new DellaError('E_ARGS', 'merge(recipe, ...) takes a recipe file path, a parsed recipe, or a recipe object');
}
