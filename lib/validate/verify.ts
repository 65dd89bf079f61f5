/**
 * Verifies a merged model against its recipe: the planned tensors with the planned
 * dtypes and shapes, every value finite, copied tensors equal to the base, and sampled
 * rows of every merged tensor recomputed by lib/reference equal to the output bit for
 * bit. Along the way it gathers what users look at when a merge goes wrong.
 */
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { DellaError } from '../errors.js';
import { openInput, tensorRange, tensorWindows, type Checkpoint } from '../checkpoint/model.js';
import { expectRecipe, type Recipe } from '../recipe/index.js';
import { showShort } from '../util/show.js';
import { checkOptions, checkThreads } from '../util/options.js';
import { readRegularFile } from '../util/fs.js';
import { buildMergeTask, planRecipe } from '../merge/build.js';
import type { TensorPlan } from '../merge/plan.js';
import { slerpCoefficients } from '../merge/slerp.js';
import { DIGEST_LABEL, recordedDigests, RUN_FILE, storedDigest, type RunRecord } from '../merge/record.js';
import { DTYPE_CODE, RESCALE_CODE, SPARSIFIER_CODE, type FloatDType } from '../merge/task.js';
import { dataView, dtypeSize, LITTLE_ENDIAN, loadF32 } from '../reference/dtypes.js';
import { geometry, referenceDots } from '../reference/merge-tensor.js';
import { referenceMergeRows, wholeTensorSparsifier } from '../reference/rows.js';
import { tensorId } from '../reference/fnv.js';
import { firstDifference } from '../util/bytes.js';
import { VerifyPool } from './pool.js';

export interface VerifyOptions {
  /** rows recomputed per merged tensor (all rows of tensors up to 65,536 elements); default 3 */
  samples?: number;
  /** the seed the merge used; default: the output's della_merge_run.json, else the recipe's */
  seed?: number;
  onProgress?: (done: number, total: number, tensor: string) => void;
  /** cancels the check (an E_ABORTED rejection; the output is left as it is) */
  signal?: AbortSignal;
  /**
   * threads for the tensors whose rows need passes over the whole tensor (TIES,
   * breadcrumbs, norm rescales), each a worker thread; default: the machine's cores
   * (at most 8) when there are enough such elements to be worth it (64 M a thread), else 1
   */
  threads?: number;
}

export interface TensorCheck {
  name: string;
  kind: 'merge' | 'copy';
  ok: boolean;
  problems: string[];
  rowsChecked: number;
  rowsTotal: number;
  /** merged tensors, over the rows checked: per expert */
  keptFraction?: number[];
  /** fraction of an expert's surviving changes whose sign matches the merged change */
  signAgreement?: number[];
  /** ‖merged change‖ / ‖expert's change‖ */
  normRatio?: number[];
}

export interface VerifyReport {
  ok: boolean;
  out: string;
  method: string;
  seed: number;
  tensors: { checked: number; failed: number };
  rowsChecked: number;
  problems: string[];
  checks: TensorCheck[];
  seconds: number;
}

const SMALL = 65536;

/** Rows to recompute: all of a small tensor, else the first, the last and some between. */
export function sampleRows(name: string, rows: number, numel: number, samples: number): number[] {
  if (numel <= SMALL || rows <= samples) return Array.from({ length: rows }, (_, i) => i);
  const picked = new Set([0, rows - 1]);
  let h = tensorId(name);
  for (let tries = 0; picked.size < Math.min(samples, rows) && tries < 100_000; tries++) {
    h = Math.imul(h ^ (h >>> 15), 0x2c1b3c6d) >>> 0;
    picked.add(h % rows);
  }
  return [...picked].sort((a, b) => a - b);
}

