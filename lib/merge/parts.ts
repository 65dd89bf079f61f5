/**
 * Scale-out: a merge split into N parts (`run --part i/N`), each a deterministic,
 * byte-balanced share of the tensors written as its own shards, and `assemble`, which
 * joins the parts into exactly the files one run would have written. Every tensor's
 * bytes depend only on the inputs, the recipe and the seed (SPEC), never on which
 * process computed them, so any job runner can run the parts anywhere.
 */
import { copyFileSync, existsSync, readFileSync, readdirSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { join, resolve } from 'node:path';
import { DellaError } from '../errors.js';
import { openCheckpoint, type Checkpoint } from '../checkpoint/model.js';
import { indexJson, INDEX_FILE, layoutShards, OutputDirectory, type OutputTensor, type ShardFiles } from '../checkpoint/writer.js';
import type { MergePlan, TensorPlan } from './plan.js';
import { recordedDigests, RUN_FILE, sortedDigests, type DigestAlgorithm, type RunRecord } from './record.js';

export const PART_FILE = 'della_merge_part.json';

export interface PartRecord extends RunRecord {
  part: number;
  of: number;
  shardSize: number;
  /** every tensor of the whole merge, for assembling its layout */
  planned: OutputTensor[];
  /** identifies the whole plan (recipe, inputs' tensor set, seed): parts must agree */
  planDigest: string;
}

export function parsePart(text: string): { index: number; count: number } {
  const m = /^(\d+)\/(\d+)$/.exec(text.trim());
  if (!m) throw new DellaError('E_ARGS', `--part takes i/N, e.g. 2/8 (part 2 of 8), got "${text}"`);
  return checkPart({ index: Number(m[1]), count: Number(m[2]) });
}

export function checkPart(p: { index: number; count: number }): { index: number; count: number } {
  if (!Number.isSafeInteger(p.count) || p.count < 1 || !Number.isSafeInteger(p.index) || p.index < 1 || p.index > p.count) {
    throw new DellaError('E_ARGS', `part ${p.index}/${p.count} is not valid: use i/N with 1 <= i <= N`);
  }
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

export function planDigest(plan: MergePlan): string {
  const h = createHash('sha256');
  for (const t of plan.tensors) h.update(`${t.name}\0${t.kind}\0${t.outDtype}\0${t.shape.join(',')}\0${JSON.stringify(t.params)}\n`);
  return h.digest('hex');
}

function readPart(dir: string): PartRecord {
  const file = join(dir, PART_FILE);
  if (!existsSync(file)) throw new DellaError('E_ARGS', `${dir} is not a part of a split merge: it has no ${PART_FILE}`);
  try {
    return JSON.parse(readFileSync(file, 'utf8')) as PartRecord;
  } catch (e) {
    throw new DellaError('E_CHECKPOINT', `${file}: not valid JSON (${(e as Error).message})`);
  }
}

export interface AssembleReport {
  out: string;
  parts: number;
  tensors: number;
  bytes: number;
  files: string[];
  seconds: number;
}

/** Joins the N part directories of a split merge into `out`, as one run would have written it. */
export async function assemble(partDirs: readonly string[], out: string, options: { overwrite?: boolean } = {}): Promise<AssembleReport> {
  const started = performance.now();
  if (partDirs.length === 0) throw new DellaError('E_ARGS', 'assemble needs the part directories');
  const dirs = partDirs.map((d) => resolve(d));
  const records = dirs.map(readPart);
  const first = records[0];
  const byIndex = new Map<number, string>();
  records.forEach((r, i) => {
    if (r.of !== first.of || r.planDigest !== first.planDigest || r.seed !== first.seed || r.shardSize !== first.shardSize) {
      throw new DellaError('E_ARGS', `${dirs[i]} belongs to a different merge than ${dirs[0]} (recipe, inputs, seed or shard size differ)`);
    }
    if (byIndex.has(r.part)) throw new DellaError('E_ARGS', `part ${r.part}/${r.of} is given twice: ${byIndex.get(r.part)} and ${dirs[i]}`);
    byIndex.set(r.part, dirs[i]);
  });
  const missing = Array.from({ length: first.of }, (_, i) => i + 1).filter((i) => !byIndex.has(i));
  if (missing.length > 0) throw new DellaError('E_ARGS', `parts ${missing.map((i) => `${i}/${first.of}`).join(', ')} are missing`);

  const parts: Checkpoint[] = [];
  let target: OutputDirectory | null = null;
  let shards: ShardFiles | null = null;
  try {
    const owner = new Map<string, Checkpoint>();
    const digests: Record<string, string> = {};
    const recorded = records.map((r, i) => {
      const d = recordedDigests(r);
      if (!d) throw new DellaError('E_CHECKPOINT', `${join(dirs[i], PART_FILE)} records no tensor digests`);
      return d;
    });
    const algorithm: DigestAlgorithm = recorded[0].algorithm;
    recorded.forEach((d, i) => {
      if (d.algorithm !== algorithm) throw new DellaError('E_ARGS', `${dirs[i]} was made by a della-merge version that records ${d.algorithm} digests, ${dirs[0]} by one that records ${algorithm}: rerun the parts with one version`);
    });
    for (const [i, dir] of dirs.entries()) {
      const c = openCheckpoint(dir);
      parts.push(c);
      for (const name of c.names) {
        if (owner.has(name)) throw new DellaError('E_CHECKPOINT', `tensor "${name}" is in two parts (${owner.get(name)!.path} and ${dir})`);
        owner.set(name, c);
        digests[name] = recorded[i].digests[name];
      }
    }
    for (const t of first.planned) {
      if (!owner.has(t.name)) throw new DellaError('E_CHECKPOINT', `tensor "${t.name}" is in no part`);
    }
    target = OutputDirectory.create(out, { overwrite: options.overwrite });
    const layouts = layoutShards(first.planned, first.shardSize);
    shards = target.createShards(layouts);
    let bytes = 0, pending = 0;
    // Straight from the parts' maps to the new files, 64 MB in flight at most.
    for (const t of first.planned) {
      const at = shards.place(t.name);
      shards.write(at.file, at.offset, owner.get(t.name)!.bytes(t.name), `tensor "${t.name}"`);
      pending += t.byteLength;
      bytes += t.byteLength;
      if (pending >= 64 << 20) {
        await shards.finish();
        pending = 0;
      }
    }
    await shards.finish();
    const files = layouts.map((l) => l.fileName);
    if (layouts.length > 1) {
      target.writeFile(INDEX_FILE, indexJson(layouts));
      files.push(INDEX_FILE);
    }
    // Everything else each part holds alike: config, tokenizer, recipe, model card.
    for (const f of readdirSync(dirs[0])) {
      if (f.endsWith('.safetensors') || f === INDEX_FILE || f === PART_FILE) continue;
      copyFileSync(join(dirs[0], f), target.path(f));
      files.push(f);
    }
    // The parts' digest algorithm, so that verify hashes the way they did.
    const run = {
      tool: 'della-merge', version: first.version, method: first.method, seed: first.seed,
      [algorithm]: sortedDigests(digests),
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
