/**
 * The scheduler: opens the models, plans, lays out the output, and feeds the kernels
 * batches of tensors straight from the input maps into reused staging buffers, written
 * to the output files while the next batch merges, with progress, cancellation and
 * cleanup. Memory stays bounded by a few batches: nothing is copied into JS.
 */
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';
import { stringify as yamlStringify } from 'yaml';
import { DellaError } from '../errors.js';
import { checkOptions, checkThreads } from '../util/options.js';
import { showShort } from '../util/show.js';
import { copyExtras, CONFIG_FILES, TOKENIZER_FILES } from '../checkpoint/extras.js';
import { indexJson, INDEX_FILE, layoutShards, OutputDirectory, DEFAULT_SHARD_SIZE, type OutputTensor, type ShardFiles } from '../checkpoint/writer.js';
import { StagingPool } from '../checkpoint/staging.js';
import { firstChange } from '../checkpoint/model.js';
import { slabBytes, StagedOutput, stagingBytes, writtenBySlabs } from './output.js';
import { checkPart, partTensors, planDigest, PART_FILE, type PartRecord } from './parts.js';
import { RUN_FILE, sortedDigests, tensorDigest, type RunRecord } from './record.js';
import { loadNative, packageRoot, type NativeAddon } from '../native.js';
import type { Recipe } from '../recipe/index.js';
import { referenceDots } from '../reference/merge-tensor.js';
import { referenceMergeInto } from '../reference/rows.js';
import { slerpCoefficients } from './slerp.js';
import { modelCard } from './card.js';
import type { MergePlan, TensorPlan } from './plan.js';
import { buildMergeTask, planRecipe, type OpenedModels } from './build.js';
import {
  cudaError, describeDevice, openDevice, openDeviceAsync, parseDevice, type CudaTarget, type DeviceSpec,
} from './device.js';
import { MainThreadProfile } from './profile.js';
import { copyBytes, type Bytes } from '../util/bytes.js';
import {
  DTYPE_CODE, type CopyTaskSpec, type DotTaskSpec, type FileOutput, type FloatDType, type MergeTaskSpec, type MergeTaskStats,
  type NativeMergeTaskSpec,
} from './task.js';

export { planRecipe, openModels, type OpenedModels } from './build.js';

export const RECIPE_FILE = 'della_merge_recipe.yaml';
export { RUN_FILE, type RunRecord } from './record.js';

export interface ProgressEvent {
  /** 'finish': every tensor is written, just before the output is put in place (a
   * callback that throws there still fails the merge, leaving nothing behind) */
  phase: 'merge' | 'finish';
  tensorsDone: number;
  tensorsTotal: number;
  bytesDone: number;
  bytesTotal: number;
  elapsedSeconds: number;
  /** the last tensor finished */
  tensor: string | null;
}

export interface MergeOptions {
  /** output directory (created; must not exist unless overwrite) */
  out: string;
  /** overrides the recipe's seed */
  seed?: number;
  /** kernel threads (default: all cores) */
  threads?: number;
  /** largest shard in bytes of tensor data (default 5 GB) */
  shardSize?: number;
  overwrite?: boolean;
  onProgress?: (event: ProgressEvent) => void;
  signal?: AbortSignal;
  /** 'reference' runs lib/reference instead of the native kernels (slow; for checks) */
  backend?: 'native' | 'reference';
  /**
   * merge tensors holding NaN or infinity, and write merged values that overflow the
   * output dtype (each a warning), instead of refusing them
   */
  allowNonFinite?: boolean;
  /** merge only part `index` (1-based) of `count` byte-balanced parts; join them with assemble */
  part?: { index: number; count: number };
  /**
   * where the kernels run: 'cpu' (default), 'cuda' or 'cuda:N' (the CUDA plugin; same
   * bytes as the CPU). The device opens while the merge sets up; one that cannot be
   * used fails the merge before anything is merged, and leaves no output behind.
   */
  device?: string;
  /** GPU memory budget in bytes (default: min(16 GiB, 85% of the free memory)) */
  gpuMemory?: number;
}