/** Counts non-finite values of a stored float tensor straight from its bits. */
export function countNonFinite(b: ArrayBufferView, dtype: string): number {
  const size = dtype === 'F64' ? 8 : dtype === 'F32' ? 4 : 2;
  const end = b.byteLength;
  let bad = 0;
  if (LITTLE_ENDIAN && b.byteOffset % size === 0) { // typed arrays: several times the DataView's speed
    const count = Math.floor(end / size);
    if (dtype === 'F16' || dtype === 'BF16') {
      const mask = dtype === 'F16' ? 0x7c00 : 0x7f80;
      const h = new Uint16Array(b.buffer, b.byteOffset, count);
      for (let i = 0; i < count; i++) if ((h[i] & mask) === mask) bad++;
    } else if (dtype === 'F32') {
      const w = new Uint32Array(b.buffer, b.byteOffset, count);
      for (let i = 0; i < count; i++) if ((w[i] & 0x7f800000) === 0x7f800000) bad++;
    } else if (dtype === 'F64') {
      const w = new Uint32Array(b.buffer, b.byteOffset, 2 * count);
      for (let i = 1; i < 2 * count; i += 2) if ((w[i] & 0x7ff00000) === 0x7ff00000) bad++;
    }
    return bad;
  }
  const dv = dataView(b);
  if (dtype === 'F16' || dtype === 'BF16') {
    const mask = dtype === 'F16' ? 0x7c00 : 0x7f80;
    for (let i = 0; i + 1 < end; i += 2) if ((dv.getUint16(i, true) & mask) === mask) bad++;
  } else if (dtype === 'F32') {
    for (let i = 0; i + 3 < end; i += 4) if ((dv.getUint32(i, true) & 0x7f800000) === 0x7f800000) bad++;
  } else if (dtype === 'F64') {
    for (let i = 0; i + 7 < end; i += 8) if (!Number.isFinite(dv.getFloat64(i, true))) bad++;
  }
  return bad;
}

/** The merge's own record (seed, digests), when the output still has it. */
function runRecord(out: string): Partial<RunRecord> {
  const file = join(out, RUN_FILE);
  if (!existsSync(file)) return {};
  try {
    const r = JSON.parse(readRegularFile(file)) as Partial<RunRecord>;
    return typeof r === 'object' && r !== null ? r : {};
  } catch {
    return {};
  }
}

