/**
 * The output path: OutputFile (ranges written off the JS thread, O_DIRECT where the file
 * system allows it), the staging pool that bounds the memory on its way there, and the
 * layout of a batch's tensors in one staging buffer.
 */
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadNative, type NativeOutputFile } from '../lib/native.js';
import { STAGING_BLOCK, StagingPool } from '../lib/checkpoint/staging.js';
import { stagingLayout } from '../lib/merge/output.js';
import { merge } from '../lib/index.js';
import { makeModels, tempDir } from './helpers/models.js';
import { int, rng, testSeed } from './helpers/random.js';

const seed = testSeed();
const native = loadNative();

/** Cuts [0, size) into ranges of random lengths, shuffled. */
function ranges(r: () => number, size: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (let at = 0; at < size;) {
    const len = Math.min(size - at, r() < 0.4 ? int(r, 1, 50) : r() < 0.7 ? int(r, 1, 6000) : int(r, 1, 200_000));
    out.push([at, len]);
    at += len;
  }
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(r() * (i + 1));
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

describe(`OutputFile (DELLA_TEST_SEED=${seed})`, () => {
  for (const direct of [true, false]) {
    it(`${direct ? 'O_DIRECT where possible' : 'through the page cache'}: ranges in any order give the file, byte for byte`, async () => {
      const r = rng(seed + (direct ? 1 : 2));
      const dir = tempDir('della-out-');
      for (const size of [1, 4095, 4096, 4097, 3 * 4096 + 7, int(r, 1, 1_500_000)]) {
        const want = new Uint8Array(size).map(() => Math.floor(r() * 256));
        const path = join(dir, `f${size}`);
        const f: NativeOutputFile = new native.OutputFile(path, size, direct);
        if (!direct) expect(f.direct).toBe(false);
        // Sources: staging memory placed like the file (the direct path), or plain
        // arrays at any address (the bounce path).
        await Promise.all(ranges(r, size).map(([at, len]) => {
          let src: Uint8Array;
          if (r() < 0.5) {
            const phase = at % STAGING_BLOCK;
            src = native.allocStaging(phase + len).subarray(phase, phase + len);
          } else {
            src = new Uint8Array(len);
          }
          src.set(want.subarray(at, at + len));
          return f.write(at, src);
        }));
        f.close();
        expect(Buffer.compare(readFileSync(path), Buffer.from(want)), `seed ${seed}, size ${size}`).toBe(0);
      }
    });
  }

  it('refuses misuse with messages naming the file', async () => {
    const dir = tempDir('della-out-');
    const path = join(dir, 'x');
    writeFileSync(path, 'old');
    expect(() => new native.OutputFile(path, 10, true)).toThrow(/cannot create.*exists/);
    expect(readFileSync(path, 'utf8')).toBe('old');
    expect(() => new native.OutputFile(join(dir, 'no', 'such', 'dir'), 10, true)).toThrow(/cannot create/);
    const f = new native.OutputFile(join(dir, 'y'), 10_000, true);
    expect(() => f.write(9_990, new Uint8Array(20))).toThrow(/outside the file of 10000 bytes/);
    await f.write(0, new Uint8Array(100));
    await expect(f.write(50, new Uint8Array(10))).rejects.toThrow(/written more than once/);
    // Most of the file was never written: closing says so.
    expect(() => f.close()).toThrow(/never completed/);
    expect(() => f.write(0, new Uint8Array(1))).toThrow(/closed/);
    expect(existsSync(join(dir, 'y'))).toBe(true); // the caller (OutputDirectory) removes it
  });
});

describe('StagingPool', () => {
  const alloc = (n: number) => new Uint8Array(n);

  it('reuses released buffers', async () => {
    const pool = new StagingPool(alloc, 64 << 20);
    const a = await pool.acquire(1000);
    pool.release(a);
    expect(await pool.acquire(900)).toBe(a);
  });

  it('holds at most its budget, waiting for releases, and never blocks a lone request', async () => {
    const mib = 1 << 20;
    const pool = new StagingPool(alloc, 10 * mib);
    const big = await pool.acquire(40 * mib); // over budget, but nothing else is out
    expect(big.byteLength).toBeGreaterThanOrEqual(40 * mib);
    let granted = false;
    const next = pool.acquire(mib).then((b) => { granted = true; return b; });
    await new Promise((r) => setTimeout(r, 20));
    expect(granted).toBe(false);
    pool.release(big);
    const b = await next;
    expect(granted).toBe(true);
    expect(b).toBe(big); // the idle buffer is big enough: reused
    expect(pool.heldBytes).toBe(big.byteLength); // nothing new was allocated
  });

  it('drops idle buffers too small for a request instead of growing past the budget', async () => {
    const mib = 1 << 20;
    const pool = new StagingPool(alloc, 12 * mib);
    const small = await pool.acquire(mib);
    pool.release(small);
    const large = await pool.acquire(10 * mib);
    expect(large).not.toBe(small);
    expect(pool.heldBytes).toBe(large.byteLength);
  });
});

describe('stagingLayout', () => {
  it('joins tensors contiguous in a file into runs placed like the file in the buffer', () => {
    const fa = {} as NativeOutputFile, fb = {} as NativeOutputFile;
    const { runs, bytes } = stagingLayout([
      { name: 'b', file: fa, offset: 5000, length: 100 },
      { name: 'a', file: fa, offset: 4990, length: 10 },
      { name: 'c', file: fa, offset: 9000, length: 3 },
      { name: 'd', file: fb, offset: 8, length: 4096 },
    ]);
    expect(runs.map((r) => [r.names, r.offset, r.length])).toEqual([
      [['a', 'b'], 4990, 110], [['c'], 9000, 3], [['d'], 8, 4096],
    ]);
    for (const r of runs) expect(r.at % STAGING_BLOCK).toBe(r.offset % STAGING_BLOCK);
    for (let i = 1; i < runs.length; i++) expect(runs[i].at).toBeGreaterThanOrEqual(runs[i - 1].at + runs[i - 1].length);
    expect(bytes % STAGING_BLOCK).toBe(0);
    expect(bytes).toBeGreaterThanOrEqual(runs[2].at + runs[2].length);
  });
});

describe(`merge output (DELLA_TEST_SEED=${seed})`, () => {
  it('the same files with O_DIRECT and through the page cache, over many shards and batches', async () => {
    const r = rng(seed + 3);
    const dir = tempDir();
    // F16 experts stored as F32 and the I64 tensor: shards mix widths, so batches span
    // several runs and files; 700-byte shards put most tensor edges mid-block.
    const models = makeModels(r, dir, { dtype: 'F16', experts: 2, layers: 6 });
    const recipe = {
      merge_method: 'dare_ties', base_model: models.base, out_dtype: 'F32',
      models: models.experts.map((m) => ({ model: m, parameters: { density: 0.6 } })),
    };
    const before = process.env.DELLA_DIRECT_IO;
    const outs: string[] = [];
    try {
      for (const flag of ['1', '0']) {
        process.env.DELLA_DIRECT_IO = flag;
        const out = join(dir, `out${flag}`);
        await merge(recipe, { out, shardSize: 700 });
        outs.push(out);
      }
    } finally {
      if (before === undefined) delete process.env.DELLA_DIRECT_IO;
      else process.env.DELLA_DIRECT_IO = before;
    }
    const files = readdirSync(outs[0]).filter((f) => f.endsWith('.safetensors')).sort();
    expect(files.length).toBeGreaterThan(3);
    expect(readdirSync(outs[1]).filter((f) => f.endsWith('.safetensors')).sort()).toEqual(files);
    for (const f of files) expect(readFileSync(join(outs[0], f)).equals(readFileSync(join(outs[1], f))), f).toBe(true);
  });
});
