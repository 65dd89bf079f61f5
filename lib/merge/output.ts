/**
 * Output of a run: each batch of tensors is merged into one staging buffer, laid out as
 * the tensors' contiguous runs in the shard files, and written from there with one
 * write per run; the buffer goes back to the pool when its writes have landed.
 *
 * A large merged tensor is not staged whole: its share of the buffer is two slabs, and
 * the native kernels write it to the file slab by slab as they merge (FileOutput), so
 * that memory stays at a few slabs' size whatever the size of the model's tensors.
 */
import type { NativeOutputFile } from '../native.js';
import { DellaError } from '../errors.js';
import { STAGING_BLOCK, StagingPool } from '../checkpoint/staging.js';
import type { ShardFiles } from '../checkpoint/writer.js';
import type { TensorPlan } from './plan.js';
import type { FileOutput } from './task.js';
import { DTYPE_SIZES } from '../checkpoint/safetensors.js';
import { geometry } from '../reference/merge-tensor.js';
import { subBytes, type Bytes } from '../util/bytes.js';

/** Each of the two slabs of a tensor written slab by slab (DELLA_SLAB_BYTES overrides it, for tests). */
export const SLAB_BYTES = 16 << 20;

/** The slab size in force: SLAB_BYTES, or DELLA_SLAB_BYTES (a multiple of 4096, at least 8192). */
export function slabBytes(env: NodeJS.ProcessEnv = process.env): number {
  const v = env.DELLA_SLAB_BYTES;
  if (v === undefined || v === '') return SLAB_BYTES;
  const n = Number(v);
  if (!(Number.isSafeInteger(n) && n >= 2 * STAGING_BLOCK && n % STAGING_BLOCK === 0)) {
    throw new DellaError('E_ARGS', `DELLA_SLAB_BYTES must be a multiple of ${STAGING_BLOCK} bytes, at least ${2 * STAGING_BLOCK}; got "${v}"`);
  }
  return n;
}

/**
 * The output bytes of one work item of the CPU kernels (rows_per_item in
 * native/src/kernels/merge_state.h: rows of about 65,536 elements, at least one row),
 * the least a slab must hold.
 */
export function itemBytes(t: TensorPlan): number {
  const { n } = geometry(t.shape);
  return Math.max(1, Math.floor(65536 / Math.max(1, n))) * n * DTYPE_SIZES[t.outDtype];
}

/**
 * Whether a tensor is written slab by slab: a merged tensor (on the native CPU kernels)
 * whose output is larger than its two slabs, and whose work item fits in a slab with
 * room for its place within a block. Others are staged whole.
 */
export function writtenBySlabs(t: TensorPlan, slab: number): boolean {
  return t.kind === 'merge' && t.outBytes > 2 * slab && itemBytes(t) + STAGING_BLOCK <= slab;
}

/** Staging bytes a batch takes: its staged tensors' runs, and two slabs for each tensor written by slabs. */
export function stagingBytes(
  group: readonly TensorPlan[], bySlabs: (t: TensorPlan) => boolean, slab: number,
): number {
  let bytes = 0;
  for (const t of group) bytes += bySlabs(t) ? 2 * slab : t.outBytes + STAGING_BLOCK;
  return bytes;
}

interface Run {
  file: NativeOutputFile;
  /** absolute offset in the file */
  offset: number;
  length: number;
  /** where the run starts in its batch's buffer (same offset modulo the block) */
  at: number;
  names: string[];
}

interface StagedBatch {
  buffer: Bytes;
  /** emptied once written */
  runs: Run[];
  /** writes not yet settled, and tensors the kernels write themselves not yet merged */
  left: number;
}

