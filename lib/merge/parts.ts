/**
 * Scale-out: a merge split into N parts (`run --part i/N`), each a deterministic,
 * byte-balanced share of the tensors written as its own shards, and `assemble`, which
 * joins the parts into exactly the files one run would have written. Every tensor's
 * bytes depend only on the inputs, the recipe and the seed (SPEC), never on which
 * process computed them, so any job runner can run the parts anywhere.
 */
import { existsSync, lstatSync, readFileSync, statSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { join, resolve } from 'node:path';
import { DellaError, ioError } from '../errors.js';
import { checkOptions } from '../util/options.js';
import { readRegularFile } from '../util/fs.js';
import { firstChange, openInput, tensorWindows, type Checkpoint } from '../checkpoint/model.js';
import { CONFIG_FILES, TOKENIZER_FILES } from '../checkpoint/extras.js';
import { DTYPE_SIZES } from '../checkpoint/safetensors.js';
import { showShort as show } from '../util/show.js';
import { indexJson, INDEX_FILE, layoutShards, OutputDirectory, type OutputTensor, type ShardFiles } from '../checkpoint/writer.js';
import type { Recipe } from '../recipe/index.js';
import type { MergePlan, TensorPlan } from './plan.js';
import { recordedDigests, RUN_FILE, sortedDigests, storedDigest, type DigestAlgorithm, type RunRecord } from './record.js';

export const PART_FILE = 'della_merge_part.json';

export interface PartRecord extends RunRecord {
  part: number;
  of: number;
  shardSize: number;
  /** every tensor of the whole merge, for assembling its layout */
  planned: OutputTensor[];
  /** identifies the whole merge (its plan, the recipe's models, a sample of their bytes): parts must agree */
  planDigest: string;
}

export function parsePart(text: string): { index: number; count: number } {
  const m = /^(\d+)\/(\d+)$/.exec(text.trim());
  if (!m) throw new DellaError('E_ARGS', `--part takes i/N, e.g. 2/8 (part 2 of 8), got "${text}"`);
  // (as typed: 9007199254740993 would read as ...992)
  if (m[1].length > 15 || m[2].length > 15) throw new DellaError('E_ARGS', `part ${text.trim()} is not valid: at most ${MAX_PARTS} parts`);
  return checkPart({ index: Number(m[1]), count: Number(m[2]) });
}

/** More parts than this are refused: the balancing keeps a load per part (and a model
 * has far fewer tensors, so more parts would all be empty). */
export const MAX_PARTS = 65536;

export function checkPart(p: { index: number; count: number }): { index: number; count: number } {
  if (p === null || typeof p !== 'object') throw new DellaError('E_ARGS', `part must be { index, count }, got ${show(p)}`);
  const extra = Object.keys(p).find((k) => k !== 'index' && k !== 'count');
  if (extra !== undefined) throw new DellaError('E_ARGS', `part must be { index, count }, got a key ${JSON.stringify(extra)} too`);
  if (!Number.isSafeInteger(p.count) || p.count < 1 || !Number.isSafeInteger(p.index) || p.index < 1 || p.index > p.count) {
    throw new DellaError('E_ARGS', `part ${show(p.index)}/${show(p.count)} is not valid: use i/N with 1 <= i <= N`);
  }
  if (p.count > MAX_PARTS) throw new DellaError('E_ARGS', `part ${p.index}/${p.count}: at most ${MAX_PARTS} parts`);
  return p;
}

/**
 * The tensors of part `index` of `count`: largest first, each to the part with the
 * fewest bytes so far (ties to the lower part, then by name), so parts are balanced by
 * bytes and the assignment depends only on the plan.
 */
export function partTensors(tensors: readonly TensorPlan[], index: number, count: number): TensorPlan[] {
  const order = [...tensors].sort((a, b) => b.inBytes + b.outBytes - (a.inBytes + a.outBytes) || (a.name < b.name ? -1 : 1));
  const load = new Array(count).fill(0);
  const mine = new Set<string>();
  for (const t of order) {
    let best = 0;
    for (let p = 1; p < count; p++) if (load[p] < load[best]) best = p;
    load[best] += t.inBytes + t.outBytes;
    if (best === index - 1) mine.add(t.name);
  }
  return tensors.filter((t) => mine.has(t.name));
}

/** The bytes of each input sampled for planDigest: enough to tell two fine-tunes apart. */
const SAMPLE_BYTES = 64 << 10;

/**
 * Identifies the whole merge, which every part must share: each tensor's plan (name,
 * kind, dtype, shape, resolved parameters) and the inputs, by the recipe's model names
 * in order and the first 64 KiB of two matrices of each input. Experts swapped in one
 * part's recipe, or a model updated between two parts' runs, plan the same tensors but
 * merge other values.
 */
export function planDigest(plan: MergePlan, recipe: Recipe, inputs: readonly Checkpoint[]): string {
  const h = createHash('sha256');
  for (const t of plan.tensors) h.update(`${t.name}\0${t.kind}\0${t.outDtype}\0${t.shape.join(',')}\0${JSON.stringify(t.params)}\n`);
  h.update(`base\0${recipe.baseModel.model}\n`);
  for (const m of recipe.models) h.update(`model\0${m.model}\n`);
  // Matrices, not norms or biases (which a LoRA fine-tune leaves as they were); small
  // enough for one view in every input.
  const sampled = plan.tensors.filter((t) => t.kind === 'merge' && t.shape.length >= 2 &&
    [t.base, ...t.experts].every((x) => x.byteLength > 0 && x.byteLength <= 2 ** 30)).slice(0, 2);
  for (const t of sampled) {
    for (const c of inputs) {
      const bytes = c.bytes(t.name);
      h.update(`${t.name}\0`).update(bytes.subarray(0, Math.min(SAMPLE_BYTES, bytes.byteLength)));
    }
  }
  return h.digest('hex');
}

const isCount = (v: unknown, min: number): v is number => Number.isSafeInteger(v) && (v as number) >= min;

/** What is wrong with a parsed part record, or null: assemble trusts nothing in it unchecked. */
function recordProblem(r: unknown): string | null {
  if (r === null || typeof r !== 'object' || Array.isArray(r)) return `it holds ${show(r)}, not a JSON object`;
  const o = r as Record<string, unknown>;
  const got = (k: string) => (Object.hasOwn(o, k) ? `"${k}" is ${show(o[k])}` : `"${k}" is missing`);
  if (!isCount(o.of, 1) || !isCount(o.part, 1) || o.part > o.of) return `${got('part')} and ${got('of')}, not i and N with 1 <= i <= N`;
  if (!isCount(o.shardSize, 1)) return `${got('shardSize')}, not a positive integer`;
  if (!isCount(o.seed, 0)) return `${got('seed')}, not a non-negative integer`;
  for (const k of ['version', 'method', 'planDigest']) if (typeof o[k] !== 'string') return `${got(k)}, not a string`;
  if (!Array.isArray(o.planned)) return `${got('planned')}, not a list of tensors`;
  const names = new Set<string>();
  for (const [i, t] of (o.planned as unknown[]).entries()) {
    const e = t as Partial<OutputTensor> | null;
    const bad = `"planned"[${i}] ${show(t)}`;
    if (e === null || typeof e !== 'object' || typeof e.name !== 'string' || e.name === '') return `${bad} has no tensor name`;
    if (typeof e.dtype !== 'string' || !Object.hasOwn(DTYPE_SIZES, e.dtype)) return `${bad} has no known dtype`;
    if (!Array.isArray(e.shape) || !e.shape.every((d) => isCount(d, 0))) return `${bad} has no valid shape`;
    const bytes = e.shape.reduce((a: number, d: number) => a * d, DTYPE_SIZES[e.dtype]);
    if (!isCount(e.byteLength, 0) || e.byteLength !== bytes) return `${bad}: "byteLength" is not ${bytes}, the size of its dtype and shape`;
    if (names.has(e.name)) return `"planned" lists tensor "${e.name}" twice`;
    names.add(e.name);
  }
  const d = recordedDigests(o);
  if (d) {
    for (const [name, digest] of Object.entries(d.digests)) {
      if (typeof digest !== 'string') return `the ${d.algorithm} digest of tensor "${name}" is ${show(digest)}, not a string`;
    }
  }
  return null;
}

function readPart(dir: string): PartRecord {
  const file = join(dir, PART_FILE);
  if (!existsSync(dir)) throw new DellaError('E_ARGS', `part directory ${dir} does not exist`);
  try {
    lstatSync(file);
  } catch (e) {
    // (EACCES: a directory that cannot be searched does not say what it holds)
    const code = (e as NodeJS.ErrnoException).code;
    if (code !== 'ENOENT' && code !== 'ENOTDIR') throw ioError(`cannot read ${file}`, e);
    throw new DellaError('E_ARGS', `${dir} is not a part of a split merge: it has no ${PART_FILE}`);
  }
  let text: string;
  try {
    text = readRegularFile(file);
  } catch (e) {
    throw ioError(`cannot read ${file}`, e);
  }
  let record: unknown;
  try {
    record = JSON.parse(text);
  } catch (e) {
    throw new DellaError('E_CHECKPOINT', `${file}: not valid JSON (${(e as Error).message})`);
  }
  const problem = recordProblem(record);
  if (problem) throw new DellaError('E_CHECKPOINT', `${file} is not a valid part record: ${problem}`);
  if (!recordedDigests(record as object)) throw new DellaError('E_CHECKPOINT', `${file} records no tensor digests`);
  return record as PartRecord;
}

/**
 * The files beside the weights that `run` writes: the recipe (run.ts's RECIPE_FILE,
 * named here because run.ts imports this module), the model card, config and
 * tokenizer. Only these are copied from a part: anything else there (logs, a job
 * runner's files) is no part of a merge's output.
 */
export const EXTRA_FILES = ['della_merge_recipe.yaml', 'README.md', ...CONFIG_FILES, ...TOKENIZER_FILES];

const sameShape = (a: readonly number[], b: readonly number[]) => a.length === b.length && a.every((d, i) => d === b[i]);

const aborted = (signal?: AbortSignal) => new DellaError('E_ABORTED', 'assemble was cancelled; nothing was written', signal ? { cause: signal.reason } : undefined);

export interface AssembleReport {
  out: string;
  parts: number;
  tensors: number;
  bytes: number;
  files: string[];
  seconds: number;
}

/**
 * Joins the N part directories of a split merge into `out`, as one run would have
 * written it. Each part's weights are checked against its own record and the plan
 * first. `signal` cancels it (the unfinished output is removed).
 */
export async function assemble(
  partDirs: readonly string[], out: string, options: { overwrite?: boolean; signal?: AbortSignal } = {},
): Promise<AssembleReport> {
  const started = performance.now();
  if (!Array.isArray(partDirs) || !partDirs.every((d) => typeof d === 'string')) {
    throw new DellaError('E_ARGS', `assemble(partDirs, out) takes a list of part directories, got ${show(partDirs)}`);
  }
  if (typeof out !== 'string' || out === '') throw new DellaError('E_ARGS', `assemble(partDirs, out) takes the output directory, got ${show(out)}`);
  if (partDirs.length === 0) throw new DellaError('E_ARGS', 'assemble needs the part directories');
  checkOptions(options, 'assemble(partDirs, out, options)', { overwrite: 'boolean', signal: 'AbortSignal' });
  const dirs = partDirs.map((d) => resolve(d));
  const records = dirs.map(readPart);
  const first = records[0];
  // (compared by value: a record's keys may be reordered, as any JSON tool may write it)
  const samePlanned = (a: readonly OutputTensor[]) => a.length === first.planned.length && a.every((t, j) => {
    const f = first.planned[j];
    return t.name === f.name && t.dtype === f.dtype && sameShape(t.shape, f.shape) && t.byteLength === f.byteLength;
  });
  const byIndex = new Map<number, string>();
  records.forEach((r, i) => {
    const differs = r.of !== first.of ? `it is part ${r.part} of ${r.of}, the other part ${first.part} of ${first.of}`
      : r.seed !== first.seed ? `its seed is ${r.seed}, the other's ${first.seed}`
      : r.shardSize !== first.shardSize ? `its shard size is ${r.shardSize} bytes, the other's ${first.shardSize}`
      : r.method !== first.method ? `its method is ${r.method}, the other's ${first.method}`
      : r.planDigest !== first.planDigest || !samePlanned(r.planned) ? 'their recipes or input models differ (the tensors planned, their parameters, the models named or their bytes)'
      : null;
    if (differs) throw new DellaError('E_ARGS', `${dirs[i]} belongs to a different merge than ${dirs[0]}: ${differs}`);
    if (byIndex.has(r.part)) throw new DellaError('E_ARGS', `part ${r.part}/${r.of} is given twice: ${byIndex.get(r.part) === dirs[i] ? `${dirs[i]} is named twice` : `the part records (${PART_FILE}) of ${byIndex.get(r.part)} and ${dirs[i]} both say part ${r.part}/${r.of}`}`);
    byIndex.set(r.part, dirs[i]);
  });
  const missing = Array.from({ length: first.of }, (_, i) => i + 1).filter((i) => !byIndex.has(i));
  if (missing.length > 0) throw new DellaError('E_ARGS', `parts ${missing.map((i) => `${i}/${first.of}`).join(', ')} are missing`);

  const parts: Checkpoint[] = [];
  let target: OutputDirectory | null = null;
  let shards: ShardFiles | null = null;
  try {
    const owner = new Map<string, Checkpoint>();
    const digests = new Map<string, string>(); // not {}: a tensor may be named "__proto__"
    const recorded = records.map((r) => recordedDigests(r)!);
    const algorithm: DigestAlgorithm = recorded[0].algorithm;
    recorded.forEach((d, i) => {
      if (d.algorithm !== algorithm) throw new DellaError('E_ARGS', `${dirs[i]} was made by a della-merge version that records ${d.algorithm} digests, ${dirs[0]} by one that records ${algorithm}: rerun the parts with one version`);
    });
    const planned = new Map(first.planned.map((t) => [t.name, t]));
    for (const [i, dir] of dirs.entries()) {
      const c = openInput(dir);
      parts.push(c);
      const own = recorded[i].digests;
      const recordFile = join(dir, PART_FILE);
      // A part's weights must be exactly the tensors its own record lists (records
      // swapped between parts, or weights replaced, fail here), each as planned.
      for (const name of c.names) {
        const t = c.tensors.get(name)!;
        const p = planned.get(name);
        if (!p) throw new DellaError('E_CHECKPOINT', `${dir}: tensor "${name}" is not in the merge's plan (${recordFile})`);
        if (t.dtype !== p.dtype || !sameShape(t.shape, p.shape) || t.byteLength !== p.byteLength) {
          throw new DellaError('E_CHECKPOINT', `${dir}: tensor "${name}" is ${t.dtype} [${t.shape.join(', ')}] (${t.byteLength} bytes), but the merge planned ${p.dtype} [${p.shape.join(', ')}] (${p.byteLength} bytes)`);
        }
        if (!Object.hasOwn(own, name)) {
          throw new DellaError('E_CHECKPOINT', `${dir}: tensor "${name}" is not recorded in ${recordFile}: the part's weights and its record do not belong together`);
        }
        if (owner.has(name)) throw new DellaError('E_CHECKPOINT', `tensor "${name}" is in two parts (${owner.get(name)!.path} and ${dir})`);
        owner.set(name, c);
        digests.set(name, own[name]);
      }
      const absent = Object.keys(own).filter((name) => !c.tensors.has(name));
      if (absent.length > 0) {
        throw new DellaError('E_CHECKPOINT', `${recordFile} records ${absent.length} tensor(s) that ${dir} does not hold (first: "${absent[0]}"): the part's weights and its record do not belong together`);
      }
    }
    for (const t of first.planned) {
      if (!owner.has(t.name)) throw new DellaError('E_CHECKPOINT', `tensor "${t.name}" is in no part`);
    }
    if (options.signal?.aborted) throw aborted(options.signal);
    target = OutputDirectory.create(out, { overwrite: options.overwrite, inputs: dirs });
    const layouts = layoutShards(first.planned, first.shardSize);
    shards = target.createShards(layouts);
    let bytes = 0, pending = 0;
    // Straight from the parts' maps to the new files, 64 MB in flight at most.
    try {
      for (const t of first.planned) {
        const at = shards.place(t.name);
        const part = owner.get(t.name)!;
        // What the part's merge wrote, as its record says: bytes damaged since (on disk, in
        // a copy between machines) are refused here, not found later by verify.
        if (storedDigest(algorithm, part, t.name) !== digests.get(t.name)) {
          throw new DellaError('E_CHECKPOINT', `${part.path}: tensor "${t.name}" is not what the part's merge wrote (its ${algorithm} digest differs from the one in ${PART_FILE}): rerun that part`);
        }
        let offset = at.offset;
        for (const w of tensorWindows(part, t.name)) { // a tensor can be more than one view holds
          shards.write(at.file, offset, w, `tensor "${t.name}"`);
          offset += w.byteLength;
        }
        pending += t.byteLength;
        bytes += t.byteLength;
        if (pending >= 64 << 20) {
          await shards.finish();
          pending = 0;
          if (options.signal?.aborted) throw aborted(options.signal);
        }
      }
      await shards.finish();
    } catch (e) {
      // A part cut short fails its copy with a bare "bad address" (EFAULT): name the cause.
      if (!options.signal?.aborted) throwIfPartChanged(parts, e);
      throw e;
    }
    if (options.signal?.aborted) throw aborted(options.signal);
    throwIfPartChanged(parts);
    const files = layouts.map((l) => l.fileName);
    if (layouts.length > 1) {
      target.writeFile(INDEX_FILE, indexJson(layouts));
      files.push(INDEX_FILE);
    }
    // The files each part holds alike beside its weights; writeFile reports a full disk as E_IO.
    for (const f of EXTRA_FILES) {
      const src = join(dirs[0], f);
      let content: Buffer;
      try {
        if (!statSync(src, { throwIfNoEntry: false })?.isFile()) continue;
        content = readFileSync(src);
      } catch (e) {
        throw ioError(`cannot read ${src}`, e);
      }
      target.writeFile(f, content);
      files.push(f);
    }
    // The parts' digest algorithm, so that verify hashes the way they did.
    const run = {
      tool: 'della-merge', version: first.version, method: first.method, seed: first.seed,
      [algorithm]: sortedDigests(Object.fromEntries(digests)),
    };
    target.writeFile(RUN_FILE, `${JSON.stringify(run, null, 2)}\n`);
    files.push(RUN_FILE);
    target.commit();
    return { out: target.target, parts: dirs.length, tensors: first.planned.length, bytes, files: files.sort(), seconds: (performance.now() - started) / 1000 };
  } catch (e) {
    await shards?.finish().catch(() => {});
    target?.abort();
    throw e;
  } finally {
    parts.forEach((c) => c.close());
  }
}

/** An E_IO naming the first part file changed since it was opened (Checkpoint.changed). */
function throwIfPartChanged(parts: Checkpoint[], cause?: unknown): void {
  const change = firstChange(parts);
  if (change) throw new DellaError('E_IO', `${change}; nothing was assembled (rerun it on stable parts)`, { cause });
}
