// A tensor over 4 GiB, the most one Uint8Array holds in Node 20 (a 256k-token
// vocabulary's embedding in float32 is 4.7 GB): merged, written, assembled from parts and
// verified like any other, from sparse input files (holes read as zeros) with a few
// values placed across the 4 GiB line.
import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, ftruncateSync, mkdirSync, openSync, readdirSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { assemble, merge, mergeTensors, openCheckpoint, parseRecipe, saveModel, verifyMerge } from '../lib/index.js';
import { tensorWindows } from '../lib/checkpoint/model.js';
import { loadNative } from '../lib/native.js';
import { refused } from './helpers/errors.js';
import { tempDir } from './helpers/models.js';

// BF16 [65537, 32768]: 4 GiB + 64 KiB.
const ROWS = 65537, COLS = 32768, BYTES = ROWS * COLS * 2;
const root = resolve(import.meta.dirname, '..');
const ONE = 0x3f80, TWO = 0x4000; // bf16 1.0 and 2.0
// The expert's change (+2.0) and values the base and the expert share (1.0, no change):
// at the ends, at the 4 GiB line (element 2^31, in the last row) and around it.
const CHANGED = [0, 1, COLS - 1, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 5, ROWS * COLS - 1];
const SHARED = [7, 2 ** 31 - 2, 2 ** 31 + 100, ROWS * COLS - 2];

/** A sparse file of `size` bytes with bf16 `value` at each element of `at`, from byte `from`. */
function sparseFile(path: string, size: number, from: number, values: Array<[number[], number]>, head?: Buffer): void {
  const fd = openSync(path, 'w');
  if (head) writeSync(fd, head, 0, head.length, 0);
  ftruncateSync(fd, size);
  const b = Buffer.alloc(2);
  for (const [at, value] of values) {
    b.writeUInt16LE(value);
    for (const i of at) writeSync(fd, b, 0, 2, from + 2 * i);
  }
  closeSync(fd);
}

function sparseModel(dir: string, values: Array<[number[], number]>, rows = ROWS): void {
  mkdirSync(dir, { recursive: true });
  const bytes = rows * COLS * 2;
  const json = Buffer.from(JSON.stringify({
    big: { dtype: 'BF16', shape: [rows, COLS], data_offsets: [0, bytes] },
    small: { dtype: 'F32', shape: [2], data_offsets: [bytes, bytes + 8] },
  }));
  const head = Buffer.alloc(8 + json.length);
  head.writeBigUInt64LE(BigInt(json.length));
  json.copy(head, 8);
  sparseFile(join(dir, 'model.safetensors'), head.length + bytes + 8, head.length, values, head);
}