export interface TensorReport {
  name: string;
  kind: 'merge' | 'copy';
  dtype: string;
  shape: number[];
  /** per expert: fraction of its delta that survived sparsification */
  keptFraction?: number[];
  /** the resolved parameters of a merged tensor (those its method reads) */
  parameters?: {
    weight?: number[];
    density?: number[];
    epsilon?: number[];
    gamma?: number[];
    lambda?: number;
    normalize?: boolean;
    consensus?: string;
    rescale?: string;
    /** slerp: the position and the coefficients (out = c0·base + c1·other) */
    t?: number;
    coefficients?: [number, number];
  };
}

export interface MergeReport {
  version: string;
  method: string;
  base: string;
  models: string[];
  out: string;
  files: string[];
  seed: number;
  threads: number;
  backend: 'native' | 'reference';
  /** where the kernels ran: 'cpu' or 'cuda:N (name, memory)' */
  device: string;
  /** set when only one part of the merge was run */
  part?: { index: number; count: number };
  tensors: { total: number; merged: number; copied: number };
  parameters: { total: number; merged: number };
  bytes: { read: number; written: number };
  seconds: number;
  /**
   * Where the seconds went, in order: reading headers and creating the output files
   * (while a GPU opens on another thread), waiting for the GPU to finish opening
   * (`device`, CUDA only: what the setup did not cover), merging (kernels, and writes
   * that overlapped them), waiting for the last writes, and the small files and the
   * final rename.
   */
  phases: { device: number; setup: number; merge: number; flush: number; finish: number };
  warnings: string[];
  tensorReports: TensorReport[];
}

/** Upper bounds of one kernel call: enough work to spread over threads, little latency. */
const BATCH_BYTES = 64 << 20;
const BATCH_TENSORS = 256;
/** Output staging: a little over two batches, at most 1 GiB where batches allow. */
const STAGING_SLACK = 8 << 20;
const STAGING_CAP = 1 << 30;
/**
 * On a GPU, larger calls keep the transfer pipeline full between calls; but each byte of
 * a batch's output also needs fresh staging memory, whose first touch cost more than the
 * drains between smaller calls (DELLA_CUDA_PROFILE on an H100: copying 1 GiB batches'
 * outputs into new staging ran at 2–6 GB/s).
 */
const CUDA_BATCH_BYTES = 256 << 20;
const CUDA_BATCH_TENSORS = 1024;

let version: string | undefined;

/** The package's version, read once. */
export function packageVersion(): string {
  if (version === undefined) {
    try {
      version = (JSON.parse(readFileSync(`${packageRoot}/package.json`, 'utf8')) as { version: string }).version;
    } catch {
      version = 'unknown';
    }
  }
  return version;
}

/** The merge's cancellation, with the signal's reason (signal.abort(reason)) as its cause. */
export function abortError(signal?: AbortSignal, after = 'nothing was written'): DellaError {
  return new DellaError('E_ABORTED', `the merge was cancelled; ${after}`, signal ? { cause: signal.reason } : undefined);
}

export function batches(tensors: readonly TensorPlan[], gpu = false): TensorPlan[][] {
  const out: TensorPlan[][] = [];
  let cur: TensorPlan[] = [];
  let bytes = 0;
  const maxBytes = gpu ? CUDA_BATCH_BYTES : BATCH_BYTES, maxTensors = gpu ? CUDA_BATCH_TENSORS : BATCH_TENSORS;
  for (const t of tensors) {
    const size = t.inBytes + t.outBytes;
    if (cur.length > 0 && (bytes + size > maxBytes || cur.length >= maxTensors)) {
      out.push(cur);
      cur = [];
      bytes = 0;
    }
    cur.push(t);
    bytes += size;
  }
  if (cur.length > 0) out.push(cur);
  return out;
}