/** The batch's tensors as runs contiguous in the files, placed block-aligned in one buffer. */
export function stagingLayout(places: ReadonlyArray<{ name: string; file: NativeOutputFile; offset: number; length: number }>): { runs: Run[]; bytes: number } {
  const fileIndex = new Map<NativeOutputFile, number>();
  for (const p of places) if (!fileIndex.has(p.file)) fileIndex.set(p.file, fileIndex.size);
  const sorted = [...places].sort((a, b) => fileIndex.get(a.file)! - fileIndex.get(b.file)! || a.offset - b.offset);
  const runs: Run[] = [];
  for (const p of sorted) {
    const last = runs[runs.length - 1];
    if (last && last.file === p.file && last.offset + last.length === p.offset) {
      last.length += p.length;
      last.names.push(p.name);
    } else {
      runs.push({ file: p.file, offset: p.offset, length: p.length, at: 0, names: [p.name] });
    }
  }
  let bytes = 0;
  for (const r of runs) {
    r.at = bytes + (r.offset % STAGING_BLOCK);
    bytes = Math.ceil((r.at + r.length) / STAGING_BLOCK) * STAGING_BLOCK;
  }
  return { runs, bytes: Math.max(bytes, 1) };
}

export class StagedOutput {
  private readonly shards: ShardFiles;
  private readonly pool: StagingPool;
  private readonly bySlabs: (t: TensorPlan) => boolean;
  private readonly slab: number;
  private readonly batchOf = new Map<string, StagedBatch>();
  private readonly view = new Map<string, Bytes>();

  /** bySlabs: the tensors written to their files slab by slab (`slab` bytes each) by the kernels. */
  constructor(shards: ShardFiles, pool: StagingPool, bySlabs: (t: TensorPlan) => boolean = () => false, slab = SLAB_BYTES) {
    this.shards = shards;
    this.pool = pool;
    this.bySlabs = bySlabs;
    this.slab = slab;
  }

  /** Staging views (or slabbed file outputs) for a batch's tensors (waits while the pool is full). */
  async dests(group: readonly TensorPlan[]): Promise<Map<string, Bytes | FileOutput>> {
    const slabbed = group.filter((t) => this.bySlabs(t));
    const places = group.filter((t) => !this.bySlabs(t)).map((t) => ({ name: t.name, ...this.shards.place(t.name) }));
    const layout = places.length > 0 ? stagingLayout(places) : { runs: [], bytes: 0 };
    const buffer = await this.pool.acquire(layout.bytes + slabbed.length * 2 * this.slab);
    // The buffer goes back when its runs are written and its slabbed tensors merged.
    const batch: StagedBatch = { buffer, runs: layout.runs, left: layout.runs.length + slabbed.length };
    const out = new Map<string, Bytes | FileOutput>();
    for (const r of layout.runs) {
      let at = r.at;
      for (const name of r.names) {
        const length = this.shards.place(name).length;
        const v = subBytes(buffer, at, at + length);
        out.set(name, v);
        this.view.set(name, v);
        this.batchOf.set(name, batch);
        at += length;
      }
    }
    slabbed.forEach((t, i) => {
      const { file, offset } = this.shards.place(t.name);
      const at = layout.bytes + i * 2 * this.slab;
      out.set(t.name, { file, offset, buffer: subBytes(buffer, at, at + 2 * this.slab) });
      this.batchOf.set(t.name, batch);
    });
    return out;
  }

  /** The staged bytes of a finished tensor (until its batch is written); null for one the kernels wrote to its file. */
  bytes(name: string): Bytes | null {
    return this.view.get(name) ?? null;
  }

  /** Starts writing the batch that holds these (finished) tensors. */
  write(names: readonly string[]): void {
    const batches = new Set(names.map((n) => this.batchOf.get(n)!));
    for (const b of batches) {
      const release = () => {
        if (--b.left === 0) this.pool.release(b.buffer);
      };
      for (const r of b.runs) {
        for (const n of r.names) {
          this.batchOf.delete(n);
          this.view.delete(n);
        }
        this.shards.write(r.file, r.offset, subBytes(b.buffer, r.at, r.at + r.length), `tensor "${r.names[0]}"`, release);
      }
      b.runs = [];
      // Tensors written by the kernels are in their files already.
      for (const n of names) {
        if (this.batchOf.get(n) === b && !this.view.has(n)) {
          this.batchOf.delete(n);
          release();
        }
      }
    }
  }
}
