/**
 * End-to-end merges through the API: sharded checkpoints in each dtype, della and
 * della_linear (and DARE / task arithmetic), native output equal to the reference
 * backend tensor by tensor and across thread counts; the output layout of SPEC §8.
 */
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { merge, openCheckpoint, DellaError } from '../lib/index.js';
import type { FloatDType } from '../lib/merge/task.js';
import { METHODS } from '../lib/merge/methods.js';
import { makeModels, tempDir } from './helpers/models.js';
import { pick, rng, testSeed } from './helpers/random.js';

const seed = testSeed();

function tensorsOf(dir: string): Map<string, string> {
  const c = openCheckpoint(dir);
  try {
    return new Map(c.names.map((n) => [n, `${c.tensors.get(n)!.dtype}:${c.tensors.get(n)!.shape}:${Buffer.from(c.bytes(n)).toString('hex')}`]));
  } finally {
    c.close();
  }
}

function filesOf(dir: string): Map<string, string> {
  return new Map(readdirSync(dir).map((f) => [f, readFileSync(join(dir, f)).toString('hex')]));
}

describe(`merges end to end (DELLA_TEST_SEED=${seed})`, () => {
  const dtypes: FloatDType[] = ['BF16', 'F16', 'F32'];
  const cases = Object.keys(METHODS).flatMap((m) => dtypes.map((d) => [m, d] as const));
  for (const [method, dtype] of cases) {
    it(`${method} on sharded ${dtype} checkpoints equals the reference, for 1 and 2 threads`, async () => {
      const r = rng(seed ^ (method.length * 31 + dtype.length * 7 + method.charCodeAt(1)));
      const dir = tempDir();
      const spec = METHODS[method];
      const K = spec.kind === 'slerp' ? 1 : pick(r, [1, 2, 3]);
      const models = makeModels(r, dir, { dtype, experts: K });
      const uses = (p: string) => spec.modelParams.includes(p);
      // a scalar, a gradient across layers, or a filter list with a fallback
      const vary = (lo: number, hi: number) => {
        const v = () => lo + (hi - lo) * r();
        return pick(r, [v(), [v(), v(), v()], [{ filter: 'mlp', value: v() }, { value: [v(), v()] }]]);
      };
      const parameters: Record<string, unknown> = {};
      if (spec.kind === 'delta') {
        parameters.lambda = pick(r, [1, 1.1, 0.9]);
        if (r() < 0.3) parameters.consensus = pick(r, ['sum', 'count', 'none']);
        if (r() < 0.3) parameters.normalize = pick(r, [true, false]);
        if (spec.sparsifier !== 'none' && r() < 0.5) {
          parameters.rescale = spec.sparsifier === 'magnitude' || spec.sparsifier === 'breadcrumbs'
            ? pick(r, [true, false, 'l1', 'l2', 'linf']) : pick(r, [true, false, 'inverse', 'l1', 'l2', 'linf']);
        }
      }
      if (spec.kind === 'linear' && r() < 0.5) parameters.normalize = pick(r, [true, false]);
      if (spec.kind === 'slerp') parameters.t = vary(0, 1);
      const recipe = {
        merge_method: method,
        base_model: models.base,
        models: [
          ...models.experts.map((m, k) => ({
            model: m,
            parameters: {
              ...(uses('weight') ? { weight: pick(r, [1, 0.5, 0.8, -0.3]) + k * 0.1 } : {}),
              ...(uses('density') ? { density: vary(0.2, 0.7) } : {}),
              ...(uses('epsilon') ? { epsilon: pick(r, [0.05, 0.1, 0.15]) } : {}),
              ...(uses('gamma') ? { gamma: pick(r, [0, 0.01, 0.1]) } : {}),
            },
          })),
          ...(spec.kind === 'linear' ? [{ model: models.base, parameters: { weight: 0.5 } }] : []),
        ],
        parameters,
        out_dtype: pick(r, [undefined, 'bfloat16', 'float16', 'float32']),
        seed: Math.floor(r() * 2 ** 40),
      };
      const ref = await merge(recipe, { out: join(dir, 'ref'), backend: 'reference', shardSize: 700 });
      const one = await merge(recipe, { out: join(dir, 'one'), threads: 1, shardSize: 700 });
      const two = await merge(recipe, { out: join(dir, 'two'), threads: 2, shardSize: 700 });
      const label = `${method} ${dtype} K=${K} ${JSON.stringify(parameters)} (DELLA_TEST_SEED=${seed})`;
      expect(tensorsOf(join(dir, 'one')), label).toEqual(tensorsOf(join(dir, 'ref')));
      expect(filesOf(join(dir, 'two')), label).toEqual(filesOf(join(dir, 'one')));
      expect(one.tensors).toEqual(ref.tensors);
      expect(one.tensorReports).toEqual(ref.tensorReports);
      expect(two.tensors.merged).toBeGreaterThan(0);
      // the integer buffer is copied from the base byte for byte
      const base = openCheckpoint(models.base);
      const out = openCheckpoint(join(dir, 'one'));
      expect(Buffer.from(out.bytes('model.position_ids'))).toEqual(Buffer.from(base.bytes('model.position_ids')));
      base.close();
      out.close();
    });
  }

  it('writes the layout of SPEC §8: shards, index, padded headers, metadata, extras, no leftovers', async () => {
    const r = rng(seed + 5);
    const dir = tempDir();
    const models = makeModels(r, dir, { dtype: 'BF16', experts: 2 });
    const recipe = { merge_method: 'della', base_model: models.base, models: models.experts.map((m) => ({ model: m, parameters: { density: 0.5, epsilon: 0.1 } })) };
    const out = join(dir, 'merged');
    const report = await merge(recipe, { out, shardSize: 1000 });
    const files = readdirSync(out).sort();
    const shards = files.filter((f) => f.endsWith('.safetensors'));
    expect(shards.length).toBeGreaterThan(1);
    shards.forEach((f, i) => expect(f).toBe(`model-${String(i + 1).padStart(5, '0')}-of-${String(shards.length).padStart(5, '0')}.safetensors`));
    expect(files).toContain('model.safetensors.index.json');
    expect(files).toContain('config.json');
    expect(files).toContain('tokenizer.json');
    expect(files).toContain('README.md');
    expect(files).toContain('della_merge_recipe.yaml');
    const index = JSON.parse(readFileSync(join(out, 'model.safetensors.index.json'), 'utf8'));
    const c = openCheckpoint(out);
    expect(Object.keys(index.weight_map).sort()).toEqual(c.names);
    expect(index.metadata.total_size).toBe(c.totalBytes);
    for (const f of shards) {
      const bytes = readFileSync(join(out, f));
      const n = Number(bytes.readBigUInt64LE(0));
      expect((8 + n) % 8).toBe(0);
      const header = JSON.parse(bytes.subarray(8, 8 + n).toString('utf8'));
      expect(header.__metadata__).toEqual({ format: 'pt' });
    }
    for (const file of c.metadata.keys()) expect(c.metadata.get(file)).toEqual({ format: 'pt' });
    c.close();
    const card = readFileSync(join(out, 'README.md'), 'utf8');
    expect(card).toMatch(/^---\nbase_model: /);
    expect(card).toContain('- della-merge');
    expect(readdirSync(dir).filter((f) => f.includes('della-tmp'))).toEqual([]);
    expect(report.files).toEqual(files);
  });

  it('copies config from the base and tokenizer files from tokenizer_source', async () => {
    const r = rng(seed + 11);
    const dir = tempDir();
    const models = makeModels(r, dir, { dtype: 'BF16', experts: 2 });
    writeFileSync(join(models.experts[1], 'tokenizer.json'), '{"from": "expert1"}\n');
    writeFileSync(join(models.experts[1], 'config.json'), '{"from": "expert1"}\n');
    const recipe = { merge_method: 'task_arithmetic', base_model: models.base, models: models.experts.map((m) => ({ model: m })), tokenizer_source: models.experts[1] };
    await merge(recipe, { out: join(dir, 'o') });
    expect(readFileSync(join(dir, 'o', 'tokenizer.json'), 'utf8')).toBe('{"from": "expert1"}\n');
    expect(readFileSync(join(dir, 'o', 'config.json'), 'utf8')).toBe(readFileSync(join(models.base, 'config.json'), 'utf8'));
    // a tokenizer_source without tokenizer files is said (mergekit fails there), not passed over
    const none = await merge({ ...recipe, tokenizer_source: models.experts[0] }, { out: join(dir, 'p') });
    expect(none.warnings).toContain(`tokenizer_source "${models.experts[0]}": ${models.experts[0]} holds no tokenizer files (tokenizer.json, tokenizer_config.json, ...), so the output has none`);
    expect(existsSync(join(dir, 'p', 'tokenizer.json'))).toBe(false);
  });

  it('a released tensor reads the same bytes again (its pages are mapped anew)', () => {
    const dir = tempDir();
    const models = makeModels(rng(seed + 17), dir, { dtype: 'BF16', experts: 1 });
    const c = openCheckpoint(models.base);
    try {
      const before = c.names.map((n) => Buffer.from(c.bytes(n)).toString('hex'));
      const views = c.names.map((n) => c.bytes(n));
      for (const n of c.names) c.release(n);
      // Views taken before the release stay valid, and new reads agree with them.
      expect(views.map((v) => Buffer.from(v).toString('hex'))).toEqual(before);
      expect(c.names.map((n) => Buffer.from(c.bytes(n)).toString('hex'))).toEqual(before);
    } finally {
      c.close();
    }
  });

  it('a single shard is model.safetensors without an index', async () => {
    const r = rng(seed + 6);
    const dir = tempDir();
    const models = makeModels(r, dir, { dtype: 'F16', experts: 1 });
    const out = join(dir, 'merged');
    await merge({ merge_method: 'della_linear', base_model: models.base, models: [{ model: models.experts[0] }] }, { out });
    const files = readdirSync(out);
    expect(files).toContain('model.safetensors');
    expect(files).not.toContain('model.safetensors.index.json');
  });

  it('reports progress, and a cancelled merge leaves nothing behind', async () => {
    const r = rng(seed + 7);
    const dir = tempDir();
    const models = makeModels(r, dir, { dtype: 'BF16', experts: 2, layers: 6 });
    const recipe = { merge_method: 'della', base_model: models.base, models: models.experts.map((m) => ({ model: m })) };
    const events: number[] = [];
    await merge(recipe, { out: join(dir, 'ok'), onProgress: (e) => events.push(e.tensorsDone) });
    expect(events.at(-1)).toBeGreaterThan(0);
    const controller = new AbortController();
    controller.abort();
    await expect(merge(recipe, { out: join(dir, 'cancelled'), signal: controller.signal })).rejects.toMatchObject({ code: 'E_ABORTED' });
    expect(existsSync(join(dir, 'cancelled'))).toBe(false);
    expect(readdirSync(dir).filter((f) => f.includes('della-tmp'))).toEqual([]);
  });

  it('refuses an existing output unless overwrite, and then replaces it whole', async () => {
    const r = rng(seed + 8);
    const dir = tempDir();
    const models = makeModels(r, dir, { dtype: 'BF16', experts: 1 });
    const recipe = { merge_method: 'della', base_model: models.base, models: [{ model: models.experts[0] }] };
    const out = join(dir, 'merged');
    await merge(recipe, { out });
    await expect(merge(recipe, { out })).rejects.toThrow(/already exists \(pass --overwrite/);
    await merge({ ...recipe, seed: 9 }, { out, overwrite: true });
    expect(readdirSync(dir).filter((f) => f.includes('della-tmp'))).toEqual([]);
  });

  it('names the tensor, both models and both shapes on a shape mismatch, and a tensor missing from an expert', async () => {
    const r = rng(seed + 9);
    const dirA = tempDir();
    const a = makeModels(r, dirA, { dtype: 'BF16', experts: 1 });
    const b = makeModels(rng(seed + 10), tempDir(), { dtype: 'BF16', experts: 1 });
    const recipe = { merge_method: 'della', base_model: a.base, models: [{ model: b.experts[0] }] };
    const e = await merge(recipe, { out: join(dirA, 'x') }).catch((x) => x);
    expect(e).toBeInstanceOf(DellaError);
    expect(e.message).toMatch(/tensor ".*" has shape \[.*\] in the base model .* but \[.*\] in .*expert0|missing from/);
    expect(existsSync(join(dirA, 'x'))).toBe(false);
  });

  it('refuses non-finite inputs, naming the model, tensor and count', async () => {
    const { saveModel } = await import('../lib/checkpoint/save.js');
    const dir = tempDir();
    saveModel(join(dir, 'base'), [{ name: 'w', dtype: 'F32', shape: [2, 2], data: new Float32Array([1, 2, 3, 4]) }]);
    saveModel(join(dir, 'e'), [{ name: 'w', dtype: 'F32', shape: [2, 2], data: new Float32Array([1, NaN, Infinity, 4]) }]);
    const recipe = { merge_method: 'della', base_model: join(dir, 'base'), models: [{ model: join(dir, 'e') }] };
    await expect(merge(recipe, { out: join(dir, 'out') })).rejects.toThrow(/tensor "w" of .*\/e holds 2 non-finite value/);
    expect(existsSync(join(dir, 'out'))).toBe(false);
  });
});