/** slerp's coefficients for the merged tensors of a batch (one pass over both models). */
async function slerpBatch(
  plans: TensorPlan[], models: OpenedModels, native: NativeAddon | null, threads: number, recipe: Recipe,
  warnings: string[] | null,
): Promise<Map<string, [number, number]>> {
  const tasks: DotTaskSpec[] = plans.map((t) => ({
    a: native ? models.base.slice(t.name) : models.base.data(t.name), aDtype: DTYPE_CODE[t.base.dtype as FloatDType],
    b: native ? models.experts[0].slice(t.name) : models.experts[0].data(t.name), bDtype: DTYPE_CODE[t.experts[0].dtype as FloatDType],
    shape: t.shape,
  }));
  const sums = native ? await native.dotBatch({ threads, tasks }) : tasks.map(referenceDots);
  const out = new Map<string, [number, number]>();
  plans.forEach((t, i) => {
    checkFinite(t, { nonfinite: sums[i].nonfinite, kept: [], outNonfinite: 0, numel: t.numel }, recipe, warnings);
    out.set(t.name, slerpCoefficients(t.params!.t, sums[i]));
  });
  return out;
}

/**
 * Non-finite inputs are an error, or with allowNonFinite a warning (SPEC §1). So are
 * merged values stored as NaN or infinity from finite inputs (SPEC is silent): an
 * overflow of the output dtype, such as float16 beyond 65504, which would otherwise
 * reach the files unnoticed. `inputsChecked`: the inputs were reported already (slerp's
 * first pass; its second pass counts them again, in its own order [-, base, expert]).
 */
function checkFinite(t: TensorPlan, stats: MergeTaskStats, recipe: Recipe, warnings: string[] | null, inputsChecked = false): void {
  let inputs = 0;
  stats.nonfinite.forEach((count, i) => {
    inputs += count;
    if (count > 0 && !inputsChecked) {
      const model = i === 0 ? `the base model ${recipe.baseModel.model}` : recipe.models[i - 1].model;
      const what = `tensor "${t.name}" of ${model} holds ${count} non-finite value(s) (NaN or infinity)`;
      if (!warnings) throw new DellaError('E_NONFINITE', `${what}; refusing to merge it (--allow-nonfinite, or allowNonFinite: true in the API, merges it anyway)`);
      warnings.push(`${what}; merged anyway`);
    }
  });
  // From non-finite inputs, non-finite results are expected and warned about above.
  if (stats.outNonfinite > 0 && inputs === 0) {
    // Only float16 has a wider dtype to go to; beyond ±3.4e38 the fp32 arithmetic itself
    // overflowed (BF16's own limit, 3.39e38, is within 0.4% of it).
    const f16 = t.outDtype === 'F16';
    const range = f16 ? 'F16 (beyond ±65504)' : 'the fp32 range (beyond ±3.4e38)';
    const what = `tensor "${t.name}": ${stats.outNonfinite} merged value(s) overflowed ${range} to infinity or NaN, from finite inputs`;
    const fixes = `${f16 ? 'store it wider with out_dtype: float32 or bfloat16, ' : ''}lower the weights or lambda, or pass --allow-nonfinite (allowNonFinite: true in the API) to write it anyway`;
    if (!warnings) throw new DellaError('E_NONFINITE', `${what}; refusing to write it (${fixes})`);
    warnings.push(`${what}; written anyway`);
  }
}

export function tensorReport(plan: MergePlan, t: TensorPlan, stats: MergeTaskStats | null, slerp?: [number, number]): TensorReport {
  const r: TensorReport = { name: t.name, kind: t.kind, dtype: t.outDtype, shape: t.shape };
  if (t.params && stats) {
    if (plan.method.kind === 'delta') r.keptFraction = stats.kept.map((k) => (stats.numel === 0 ? 1 : k / stats.numel));
    const p = t.params;
    r.parameters = plan.method.kind === 'slerp'
      ? { t: p.t, coefficients: slerp }
      : plan.method.kind === 'linear'
        ? { weight: p.experts.map((e) => e.weight), normalize: p.normalize }
        : {
          weight: p.experts.map((e) => e.weight),
          density: p.experts.map((e) => e.density),
          ...(plan.method.sparsifier === 'magprune' ? { epsilon: p.experts.map((e) => e.epsilon) } : {}),
          ...(plan.method.sparsifier === 'breadcrumbs' ? { gamma: p.experts.map((e) => e.gamma) } : {}),
          lambda: p.lambda,
          normalize: p.normalize,
          consensus: p.consensus,
          rescale: p.rescale,
        };
  }
  return r;
}