describe('a tensor over 4 GiB', () => {
  // Two tests, one after the other, on the same files: a test of over a minute under
  // AddressSanitizer can lose vitest's worker RPC ('Timeout calling onTaskUpdate').
  const d = tempDir('della-huge-');
  const recipe = { merge_method: 'task_arithmetic', base_model: join(d, 'b'), models: [{ model: join(d, 'e') }] };

  it('merges in parts and assembles them, every byte as expected (sparse files)', async () => {
    sparseModel(join(d, 'b'), [[SHARED, ONE]]);
    sparseModel(join(d, 'e'), [[SHARED, ONE], [CHANGED, TWO]]);
    // The tensor's expected bytes, as a sparse file hashed straight from its map.
    sparseFile(join(d, 'want'), BYTES, 0, [[SHARED, ONE], [CHANGED, TWO]]);
    const native = loadNative();
    const want = new native.MappedFile(join(d, 'want'));
    const wanted = native.xxh64({ map: want, offset: 0, length: BYTES });
    want.close();

    // Part 1 holds the large tensor (parts are balanced by bytes), part 2 the small one.
    const p1 = await merge(recipe, { out: join(d, 'p1'), part: { index: 1, count: 2 } });
    await merge(recipe, { out: join(d, 'p2'), part: { index: 2, count: 2 } });
    expect(p1.tensorReports.map((t) => t.name)).toEqual(['big']);
    await assemble([join(d, 'p1'), join(d, 'p2')], join(d, 'out'));
    rmSync(join(d, 'p1'), { recursive: true });
    const c = openCheckpoint(join(d, 'out'));
    try {
      expect(native.xxh64(c.slice('big'))).toBe(wanted);
    } finally {
      c.close();
    }
  }, 300_000);

  it('is read back in windows and as a copy, verifies, and is refused by mergeTensors', async () => {
    const c = openCheckpoint(join(d, 'out'));
    try {
      await refused(() => c.bytes('big'), 'E_ARGS', /is 4295032832 bytes, more than the 4 GiB one Uint8Array holds in Node\.js: read it with data\("big"\)/);
      let bytes = 0;
      for (const w of tensorWindows(c, 'big')) bytes += w.byteLength;
      expect(bytes).toBe(BYTES);
      const all = c.data('big') as DataView; // a copy, in a DataView
      expect(all).toBeInstanceOf(DataView);
      expect(CHANGED.map((i) => all.getUint16(2 * i, true))).toEqual(CHANGED.map(() => TWO));
      expect(SHARED.map((i) => all.getUint16(2 * i, true))).toEqual(SHARED.map(() => ONE));
    } finally {
      c.close();
    }
    const report = await verifyMerge(join(d, 'out'), parseRecipe(JSON.stringify(recipe)));
    expect([report.ok, report.problems]).toEqual([true, []]);
    // mergeTensors yields Uint8Arrays: refused before anything is merged.
    await refused(async () => { for await (const _ of mergeTensors(recipe)) void _; }, 'E_SHAPE', /"big" would be 4295032832 bytes of BF16, more than the 4 GiB that the Uint8Array of a yielded tensor holds in Node\.js; merge\(\) writes tensors that large to files$/);
  }, 300_000);

  it('saveModel writes one from a typed array (a Float32Array holds 2^32 elements), and reads it back', async () => {
    // 2^30 + 1 floats: 4 GiB + 4 bytes, in untouched (zero) pages but for a few values.
    const n = 2 ** 30 + 1;
    const data = new Float32Array(n);
    [0, 2 ** 30 - 1, 2 ** 30].forEach((i, k) => { data[i] = k + 1.5; });
    const d = tempDir('della-huge-save-');
    saveModel(join(d, 'm'), [{ name: 'w', dtype: 'F32', shape: [n], data }, { name: 'x', dtype: 'F32', shape: [1], data: new Float32Array([3]) }]);
    const native = loadNative();
    const c = openCheckpoint(join(d, 'm'));
    try {
      expect(c.tensors.get('w')!.byteLength).toBe(4 * n);
      expect(native.xxh64(c.slice('w'))).toBe(native.xxh64(new DataView(data.buffer)));
      expect([...(c.array('x') as Float32Array)]).toEqual([3]);
      const w = c.array('w') as Float32Array; // a copy over 4 GiB, as a Float32Array
      expect([w.length, w[0], w[2 ** 30 - 1], w[2 ** 30]]).toEqual([n, 1.5, 2.5, 3.5]);
    } finally {
      c.close();
    }
  }, 120_000);

  // ulimit -v and AddressSanitizer's terabytes of reserved shadow memory do not mix.
  it.skipIf((process.env.LD_PRELOAD ?? '').includes('asan'))('merges it slab by slab in a fraction of its size; staged whole, no memory is one clear error', () => {
    // BF16 [32769, 32768] in, float32 out: 4 GiB + 128 KiB of output, in a process
    // allowed 7.5 GB of address space (the two inputs' maps take 4.3 GB).
    const d = tempDir('della-huge-oom-');
    sparseModel(join(d, 'b'), [], 32769);
    sparseModel(join(d, 'e'), [[[0], TWO]], 32769);
    const recipe = join(d, 'r.json');
    writeFileSync(recipe, JSON.stringify({ merge_method: 'task_arithmetic', base_model: join(d, 'b'), models: [{ model: join(d, 'e') }], out_dtype: 'float32' }));
    const run = (out: string, env: NodeJS.ProcessEnv = {}) => spawnSync('bash', ['-c', 'ulimit -v 7500000; exec "$0" bin/della-merge.js run "$1" --out "$2"', process.execPath, recipe, join(d, out)],
      { cwd: root, encoding: 'utf8', env: { ...process.env, ...env } });
    // Written slab by slab (16 MiB slabs), it fits.
    const slabbed = run('out');
    expect(slabbed.status, slabbed.stderr).toBe(0);
    const c = openCheckpoint(join(d, 'out'));
    try {
      const w = tensorWindows(c, 'big').next().value as Uint8Array;
      expect([...new Float32Array(w.buffer, w.byteOffset, 2)]).toEqual([2, 0]); // base 0 + delta 2, then 0 + 0
    } finally {
      c.close();
    }
    rmSync(join(d, 'out'), { recursive: true });
    // Staged whole (slabs as large as the tensor), the 4 GiB of staging are not there:
    // V8's napi_create_arraybuffer ended the process when it had no memory to give.
    const whole = run('out', { DELLA_SLAB_BYTES: String(2 ** 32) });
    expect([whole.status, whole.stderr.trim()], whole.stderr).toEqual([1, 'della-merge: not enough memory for 4299161600 bytes of output staging, where merged tensors wait to be written ' +
      '(allocStaging: out of memory for 4299161600 bytes); a tensor staged whole (a copy, a merge on a GPU, rows longer than a slab) needs room for all of its output: free memory, or merge it with a narrower out_dtype']);
    expect(existsSync(join(d, 'out'))).toBe(false);
    expect(readdirSync(d).sort()).toEqual(['b', 'e', 'r.json']);
  }, 180_000);
});