export async function verifyMerge(out: string, recipe: Recipe, options: VerifyOptions = {}): Promise<VerifyReport> {
  const started = performance.now();
  if (typeof out !== 'string' || out === '') throw new DellaError('E_ARGS', `verifyMerge(out, recipe) takes the output directory, got ${showShort(out)}`);
  recipe = expectRecipe(recipe, 'verifyMerge(out, recipe)');
  checkOptions(options, 'verifyMerge(out, recipe, options)', { samples: 'checked', seed: 'checked', onProgress: 'function', signal: 'AbortSignal', threads: 'checked' });
  const cancelled = () => new DellaError('E_ABORTED', `the check of ${out} was cancelled; the output is left as it is, unverified`, { cause: options.signal?.reason });
  if (options.signal?.aborted) throw cancelled();
  if (options.seed !== undefined && !(Number.isSafeInteger(options.seed) && options.seed >= 0)) {
    throw new DellaError('E_ARGS', `seed must be an integer in [0, 2^53), got ${showShort(options.seed)}`);
  }
  const samples = options.samples ?? 3;
  if (!Number.isInteger(samples) || samples < 1) throw new DellaError('E_ARGS', `samples must be a positive integer, got ${showShort(samples)}`);
  if (options.threads !== undefined) checkThreads(options.threads);
  if (!existsSync(out)) throw new DellaError('E_ARGS', `${out}: no such output directory`);
  const record = runRecord(out);
  const recorded = record.seed;
  const seed = options.seed ?? (typeof recorded === 'number' && Number.isSafeInteger(recorded) && recorded >= 0 ? recorded : recipe.seed);
  const stored = recordedDigests(record);
  const digests = stored?.digests ?? null;
  const { plan, models } = planRecipe(recipe);
  let merged: Checkpoint | null = null;
  let pool: VerifyPool | null = null;
  let stopWaiting = () => {}; // for the worker threads' results, on the signal
  try {
    merged = openInput(out);
    const problems: string[] = [];
    const checks: TensorCheck[] = [];
    if (!digests) problems.push(`${RUN_FILE} is missing or unreadable: only sampled rows can be checked, not every byte`);
    // A record that holds a seed it cannot have written (the recipe's was used instead).
    if (recorded !== undefined && options.seed === undefined && seed !== recorded) {
      problems.push(`${RUN_FILE} records the seed ${showShort(recorded)}, not an integer in [0, 2^53): rows were recomputed with the recipe's seed ${seed}`);
    }
    // The record says what was merged: another method, or digests of tensors the plan
    // has none of, mean it (or the recipe) is not this output's.
    if (record.method !== undefined && record.method !== plan.method.name) {
      problems.push(`${RUN_FILE} records the method ${showShort(record.method)}, but the recipe's is ${plan.method.name}`);
    }
    const planned = new Set(plan.tensors.map((t) => t.name));
    for (const name of merged.names) {
      if (!planned.has(name)) problems.push(`tensor "${name}" is in the output but not in the plan`);
    }
    const strays = digests ? Object.keys(digests).filter((name) => !planned.has(name)) : [];
    if (strays.length > 0) {
      problems.push(`${RUN_FILE} records digests of ${strays.length} tensor(s) the plan does not have (first: ${showShort(strays[0])})`);
    }
    // The tensors whose rows need passes over the whole tensor go to worker threads
    // (those in the output as planned; the others fail at once, here).
    const whole = plan.tensors.filter((t) => needsPasses(plan, t) && merged!.tensors.get(t.name)?.shape.join(',') === t.shape.join(','));
    const work = whole.reduce((sum, t) => sum + t.numel * t.experts.length, 0);
    const threads = Math.min(whole.length, options.threads ?? (work >= 2 * WORK_PER_THREAD ? Math.min(8, availableParallelism(), Math.floor(work / WORK_PER_THREAD)) : 1));
    const aborted = new Promise<never>((_, reject) => { stopWaiting = () => reject(cancelled()); });
    aborted.catch(() => {});
    if (threads > 1) {
      pool = new VerifyPool({
        out: merged.path, base: models.base.path, experts: models.experts.map((c) => c.path),
        recipe, fingerprint: planFingerprint(plan), seed, samples,
      }, whole.map((t) => t.name), threads);
      options.signal?.addEventListener('abort', stopWaiting, { once: true });
    }
    let rowsChecked = 0;
    let yielded = performance.now();
    for (const [i, t] of plan.tensors.entries()) {
      const check = (pool?.has(t.name) ? await Promise.race([pool.check(t.name), aborted]) : null) ??
        checkTensor(t, merged, plan.method.kind, models, seed, samples, plan);
      const want = digests && Object.hasOwn(digests, t.name) ? digests[t.name] : undefined; // not inherited: constructor, __proto__
      if (digests && merged.tensors.has(t.name)) {
        const have = storedDigest(stored!.algorithm, merged, t.name);
        if (want === undefined) {
          check.ok = false;
          check.problems.push(`tensor "${t.name}": ${RUN_FILE} records no digest for it`);
        } else if (have !== want) {
          check.ok = false;
          // whole digests: two that differ in the last digit must not read as equal
          const wanted = typeof want === 'string' && want.length <= 128 ? want : showShort(want);
          check.problems.push(`tensor "${t.name}": its bytes changed since the merge wrote them, or its record did (${DIGEST_LABEL[stored!.algorithm]} ${have}, recorded ${wanted})`);
        }
      }
      rowsChecked += check.rowsChecked;
      checks.push(check);
      problems.push(...check.problems);
      options.onProgress?.(i + 1, plan.tensors.length, t.name);
      // Back to the event loop every 20 ms, and after the last tensor: a signal (Ctrl-C)
      // is seen only there. (Every 16 tensors, a check of large ones ignored it for seconds.)
      if (performance.now() - yielded > 20 || i === plan.tensors.length - 1) {
        await new Promise((r) => setImmediate(r));
        yielded = performance.now();
      }
      if (options.signal?.aborted) throw cancelled();
    }
    // A file that changed meanwhile (or was cut short: its reads saw zeros) was not what
    // the checks above compared (here, or in a worker thread).
    const changes = new Set<string>();
    for (const c of [merged, models.base, ...models.experts]) {
      const change = c.changed();
      if (change) changes.add(change);
    }
    for (const change of pool ? await pool.finish() : []) changes.add(change);
    for (const change of changes) problems.push(`${change}: rerun verify on files that stay put`);
    return {
      ok: problems.length === 0,
      out: merged.path,
      method: plan.method.name,
      seed,
      tensors: { checked: checks.length, failed: checks.filter((c) => !c.ok).length },
      rowsChecked,
      problems,
      checks,
      seconds: (performance.now() - started) / 1000,
    };
  } finally {
    options.signal?.removeEventListener('abort', stopWaiting);
    await pool?.terminate();
    merged?.close();
    models.close();
  }
}

/** What a worker thread's plan must equal: the tensors, their dtypes, shapes and parameters. */
export function planFingerprint(plan: ReturnType<typeof planRecipe>['plan']): string {
  const h = createHash('sha256');
  h.update(plan.method.name);
  for (const t of plan.tensors) h.update(JSON.stringify([t.name, t.kind, t.outDtype, t.shape, t.base.dtype, t.experts.map((e) => [e.dtype, e.shape]), t.params]));
  return h.digest('hex');
}

/** Elements times experts a verify thread is worth (about a second of passes). */
const WORK_PER_THREAD = 64e6;