function recipeText(recipe: Recipe): string {
  if (recipe.source) {
    try {
      return readFileSync(recipe.source, 'utf8');
    } catch {
      // fall through to the parsed document
    }
  }
  return yamlStringify(recipe.document);
}

/** The files and directories a merge reads (and its recipe file), which its output must not replace. */
export function inputPaths(models: OpenedModels, recipe?: Recipe): string[] {
  // The recipe an output recorded (rerun into that output) is written again: not kept.
  const recipeFile = recipe?.source && basename(recipe.source) !== RECIPE_FILE ? [recipe.source] : [];
  return [...[models.base, ...models.experts].flatMap((m) => [...m.files, ...(m.dir ? [m.dir] : [])]), ...recipeFile];
}

/** merge()'s options, checked before its recipe is read, too. */
export function checkMergeOptions(options: unknown): void {
  checkOptions(options, 'merge(recipe, options)', {
    out: 'checked', seed: 'checked', threads: 'checked', shardSize: 'checked', overwrite: 'boolean', onProgress: 'function', signal: 'AbortSignal',
    backend: ['native', 'reference'], allowNonFinite: 'boolean', part: 'checked', device: 'string', gpuMemory: 'checked',
  });
}

/** Runs a parsed recipe to completion; see `merge` in index.ts for the public entry. */
export async function runMerge(recipe: Recipe, options: MergeOptions): Promise<MergeReport> {
  const started = performance.now();
  checkMergeOptions(options);
  const backend = options.backend ?? 'native';
  const native = backend === 'native' ? loadNative() : null;
  const { threads, seed } = runSettings(options, recipe, native);
  const slab = slabBytes();
  const shardSize = options.shardSize ?? DEFAULT_SHARD_SIZE;
  if (!(Number.isSafeInteger(shardSize) && shardSize > 0)) {
    throw new DellaError('E_ARGS', `shard size must be a positive number of bytes, got ${shardSize}`);
  }
  // The GPU opens on a worker thread while the recipe is planned and the output set up
  // (CUDA's context takes about 0.3 s on an H100). A device that cannot be used fails
  // the run before anything is merged, and the output directory is removed.
  const spec = deviceSpec(options, native);
  const opening = openDeviceAsync(native as NativeAddon, spec, options.gpuMemory);
  const opened = opening.then(() => undefined, () => undefined); // never leave the open running behind an error
  const clock = phaseClock(started);
  let planned: ReturnType<typeof planRecipe>;
  try {
    if (options.signal?.aborted) throw abortError(options.signal);
    planned = planRecipe(recipe);
  } catch (e) {
    await opened;
    throw e;
  }
  const { plan, models } = planned;
  const nonfiniteWarnings: string[] | null = options.allowNonFinite ? [] : null;
  let cuda: CudaTarget | null = null;
  let out: OutputDirectory | null = null;
  let shards: ShardFiles | null = null;
  try {
    const part = options.part !== undefined ? checkPart(options.part) : null; // (0 or false is not "no part")
    const tensors = part ? partTensors(plan.tensors, part.index, part.count) : plan.tensors;
    out = OutputDirectory.create(options.out, { overwrite: options.overwrite, inputs: inputPaths(models, recipe) });
    const leftovers = out.leftovers();
    const layouts = layoutShards(tensors.map(outputTensor), shardSize);
    shards = out.createShards(layouts);
    const groups = batches(tensors, spec.kind === 'cuda');
    // Large merged tensors go to their files slab by slab from the CPU kernels; the
    // CUDA plugin and lib/reference take whole output buffers.
    const bySlabs = (t: TensorPlan) => native !== null && spec.kind === 'cpu' && writtenBySlabs(t, slab);
    const staged = new StagedOutput(shards, stagingPool(groups, spec.kind === 'cuda', (g) => stagingBytes(g, bySlabs, slab)), bySlabs, slab);
    const reports: TensorReport[] = [];
    const digests: Record<string, string> = Object.create(null); // a tensor may be named __proto__
    const bytesTotal = tensors.reduce((a, t) => a + t.inBytes + t.outBytes, 0);
    let bytesDone = 0;
    let tensorsDone = 0;
    const profile = MainThreadProfile.fromEnv();
    clock.mark('setup');
    cuda = await opening;
    if (options.signal?.aborted) throw abortError(options.signal);
    clock.mark('device');
    const ctx: BatchContext = {
      plan, models, recipe, seed, threads, native, cuda, signal: options.signal, nonfiniteWarnings, profile,
    };
    for await (const done of runBatches(ctx, groups, (group) => staged.dests(group))) {
      const bytes = done.map((t) => staged.bytes(t.plan.name));
      profile.time('writes', () => staged.write(done.map((t) => t.plan.name))); // to disk while the next batch computes
      shards.check();
      for (const [i, t] of done.entries()) {
        // Recorded for `verify`, which detects any later change to the bytes. The CPU
        // kernels hashed these very bytes (their output was this staging view, or the
        // slabs they wrote) as they wrote them, the CUDA plugin as it copied them in;
        // copies are hashed here.
        digests[t.plan.name] = t.stats?.xxh64 ?? profile.time('digests', () => tensorDigest('xxh64', bytes[i]!));
        reports.push(tensorReport(plan, t.plan, t.stats, t.slerp));
        bytesDone += t.plan.inBytes + t.plan.outBytes;
        tensorsDone++;
      }
      options.onProgress?.({
        phase: 'merge', tensorsDone, tensorsTotal: tensors.length, bytesDone, bytesTotal,
        elapsedSeconds: (performance.now() - started) / 1000, tensor: done[done.length - 1].plan.name,
      });
    }
    clock.mark('merge');
    if (profile.enabled) process.stderr.write(`${profile.summary(cuda ? `cuda:${cuda.device}` : 'cpu')}\n`);
    await shards.finish();
    clock.mark('flush');
    if (options.signal?.aborted) throw abortError(options.signal);

    // Everything beside the weights, then the rename that makes it all visible.
    const files = layouts.map((l) => l.fileName);
    if (layouts.length > 1) {
      out.writeFile(INDEX_FILE, indexJson(layouts));
      files.push(INDEX_FILE);
    }
    const tokenizerDir = tokenizerSourceDir(recipe, models);
    files.push(...copyExtras(models.base.dir, out.tmp, CONFIG_FILES));
    const tokenizerFiles = copyExtras(tokenizerDir, out.tmp, TOKENIZER_FILES);
    files.push(...tokenizerFiles);
    const text = recipeText(recipe);
    out.writeFile(RECIPE_FILE, text);
    out.writeFile('README.md', modelCard(recipe, plan.method, text, packageVersion()));
    files.push(RECIPE_FILE, 'README.md');
    const run: RunRecord = { tool: 'della-merge', version: packageVersion(), method: plan.method.name, seed, xxh64: sortedDigests(digests) };
    if (part) {
      const record: PartRecord = {
        ...run, part: part.index, of: part.count, shardSize,
        planned: plan.tensors.map(outputTensor), planDigest: planDigest(plan, recipe, [models.base, ...models.experts]),
      };
      out.writeFile(PART_FILE, `${JSON.stringify(record, null, 2)}\n`);
      files.push(PART_FILE);
    } else {
      out.writeFile(RUN_FILE, `${JSON.stringify(run, null, 2)}\n`);
      files.push(RUN_FILE);
    }
    // 'finish' comes before the output is put in place: an onProgress that throws (or
    // aborts) fails the merge with nothing left, as any other failure does.
    options.onProgress?.({
      phase: 'finish', tensorsDone, tensorsTotal: tensors.length, bytesDone, bytesTotal,
      elapsedSeconds: (performance.now() - started) / 1000, tensor: null,
    });
    if (options.signal?.aborted) throw abortError(options.signal);
    out.commit();
    reports.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    const seconds = (performance.now() - started) / 1000;
    clock.mark('finish');
    const zeroKept = reports.filter((r) => r.keptFraction?.some((f) => f === 0) && r.shape.length > 0);
    const warnings = [...recipe.warnings, ...plan.warnings, ...(nonfiniteWarnings ?? [])];
    if (recipe.tokenizerSource && tokenizerFiles.length === 0) {
      // asked for by name, so its absence is news (mergekit fails there)
      warnings.push(`tokenizer_source "${recipe.tokenizerSource}": ${tokenizerDir ?? 'a lone file'} holds no tokenizer files (${TOKENIZER_FILES.slice(0, 2).join(', ')}, ...), so the output has none`);
    }
    if (leftovers.length > 0) {
      warnings.push(`${leftovers.length} unfinished output(s) of earlier runs into ${out.target} whose process is gone (killed?) are still there, holding disk space: remove ${leftovers.join(', ')}`);
    }
    if (zeroKept.length > 0 && plan.method.sparsifier !== 'none') {
      warnings.push(`${zeroKept.length} tensor(s) kept none of some expert's delta (first: "${zeroKept[0].name}")`);
    }
    const merged = tensors.filter((t) => t.kind === 'merge');
    return {
      version: packageVersion(),
      method: plan.method.name,
      base: recipe.baseModel.model,
      models: recipe.models.map((m) => m.model),
      out: out.target,
      files: files.sort(),
      seed,
      threads,
      backend,
      device: describeDevice(cuda),
      ...(part ? { part: { index: part.index, count: part.count } } : {}),
      tensors: { total: tensors.length, merged: merged.length, copied: tensors.length - merged.length },
      parameters: { total: tensors.reduce((a, t) => a + t.numel, 0), merged: merged.reduce((a, t) => a + t.numel, 0) },
      bytes: { read: tensors.reduce((a, t) => a + t.inBytes, 0), written: tensors.reduce((a, t) => a + t.outBytes, 0) },
      seconds,
      phases: clock.phases(),
      warnings,
      tensorReports: reports,
    };
  } catch (e) {
    await shards?.finish().catch(() => {}); // no write may still read a buffer or a file
    out?.abort();
    await opened;
    throw e;
  } finally {
    models.close();
  }
}

