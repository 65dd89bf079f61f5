// Large merged tensors are written to their files slab by slab by the CPU kernels
// (lib/merge/output.ts, native/src/binding/file_row_sink.cc), so that memory does not
// grow with a tensor's size. With small slabs (DELLA_SLAB_BYTES) several slabs make up
// each large tensor here: the output must equal the reference backend's (which stages
// every tensor whole) byte for byte, with the same reports, and verify from its
// recorded digests.
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { merge, openCheckpoint, parseRecipe, verifyMerge } from '../lib/index.js';
import { loadNative } from '../lib/native.js';
import { METHODS } from '../lib/merge/methods.js';
import { itemBytes, slabBytes, writtenBySlabs } from '../lib/merge/output.js';
import type { TensorPlan } from '../lib/merge/plan.js';
import { DTYPE_CODE, type FloatDType, type NativeMergeTaskSpec } from '../lib/merge/task.js';
import { refused } from './helpers/errors.js';
import { makeModels, tempDir } from './helpers/models.js';
import { int, pick, rng, testSeed } from './helpers/random.js';
import { tensorBytes } from './helpers/tensors.js';

const seed = testSeed();
// 65 blocks: a work item of 128 rows of 512 float32 values (256 KiB) and its place in a block
const SLAB = 65 * 4096;

function tensorsOf(dir: string): Map<string, string> {
  const c = openCheckpoint(dir);
  try {
    return new Map(c.names.map((n) => [n, Buffer.from(c.bytes(n)).toString('hex')]));
  } finally {
    c.close();
  }
}

/** Collects the names of the merges that mergeBatch is asked to write to their files itself. */
function spyOnBatches(): string[] {
  const native = loadNative();
  const original = native.mergeBatch.bind(native);
  const slabbed: string[] = [];
  vi.spyOn(native, 'mergeBatch').mockImplementation((batch) => {
    for (const m of batch.merges) if (!ArrayBuffer.isView(m.out)) slabbed.push(m.name);
    return original(batch);
  });
  return slabbed;
}