/** Whether a tensor's check makes passes over the whole tensor (needsWholeTensor, from the plan). */
function needsPasses(plan: ReturnType<typeof planRecipe>['plan'], t: TensorPlan): boolean {
  if (t.kind !== 'merge' || plan.method.kind !== 'delta' || t.numel <= SMALL) return false;
  const p = t.params!;
  return wholeTensorSparsifier(SPARSIFIER_CODE[plan.method.sparsifier], RESCALE_CODE[p.rescale]) && p.experts.some((e) => e.density < 1);
}

export function checkTensor(
  t: TensorPlan, merged: Checkpoint, kind: string, models: ReturnType<typeof planRecipe>['models'], seed: number,
  samples: number, plan: ReturnType<typeof planRecipe>['plan'],
): TensorCheck {
  const { n, rows } = geometry(t.shape);
  const check: TensorCheck = { name: t.name, kind: t.kind, ok: true, problems: [], rowsChecked: 0, rowsTotal: rows };
  const fail = (message: string) => {
    check.ok = false;
    check.problems.push(`tensor "${t.name}": ${message}`);
  };
  const info = merged.tensors.get(t.name);
  if (!info) {
    fail('missing from the output');
    return check;
  }
  if (info.dtype !== t.outDtype) fail(`dtype ${info.dtype}, planned ${t.outDtype}`);
  if (info.shape.join(',') !== t.shape.join(',')) fail(`shape [${info.shape.join(', ')}], planned [${t.shape.join(', ')}]`);
  if (!check.ok) return check;
  // In windows (whole elements each): a tensor can be more than one view holds.
  let bad = 0;
  for (const w of tensorWindows(merged, t.name)) bad += countNonFinite(w, info.dtype);
  if (bad > 0) fail(`${bad} non-finite value(s)`);
  if (t.kind === 'copy') {
    const theirs = tensorWindows(models.base, t.name);
    for (const w of tensorWindows(merged, t.name)) {
      if (firstDifference(w, theirs.next().value ?? new Uint8Array(0)) >= 0) {
        fail('differs from the base model, from which it is copied');
        break;
      }
    }
    check.rowsChecked = rows;
    return check;
  }
  const slerp = kind === 'slerp'
    ? slerpCoefficients(t.params!.t, referenceDots({
      a: models.base.data(t.name), aDtype: DTYPE_CODE[t.base.dtype as FloatDType],
      b: models.experts[0].data(t.name), bDtype: DTYPE_CODE[t.experts[0].dtype as FloatDType], shape: t.shape,
    }))
    : null;
  const task = buildMergeTask(plan, t, models, new Uint8Array(0), seed, slerp);
  const wanted = sampleRows(t.name, rows, t.numel, samples);
  const K = task.experts.length;
  const agree = new Array(K).fill(0), nonzero = new Array(K).fill(0), rawSq = new Array(K).fill(0);
  let mergedSq = 0;
  const size = dtypeSize(task.outDtype), inSize = dtypeSize(task.baseDtype);
  // The rows checked, as views of the output and the base (the probe sees only them).
  const outRows = new Map(wanted.map((r) => [r, dataView(tensorRange(merged, t.name, r * n * size, (r + 1) * n * size))]));
  const baseRows = task.base ? new Map(wanted.map((r) => [r, dataView(tensorRange(models.base, t.name, r * n * inSize, (r + 1) * n * inSize))])) : null;
  const result = referenceMergeRows(task, wanted, (i, raw, sparsified, m) => {
    const r = Math.floor(i / n), j = i - r * n;
    const change = baseRows ? loadF32(outRows.get(r)!, task.outDtype, j) - loadF32(baseRows.get(r)!, task.baseDtype, j) : m;
    mergedSq += change * change;
    for (let k = 0; k < K; k++) {
      rawSq[k] += raw[k] * raw[k];
      const p = task.experts[k].weight * sparsified[k];
      if (p !== 0) {
        nonzero[k]++;
        if (Math.sign(p) === Math.sign(change)) agree[k]++;
      }
    }
  });
  wanted.forEach((r, idx) => {
    const j = firstDifference(result.rows[idx], outRows.get(r)!);
    if (j >= 0) fail(`row ${r} differs from the reference recomputation (first at element ${r * n + Math.floor(j / size)})`);
  });
  check.rowsChecked = wanted.length;
  if (kind === 'delta') {
    check.keptFraction = result.stats.kept.map((k) => (result.stats.numel ? k / result.stats.numel : 1));
    check.signAgreement = agree.map((a, k) => (nonzero[k] ? a / nonzero[k] : 1));
    check.normRatio = rawSq.map((s) => (s > 0 ? Math.sqrt(mergedSq / s) : 0));
  }
  return check;
}