/**
 * Staging memory for the output: room for two batches, one being written while the
 * next is merged (a third waits), but no more than 1 GiB on the CPU unless a single
 * batch needs more (a batch of one huge tensor then waits for the previous write).
 * Bounded by the largest batch, not by the model; on the CPU a large merged tensor
 * takes two slabs of it (bytesOf), not its size.
 */
function stagingPool(groups: readonly TensorPlan[][], cuda: boolean, bytesOf: (group: TensorPlan[]) => number): StagingPool {
  const native = loadNative();
  const largest = groups.reduce((m, g) => Math.max(m, bytesOf(g)), 0);
  // GPU batches are up to 256 MiB: two of them, so that the device never waits for a write.
  const cap = cuda ? 2 * CUDA_BATCH_BYTES + STAGING_SLACK : STAGING_CAP;
  const budget = Math.min(2 * largest + STAGING_SLACK, Math.max(largest + STAGING_SLACK, cap));
  return new StagingPool((n) => {
    try {
      return native.allocStaging(n);
    } catch (e) {
      const big = largest > STAGING_CAP
        ? '; a tensor staged whole (a copy, a merge on a GPU, rows longer than a slab) needs room for all of its output: free memory, or merge it with a narrower out_dtype'
        : '';
      throw new DellaError('E_IO', `not enough memory for ${n} bytes of output staging, where merged tensors wait to be written (${(e as Error).message})${big}`, { cause: e });
    }
  }, budget);
}

