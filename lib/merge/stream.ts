/**
 * Merging without output files: merged tensors handed out as an async iterator, from
 * the recipe's files or from tensors held in memory.
 */
import { DellaError } from '../errors.js';
import { isTensorSet, memoryCheckpoint, type TensorSet } from '../checkpoint/memory.js';
import { showArg } from '../util/show.js';
import { checkOptions } from '../util/options.js';
import { loadNative } from '../native.js';
import type { Recipe } from '../recipe/index.js';
import { inRecipe, openModels, type OpenedModels } from './build.js';
import { planMerge, type TensorPlan } from './plan.js';
import { MAX_UINT8ARRAY } from '../util/bytes.js';
import { abortError, batches, runBatches, runSettings, tensorReport, type BatchContext, type ProgressEvent, type TensorReport } from './run.js';

export interface MergedTensor {
  name: string;
  dtype: string;
  shape: number[];
  /** the merged (or copied) tensor's bytes, little-endian; yours to keep */
  data: Uint8Array;
  report: TensorReport;
}

export interface TensorStreamOptions {
  /** the base model's tensors, when they are in memory rather than in files */
  base?: TensorSet;
  /** the experts' tensors, in recipe order, when they are in memory */
  models?: TensorSet[];
  seed?: number;
  threads?: number;
  signal?: AbortSignal;
  /** as MergeOptions.allowNonFinite: non-finite inputs and overflowing results are warnings, not errors */
  allowNonFinite?: boolean;
  onProgress?: (event: ProgressEvent) => void;
  /**
   * called with each warning: the recipe's and the plan's before the first tensor, and
   * with allowNonFinite those of a batch before its tensors. Without it they go to
   * process.emitWarning (type "DellaMergeWarning"), as `run` prints them.
   */
  onWarning?: (message: string) => void;
}

const NO_MORE = 'no more tensors are yielded'; // (mergeTensors writes nothing in any case)

/** mergeTensors' options, checked (before its recipe is read, too). */
export function expectStreamOptions(options: unknown): asserts options is TensorStreamOptions {
  checkOptions(options, 'mergeTensors(recipe, options)', {
    base: 'checked', models: 'checked', seed: 'checked', threads: 'checked', signal: 'AbortSignal', allowNonFinite: 'boolean',
    onProgress: 'function', onWarning: 'function',
  }, ['base', 'models']);
}

/**
 * Refuses, before anything is merged, an output tensor larger than the Uint8Array it
 * would be yielded in can hold (merge() writes such tensors to files).
 */
function checkOutputSizes(tensors: readonly TensorPlan[]): void {
  const big = tensors.find((t) => t.outBytes > MAX_UINT8ARRAY);
  if (big) {
    throw new DellaError('E_SHAPE', `tensor "${big.name}" would be ${big.outBytes} bytes of ${big.outDtype}, more than the 4 GiB that the Uint8Array of a yielded tensor holds in Node.js; ` +
      `merge() writes tensors that large to files${big.outDtype === 'F32' || big.outDtype === 'F64' ? ', and out_dtype: bfloat16 halves it' : ''}`);
  }
}

/**
 * Merges without writing files: yields each output tensor (name order, a batch at a
 * time) as an async iterator. Inputs come from the recipe's files, or from memory
 * (`options.base` and `options.models`, matched to the recipe's models by position).
 * Memory in flight is one batch of outputs, unless the consumer keeps them.
 */
export async function* streamMerge(recipe: Recipe, options: TensorStreamOptions = {}): AsyncGenerator<MergedTensor> {
  const started = performance.now();
  expectStreamOptions(options);
  const warn = options.onWarning ?? ((message: string) => process.emitWarning(message, { type: 'DellaMergeWarning' }));
  const native = loadNative();
  const { threads, seed } = runSettings(options, recipe, native);
  const inMemory = options.base !== undefined || options.models !== undefined;
  let models: OpenedModels;
  if (inMemory) {
    const K = recipe.models.length;
    // A linear recipe without a base model: its first model supplies the names and the
    // copied tensors (recipe.baseModel names it), so in memory options.base may be left out.
    const firstIsBase = recipe.mergeMethod === 'linear' && recipe.baseModel.model === recipe.models[0]?.model;
    const firstAsBase = options.base === undefined && firstIsBase;
    if (!Array.isArray(options.models) || !(firstAsBase || isTensorSet(options.base)) || options.models.length !== K) {
      const got = !(firstAsBase || isTensorSet(options.base)) ? `options.base is ${showArg(options.base)}`
        : !Array.isArray(options.models) ? `options.models is ${showArg(options.models)}`
        : `options.models has ${options.models.length}`;
      throw new DellaError('E_ARGS', `in-memory merges need options.base (an object or Map of tensors; a linear recipe without base_model may leave it out) and options.models, an array with one such tensor set per recipe model (${K}); ${got}`);
    }
    const sets = options.models;
    for (let k = 0; k < K; k++) {
      if (!isTensorSet(sets[k])) {
        throw new DellaError('E_ARGS', `options.models[${k}] (${recipe.models[k].model}) must be an object or Map from tensor names to {dtype, shape, data}, got ${showArg(sets[k])}`);
      }
    }
    models = {
      base: memoryCheckpoint(recipe.baseModel.model, firstAsBase ? sets[0] : options.base!),
      experts: Array.from({ length: K }, (_, k) => memoryCheckpoint(recipe.models[k].model, sets[k])),
      close() {},
    };
  } else {
    models = openModels(recipe);
  }
  try {
    let plan: ReturnType<typeof planMerge>;
    try {
      plan = planMerge(recipe, models.base, models.experts);
    } catch (e) {
      throw inRecipe(e, recipe);
    }
    checkOutputSizes(plan.tensors);
    const ctx: BatchContext = {
      plan, models, recipe, seed, threads, native, signal: options.signal, cancelled: NO_MORE,
      nonfiniteWarnings: options.allowNonFinite ? [] : null,
    };
    for (const w of [...recipe.warnings, ...plan.warnings]) warn(w);
    let warned = 0;
    const buffers = new Map<string, Uint8Array>();
    const bytesTotal = plan.totals.bytesRead + plan.totals.bytesWritten;
    let bytesDone = 0, tensorsDone = 0;
    const batchesOf = runBatches(ctx, batches(plan.tensors), (group) => {
      for (const t of group) buffers.set(t.name, new Uint8Array(t.outBytes));
      return buffers;
    });
    for await (const done of batchesOf) {
      const found = ctx.nonfiniteWarnings ?? [];
      for (; warned < found.length; warned++) warn(found[warned]);
      for (const t of done) {
        bytesDone += t.plan.inBytes + t.plan.outBytes;
        tensorsDone++;
      }
      options.onProgress?.({
        phase: 'merge', tensorsDone, tensorsTotal: plan.totals.tensors, bytesDone, bytesTotal,
        elapsedSeconds: (performance.now() - started) / 1000, tensor: done[done.length - 1].plan.name,
      });
      for (const t of done) {
        if (options.signal?.aborted) throw abortError(options.signal, NO_MORE); // not only between batches: one may hold hundreds of tensors
        const data = buffers.get(t.plan.name)!;
        buffers.delete(t.plan.name);
        yield { name: t.plan.name, dtype: t.plan.outDtype, shape: t.plan.shape, data, report: tensorReport(plan, t.plan, t.stats, t.slerp) };
      }
    }
  } finally {
    models.close();
  }
}