describe(`tensors written slab by slab (DELLA_TEST_SEED=${seed})`, () => {
  beforeEach(() => { process.env.DELLA_SLAB_BYTES = String(SLAB); });
  afterEach(() => { delete process.env.DELLA_SLAB_BYTES; vi.restoreAllMocks(); });

  const dtypes: FloatDType[] = ['BF16', 'F16', 'F32'];
  for (const method of Object.keys(METHODS)) {
    it(`${method}: equal to the reference backend, reports and digests too`, async () => {
      const r = rng(seed ^ (method.length * 131 + method.charCodeAt(0) * 7 + method.charCodeAt(2)));
      const dir = tempDir();
      const spec = METHODS[method];
      const dtype = pick(r, dtypes);
      const K = spec.kind === 'slerp' ? 1 : int(r, 1, 3);
      // Two large tensors (over two slabs of output even in BF16: several slabs each) and
      // small ones beside them.
      const models = makeModels(r, dir, {
        dtype, experts: K, shardSize: 2 << 20,
        shapes: [
          ['model.layers.0.mlp.up_proj.weight', [int(r, 600, 900), 512]],
          ['model.layers.1.mlp.down_proj.weight', [int(r, 600, 900), 512]],
          ['model.layers.0.input_layernorm.weight', [int(r, 1, 50)]],
          ['model.embed_tokens.weight', [int(r, 8, 40), int(r, 4, 24)]],
        ],
      });
      const uses = (p: string) => spec.modelParams.includes(p);
      const parameters: Record<string, unknown> = {};
      if (spec.kind === 'delta') {
        parameters.lambda = pick(r, [1, 1.1]);
        if (spec.sparsifier !== 'none' && r() < 0.5) {
          parameters.rescale = spec.sparsifier === 'magnitude' || spec.sparsifier === 'breadcrumbs'
            ? pick(r, [true, 'l2', 'linf']) : pick(r, [true, 'inverse', 'l1']);
        }
      }
      if (spec.kind === 'slerp') parameters.t = r();
      const recipe = {
        merge_method: method,
        base_model: models.base,
        models: models.experts.map((m, k) => ({
          model: m,
          parameters: {
            ...(uses('weight') ? { weight: pick(r, [1, 0.5, -0.3]) + k * 0.1 } : {}),
            ...(uses('density') ? { density: pick(r, [0.3, 0.5, 0.7]) } : {}),
            ...(uses('epsilon') ? { epsilon: pick(r, [0.05, 0.1]) } : {}),
            ...(uses('gamma') ? { gamma: pick(r, [0, 0.05]) } : {}),
          },
        })),
        parameters,
        out_dtype: pick(r, [undefined, 'bfloat16', 'float32']),
        seed: Math.floor(r() * 2 ** 40),
      };
      const label = `${method} ${dtype} K=${K} out ${recipe.out_dtype} ${JSON.stringify(parameters)} (DELLA_TEST_SEED=${seed})`;
      const ref = await merge(recipe, { out: join(dir, 'ref'), backend: 'reference' });
      const slabbed = spyOnBatches();
      const one = await merge(recipe, { out: join(dir, 'one'), threads: 1 });
      const two = await merge(recipe, { out: join(dir, 'two'), threads: 2 });
      expect(slabbed.filter((n) => n.includes('mlp')).length, label).toBe(4); // both large tensors, in both runs
      expect(slabbed.filter((n) => !n.includes('mlp')), label).toEqual([]);
      expect(tensorsOf(join(dir, 'one')), label).toEqual(tensorsOf(join(dir, 'ref')));
      expect(tensorsOf(join(dir, 'two')), label).toEqual(tensorsOf(join(dir, 'ref')));
      expect(one.tensorReports, label).toEqual(ref.tensorReports);
      // the digests the kernels took slab by slab are those of the bytes written
      const run = (d: string) => readFileSync(join(dir, d, 'della_merge_run.json'), 'utf8');
      expect(run('one')).toBe(run('ref'));
      const checked = await verifyMerge(join(dir, 'two'), parseRecipe(JSON.stringify(recipe)));
      expect(checked.ok, `${label}: ${JSON.stringify(checked.problems)}`).toBe(true);
    });
  }

  it('a cancelled merge stops within the tensor it is writing by slabs, and leaves nothing behind', async () => {
    const dir = tempDir();
    const models = makeModels(rng(seed), dir, { dtype: 'BF16', experts: 2, shapes: [['model.layers.0.mlp.up_proj.weight', [2000, 512]]] });
    const recipe = { merge_method: 'ties', base_model: models.base, models: models.experts.map((m) => ({ model: m, parameters: { weight: 1, density: 0.5 } })) };
    const native = loadNative();
    const original = native.mergeBatch.bind(native);
    const controller = new AbortController();
    const seen: unknown[] = [];
    // The abort comes while the tensor's batch is with the kernels (here: as it is handed
    // over); the kernels' call itself must end cancelled, not complete the tensor.
    vi.spyOn(native, 'mergeBatch').mockImplementation((batch) => {
      controller.abort(new Error('stop'));
      seen.push(batch.cancel?.[0]);
      return original(batch).then((s) => { seen.push('completed'); return s; }, (e: unknown) => { seen.push((e as Error).message); throw e; });
    });
    const err = await refused(() => merge(recipe, { out: join(dir, 'out'), signal: controller.signal }), 'E_ABORTED', /^the merge was cancelled; nothing was written$/);
    expect((err.cause as Error).message).toBe('stop');
    expect(seen).toEqual([1, 'cancelled while merging tensor "model.layers.0.mlp.up_proj.weight"']);
    expect(readdirSync(dir).sort()).toEqual(['base', 'expert0', 'expert1']);
  });

  it('decides by the output size and the work item: not a copy, nor a tensor whose item does not fit a slab', () => {
    const plan = (kind: 'merge' | 'copy', shape: number[], outDtype = 'BF16'): TensorPlan => {
      const numel = shape.reduce((a, b) => a * b, 1);
      const size = outDtype === 'F32' ? 4 : 2;
      return { name: 't', kind, shape, numel, outDtype, outBytes: numel * size } as unknown as TensorPlan;
    };
    expect(writtenBySlabs(plan('merge', [600, 512]), SLAB)).toBe(true);
    expect(writtenBySlabs(plan('merge', [600, 512], 'F32'), SLAB)).toBe(true); // an item of 256 KiB and a block: just fits
    expect(writtenBySlabs(plan('merge', [20, 70_000], 'F32'), SLAB)).toBe(false); // an item of one row of 280,000 bytes: past it
    expect(writtenBySlabs(plan('copy', [600, 512]), SLAB)).toBe(false);
    expect(writtenBySlabs(plan('merge', [200, 512]), SLAB)).toBe(false); // within two slabs: staged whole
    expect(writtenBySlabs(plan('merge', [400_000]), SLAB)).toBe(false); // one row of 800 KB
    expect(itemBytes(plan('merge', [10, 100_000], 'F32'))).toBe(400_000); // rows over an item's 65,536 elements: one row
    // the default slabs (16 MiB) take any tensor whose output is over 32 MiB and rows under about 16 MiB
    expect(writtenBySlabs(plan('merge', [128256, 4096]), slabBytes({}))).toBe(true);
    expect(writtenBySlabs(plan('merge', [4096, 4096]), slabBytes({}))).toBe(false);
  });

  it('refuses a DELLA_SLAB_BYTES that is not a whole number of blocks, before anything is written', async () => {
    const dir = tempDir();
    const models = makeModels(rng(seed), dir, { dtype: 'BF16', experts: 1, layers: 1 });
    for (const bad of ['12', '4097', '4096', 'lots']) {
      process.env.DELLA_SLAB_BYTES = bad;
      await refused(
        () => merge({ merge_method: 'task_arithmetic', base_model: models.base, models: [{ model: models.experts[0] }] }, { out: join(dir, 'out') }),
        'E_ARGS', new RegExp(`DELLA_SLAB_BYTES must be a multiple of 4096 bytes, at least 8192; got "${bad}"`),
      );
      expect(() => openCheckpoint(join(dir, 'out'))).toThrow();
    }
  });

  it('the addon refuses a file output it cannot write: not an OutputFile, closed, outside the file, on a GPU', async () => {
    const native = loadNative();
    const dir = tempDir();
    const values = Array.from({ length: 64 }, (_, i) => i / 64);
    const base = tensorBytes(values, DTYPE_CODE.F32);
    const task = (out: unknown): NativeMergeTaskSpec => ({
      name: 'w', base, baseDtype: DTYPE_CODE.F32, out: out as NativeMergeTaskSpec['out'], outDtype: DTYPE_CODE.F32, shape: [8, 8],
      experts: [{ data: base, dtype: DTYPE_CODE.F32, shape: [8, 8], weight: 1, density: 1, epsilon: 0, gamma: 0 }],
      sparsifier: 0, rescale: 0, consensus: 0, normalize: false, lambda: 1, seed: 0,
    });
    const file = new native.OutputFile(join(dir, 'f'), 256, false);
    const buffer = native.allocStaging(4 * 4096);
    const run = (out: unknown, cuda?: { device: number; memory: number }) => native.mergeBatch({ threads: 1, merges: [task(out)], copies: [], ...(cuda ? { cuda } : {}) });
    expect(() => run({ file: {}, offset: 0, buffer })).toThrow(/merges\[0\]\.out\.file must be an OutputFile/);
    expect(() => run({ file, offset: 8, buffer })).toThrow(/256 bytes at offset 8 are outside .*f \(256 bytes\)/);
    expect(() => run({ file, offset: 0, buffer: [1, 2] })).toThrow(/merges\[0\]\.out\.buffer must be a Uint8Array or DataView/);
    expect(() => run({ file, offset: 0, buffer }, { device: 0, memory: 1 << 20 })).toThrow(/run on the CPU only/);
    // A slab too small for a work item is refused by the kernels: nothing is written.
    await expect(run({ file, offset: 0, buffer: buffer.subarray(0, 2 * 4096) })).rejects.toThrow(/an output slab holds 0 rows: fewer than the tensor's 8 and than a work item's 8192/);
    // A cancel byte already set stops it before its first slab, marked as cancelled.
    const cancel = new Uint8Array([1]);
    const stopped = await native.mergeBatch({ threads: 1, merges: [task({ file, offset: 0, buffer })], copies: [], cancel }).then(() => null, (e: unknown) => e);
    expect(stopped).toMatchObject({ cancelled: true, message: 'cancelled while merging tensor "w"' });
    expect(() => native.mergeBatch({ threads: 1, merges: [], copies: [], cancel: [1] as unknown as Uint8Array })).toThrow(/batch\.cancel must be a Uint8Array of at least one byte/);
    // The real thing: the tensor lands in the file, whole.
    const stats = await native.mergeBatch({ threads: 1, merges: [task({ file, offset: 0, buffer })], copies: [], digests: true });
    expect(stats[0].xxh64).toBe(native.xxh64(base));
    file.close();
    expect(Buffer.from(readFileSync(join(dir, 'f')))).toEqual(Buffer.from(base));
    expect(() => run({ file, offset: 0, buffer })).toThrow(/is closed/);
  });
});