type Phase = keyof MergeReport['phases'];

/** Seconds between successive marks, from `started` (a performance.now() value). */
function phaseClock(started: number): { mark(p: Phase): void; phases(): MergeReport['phases'] } {
  const at: MergeReport['phases'] = { device: 0, setup: 0, merge: 0, flush: 0, finish: 0 };
  let last = started;
  return {
    mark(p) {
      const now = performance.now();
      at[p] = (now - last) / 1000;
      last = now;
    },
    phases: () => ({ ...at }),
  };
}

/** Parses options.device; a GPU needs the native backend. */
function deviceSpec(options: { device?: string }, native: NativeAddon | null): DeviceSpec {
  const spec = parseDevice(options.device);
  if (spec.kind === 'cuda' && !native) {
    throw new DellaError('E_ARGS', `the reference backend runs on the CPU only; leave out device "${options.device}"`);
  }
  return spec;
}

/** Parses options.device and opens a CUDA device (null: the CPU). */
export function selectDevice(options: { device?: string; gpuMemory?: number }, native: NativeAddon | null): CudaTarget | null {
  return openDevice(native as NativeAddon, deviceSpec(options, native), options.gpuMemory);
}

/** Threads (default: all cores) and seed (default: the recipe's), checked. */
export function runSettings(
  options: { threads?: number; seed?: number }, recipe: Recipe, native: NativeAddon | null,
): { threads: number; seed: number } {
  const threads = options.threads ?? native?.hardwareThreads ?? 1;
  checkThreads(threads, options.threads);
  const seed = options.seed ?? recipe.seed;
  if (!Number.isSafeInteger(seed) || seed < 0) throw new DellaError('E_ARGS', `seed must be an integer in [0, 2^53), got ${showShort(seed)}`);
  return { threads, seed };
}

