/**
 * Output of a run: each batch of tensors is merged into one staging buffer, laid out as
 * the tensors' contiguous runs in the shard files, and written from there with one
 * write per run; the buffer goes back to the pool when its writes have landed.
 */
import type { NativeOutputFile } from '../native.js';
import { STAGING_BLOCK, StagingPool } from '../checkpoint/staging.js';
import type { ShardFiles } from '../checkpoint/writer.js';
import type { TensorPlan } from './plan.js';
import { subBytes, type Bytes } from '../util/bytes.js';

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
  runs: Run[];
  /** writes not yet settled */
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
  private readonly batchOf = new Map<string, StagedBatch>();
  private readonly view = new Map<string, Bytes>();

  constructor(shards: ShardFiles, pool: StagingPool) {
    this.shards = shards;
    this.pool = pool;
  }

  /** Staging views for a batch's tensors (waits while the pool is full). */
  async dests(group: readonly TensorPlan[]): Promise<Map<string, Bytes>> {
    const places = group.map((t) => ({ name: t.name, ...this.shards.place(t.name) }));
    const layout = stagingLayout(places);
    const buffer = await this.pool.acquire(layout.bytes);
    const batch: StagedBatch = { buffer, runs: layout.runs, left: layout.runs.length };
    const out = new Map<string, Bytes>();
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
    return out;
  }

  /** The staged bytes of a finished tensor (until its batch is written). */
  bytes(name: string): Bytes {
    return this.view.get(name)!;
  }

  /** Starts writing the batch that holds these (finished) tensors. */
  write(names: readonly string[]): void {
    const batches = new Set(names.map((n) => this.batchOf.get(n)!));
    for (const b of batches) {
      for (const r of b.runs) {
        for (const n of r.names) {
          this.batchOf.delete(n);
          this.view.delete(n);
        }
        this.shards.write(r.file, r.offset, subBytes(b.buffer, r.at, r.at + r.length), `tensor "${r.names[0]}"`, () => {
          if (--b.left === 0) this.pool.release(b.buffer);
        });
      }
    }
  }
}