export interface BatchContext {
  plan: MergePlan;
  models: OpenedModels;
  recipe: Recipe;
  seed: number;
  threads: number;
  native: NativeAddon | null;
  /** the GPU the merges run on, or null for the CPU */
  cuda?: CudaTarget | null;
  signal?: AbortSignal;
  /** what a cancellation's message says of the output (merge's default: nothing was written) */
  cancelled?: string;
  /** null: non-finite inputs are errors; else they are collected here as warnings */
  nonfiniteWarnings: string[] | null;
  /** DELLA_PROFILE: where the main thread's time goes */
  profile?: MainThreadProfile;
}

export interface FinishedTensor {
  plan: TensorPlan;
  stats: MergeTaskStats | null;
  slerp?: [number, number];
}

interface LaunchedBatch {
  group: TensorPlan[];
  mergePlans: TensorPlan[];
  coefficients: Map<string, [number, number]> | null;
  stats: Promise<MergeTaskStats[]>;
}

/**
 * Merges (or copies) the tensors of `groups` (see batches()) into the buffers `destsFor`
 * gives each group, a group per kernel call; yields each finished batch. The next batch is already computing while the
 * caller handles the one yielded (hashing, reports), and the one after that is read
 * ahead. Checks cancellation, non-finite inputs and input files changing underneath.
 */
export async function* runBatches(
  ctx: BatchContext, groups: readonly TensorPlan[][],
  destsFor: (group: TensorPlan[]) => Map<string, Bytes | FileOutput> | Promise<Map<string, Bytes | FileOutput>>,
): AsyncGenerator<FinishedTensor[]> {
  const { plan, models, recipe, seed, threads, native } = ctx;
  const cuda = ctx.cuda ?? null;
  const profile = ctx.profile ?? new MainThreadProfile(false);
  const inputs = (t: TensorPlan) => (t.kind === 'merge' ? [models.base, ...models.experts] : [models.base]);
  const prefetch = (group: TensorPlan[] | undefined) => profile.time('read-ahead advice', () => {
    for (const t of group ?? []) for (const m of inputs(t)) m.prefetch(t.name);
  });
  const launch = async (g: number): Promise<LaunchedBatch> => {
    const group = groups[g];
    prefetch(groups[g + 1]); // read ahead while this batch computes
    const dests = await profile.wait('waiting for output staging', destsFor(group));
    const t0 = performance.now();
    const destFor = (t: TensorPlan) => dests.get(t.name)!;
    const merges: NativeMergeTaskSpec[] = [];
    const mergePlans: TensorPlan[] = [];
    const copies: CopyTaskSpec[] = [];
    const coefficients = plan.method.kind === 'slerp'
      ? await slerpBatch(group.filter((t) => t.kind === 'merge'), models, native, threads, recipe, ctx.nonfiniteWarnings)
      : null;
    for (const t of group) {
      if (t.kind === 'merge') {
        merges.push(buildMergeTask(plan, t, models, destFor(t), seed, coefficients?.get(t.name) ?? null, native !== null));
        mergePlans.push(t);
      } else {
        copies.push({ src: native ? models.base.slice(t.name) : models.base.data(t.name), dst: destFor(t) as Bytes });
      }
    }
    let stats: Promise<MergeTaskStats[]>;
    if (native && cuda) {
      // The plugin hashes each output as its slabs come back, while the GPU works on.
      stats = native.mergeBatch({ threads, merges, copies, digests: true, cuda: { device: cuda.device, memory: cuda.memory } })
        .catch((e: unknown) => { throw cudaError(e, cuda.device, true); });
    } else if (native) {
      // The kernels hash each output while it is still in cache (see runMerge's digests).
      // A tensor they write to its file themselves fails the batch when that write does,
      // and stops at its next slab when the merge is cancelled.
      const cancel = new Uint8Array(1);
      const onAbort = () => { cancel[0] = 1; };
      ctx.signal?.addEventListener('abort', onAbort, { once: true });
      stats = native.mergeBatch({ threads, merges, copies, digests: true, cancel }).catch((e: unknown) => {
        const marks = e as { outputWrite?: boolean; cancelled?: boolean };
        if (marks.cancelled) throw abortError(ctx.signal, ctx.cancelled);
        throw marks.outputWrite ? new DellaError('E_IO', (e as Error).message, { cause: e }) : e;
      }).finally(() => ctx.signal?.removeEventListener('abort', onAbort));
    } else {
      stats = Promise.resolve(merges.map((m) => referenceMergeInto(m as MergeTaskSpec)));
      for (const c of copies) copyBytes(c.dst, c.src as ArrayBufferView);
    }
    stats.catch(() => {}); // awaited below; never an unhandled rejection meanwhile
    profile.add('building tasks', performance.now() - t0);
    profile.batches++;
    return { group, mergePlans, coefficients, stats };
  };

  prefetch(groups[0]);
  let pending: Promise<LaunchedBatch> | null = null;
  try {
    for (let g = 0; g < groups.length; g++) {
      if (ctx.signal?.aborted) throw abortError(ctx.signal, ctx.cancelled);
      const current = await (pending ?? launch(g));
      pending = null;
      const stats = await profile.wait('waiting for the kernels', current.stats);
      // Start the next batch before this one is checked and handed out.
      if (g + 1 < groups.length && !ctx.signal?.aborted) {
        pending = launch(g + 1);
        pending.catch(() => {});
      }
      // Then drop this batch's input mappings (a few ms of page-table work a batch),
      // once the next batch is with the kernels: done before, it kept them idle.
      const release = () => {
        for (const t of current.group) for (const m of inputs(t)) m.release(t.name);
      };
      if (pending) void pending.then(() => profile.time('dropping input maps', release), release);
      else profile.time('dropping input maps', release);
      // A file rewritten under a map would feed the merge a mix of old and new bytes, and
      // one cut short zeros where its end was (so first: its statistics mean nothing).
      const change = firstChange([models.base, ...models.experts]);
      if (change) throw new DellaError('E_IO', `${change}; the merge is abandoned (rerun it on stable inputs)`);
      const byName = new Map<string, MergeTaskStats>();
      current.mergePlans.forEach((t, i) => {
        checkFinite(t, stats[i], recipe, ctx.nonfiniteWarnings, ctx.plan.method.kind === 'slerp');
        byName.set(t.name, stats[i]);
      });
      yield current.group.map((t) => ({ plan: t, stats: byName.get(t.name) ?? null, slerp: current.coefficients?.get(t.name) }));
    }
  } finally {
    // Never leave a kernel writing into buffers the caller is about to unmap.
    if (pending) await pending.then((b) => b.stats).catch(() => {});
  }
}

function outputTensor(t: TensorPlan): OutputTensor {
  return { name: t.name, dtype: t.outDtype, shape: t.shape, byteLength: t.outBytes };
}

function tokenizerSourceDir(recipe: Recipe, models: OpenedModels): string | null {
  const src = recipe.tokenizerSource;
  if (!src || src === 'base') return models.base.dir;
  const k = recipe.models.findIndex((m) => m.model === src);
  return k >= 0 ? models.experts[k].dir : models.base.dir;
}
