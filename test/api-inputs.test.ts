/**
 * Bad arguments to saveModel and mergeTensors (in-memory tensors): each is a DellaError
 * with code E_ARGS (E_IO for the file system) naming what is wrong, never a TypeError or
 * a native error, and a refused saveModel leaves no directory behind.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { merge, mergeTensors, openCheckpoint, saveModel, type InMemoryTensor } from '../lib/index.js';
import { streamMerge, type TensorStreamOptions } from '../lib/merge/stream.js';
import { parseRecipe } from '../lib/recipe/index.js';
import { refused } from './helpers/errors.js';
import { tempDir } from './helpers/models.js';

function detachedF32(n: number): Float32Array {
  const a = new Float32Array(n);
  structuredClone(a.buffer, { transfer: [a.buffer] });
  return a;
}

describe('saveModel arguments', () => {
  const root = tempDir('della-api-inputs-');
  const f32 = (o: Record<string, unknown> = {}) => ({ name: 'a', dtype: 'F32', shape: [2], data: new Float32Array(2), ...o });
  const two = [f32(), f32({ name: 'b' })];
  const cases: Array<[string, unknown, unknown, RegExp]> = [
    ['negative shape', [f32({ shape: [-1, -4], data: new Float32Array(4) })], undefined,
      /^saveModel: tensor 0 \("a"\): shape must be a list of non-negative integers, got \[-1,-4\]$/],
    ['fractional shape', [f32({ shape: [0.5, 8], data: new Float32Array(4) })], undefined, /tensor 0 \("a"\): shape must be .*\[0\.5,8\]/],
    ['shape missing', [f32({ shape: undefined })], undefined, /tensor 0 \("a"\): shape must be .*got nothing/],
    ['empty name', [f32(), f32({ name: '' })], undefined, /tensor 1: name must be a non-empty string, got ""/],
    ['name "__metadata__"', [f32({ name: '__metadata__' })], undefined, /tensor 0 \("__metadata__"\): the name "__metadata__" is reserved/],
    ['numeric name', [f32({ name: 5 })], undefined, /tensor 0: name must be a non-empty string, got 5/],
    ['data missing', [f32({ data: undefined })], undefined, /tensor 0 \("a"\): data must be a typed array, DataView or Buffer, got undefined/],
    ['data a plain array', [f32({ data: [1, 2] })], undefined, /tensor 0 \("a"\): data must be a typed array/],
    ['detached data', [f32({ data: detachedF32(2) })], undefined, /tensor 0 \("a"\): data's ArrayBuffer is detached/],
    ['byte length not dtype x shape', [f32({ shape: [3] })], undefined, /tensor 0 \("a"\): 8 bytes given, shape \[3\] of F32 needs 12/],
    ['unknown dtype', [f32({ dtype: 'F4' })], undefined, /tensor 0 \("a"\): unknown dtype "F4" \(known: F64, F32/],
    ['inherited dtype name', [f32({ dtype: 'constructor' })], undefined, /tensor 0 \("a"\): unknown dtype "constructor"/],
    ['inherited dtype name toString', [f32({ dtype: 'toString' })], undefined, /unknown dtype "toString"/],
    ['dtype missing', [f32({ dtype: undefined })], undefined, /tensor 0 \("a"\): unknown dtype nothing/],
    ['null entry', [f32(), null], undefined, /tensor 1: must be an object \{name, dtype, shape, data\}, got null/],
    ['sparse array', [, f32()], undefined, /tensor 0: must be an object .*got nothing/], // eslint-disable-line no-sparse-arrays
    ['tensors an object', { a: f32() }, undefined, /tensors must be an array of \{name, dtype, shape, data\}, got an object with keys \["a"\]$/],
    ['tensors null', null, undefined, /tensors must be an array/],
    ['tensors a typed array', new Float32Array(1 << 20), undefined, /tensors must be an array .*got a Float32Array$/],
    ['a name given twice', [f32(), f32()], undefined, /tensor 1 \("a"\) is given twice/],
    ['shardSize -1', two, { shardSize: -1 }, /shardSize must be a positive integer number of bytes, got -1/],
    ['shardSize 0', two, { shardSize: 0 }, /shardSize must be a positive integer number of bytes, got 0/],
    ['shardSize NaN', two, { shardSize: NaN }, /shardSize must be .*got NaN/],
    ['shardSize 1.5', two, { shardSize: 1.5 }, /shardSize must be .*got 1\.5/],
    ['shardSize "1"', two, { shardSize: '1' }, /shardSize must be .*got "1"/],
    ['options null', two, null, /options must be an object, got null/],
  ];
  let i = 0;
  for (const [label, tensors, options, message] of cases) {
    it(`refuses ${label}, leaving no directory`, async () => {
      const dir = join(root, `m${i++}`, 'model');
      await refused(() => saveModel(dir, tensors as InMemoryTensor[], options as { shardSize?: number }), 'E_ARGS', message);
      expect(existsSync(dir)).toBe(false);
      expect(existsSync(join(dir, '..'))).toBe(false);
    });
  }

  it('refuses a directory that is not a path string', async () => {
    await refused(() => saveModel(5 as unknown as string, [f32()]), 'E_ARGS', /saveModel: dir must be a non-empty path string, got 5/);
    await refused(() => saveModel('', [f32()]), 'E_ARGS', /dir must be a non-empty path string, got ""/);
  });

  it('file-system failures are E_IO naming the path', async () => {
    const file = join(root, 'a-file');
    writeFileSync(file, 'x');
    await refused(() => saveModel(file, [f32()]), 'E_IO', /^saveModel: cannot create the directory .*a-file: EEXIST/);
    await refused(() => saveModel(join(file, 'sub'), [f32()]), 'E_IO', /^saveModel: cannot create the directory .*a-file\/sub: ENOTDIR/);
    // Node 20's recursive mkdirSync loops forever under /proc: made a level at a time.
    if (existsSync('/proc/self')) await refused(() => saveModel('/proc/della-nope/m', [f32()]), 'E_IO', /^saveModel: cannot create the directory \/proc\/della-nope\/m: ENOENT/);
  });

  it('saving over an earlier save replaces it: no stale index or shards, no stale single file', () => {
    const dir = join(root, 'resaved');
    const t = (name: string, v: number) => ({ name, dtype: 'F32', shape: [1], data: new Float32Array([v]) });
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, 'notes.txt'), 'mine');
    expect(saveModel(dir, [t('a', 1), t('b', 2), t('c', 3)], { shardSize: 4 })).toHaveLength(4);
    // The index used to stay beside the new model.safetensors, and readers took the old shards.
    expect(saveModel(dir, [t('a', 100), t('d', 300)])).toEqual(['model.safetensors']);
    expect(readdirSync(dir).sort()).toEqual(['model.safetensors', 'notes.txt']);
    let c = openCheckpoint(dir);
    expect([c.names, [...(c.array('a') as Float32Array)]]).toEqual([['a', 'd'], [100]]);
    c.close();
    // And back: two shards and an index, without the single file transformers loads first.
    expect(saveModel(dir, [t('e', 5), t('f', 6)], { shardSize: 4 })).toEqual(['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']);
    expect(readdirSync(dir).sort()).toEqual(['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json', 'notes.txt']);
    c = openCheckpoint(dir);
    expect(c.names).toEqual(['e', 'f']);
    c.close();
  });

  it('a failed write removes the files it wrote', async () => {
    const dir = join(root, 'half');
    mkdirSync(join(dir, 'model.safetensors.index.json'), { recursive: true }); // the index cannot be written
    await refused(() => saveModel(dir, two, { shardSize: 8 }), 'E_IO', /^saveModel: cannot write .*half\/model\.safetensors\.index\.json: it is a directory$/);
    expect(readdirSync(dir)).toEqual(['model.safetensors.index.json']);
  });

  it('saves a model opened from its own directory over it, and a failed save leaves the earlier one whole', async () => {
    const dir = join(root, 'inplace');
    saveModel(dir, [{ name: 'w', dtype: 'F32', shape: [4096], data: new Float32Array(4096).fill(1.5) }]);
    const c = openCheckpoint(dir);
    // its own views as the data: written over in place, the file was cut under them
    // (EFAULT), and the cleanup then deleted the model
    expect(saveModel(dir, [{ name: 'w', dtype: 'F32', shape: [4096], data: c.array('w') }, { name: 'v', dtype: 'F32', shape: [1], data: new Float32Array([2]) }])).toEqual(['model.safetensors']);
    c.close();
    const again = openCheckpoint(dir);
    expect([again.names, (again.array('w') as Float32Array)[4095]]).toEqual([['v', 'w'], 1.5]);
    again.close();
    expect(readdirSync(dir)).toEqual(['model.safetensors']);
    // a save that runs out of disk leaves the earlier save whole (it was cut to 0, then removed)
    const small = join(root, 'small');
    mkdirSync(small);
    if (spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', small]).status === 0) { // root only
      try {
        saveModel(small, [{ name: 'w', dtype: 'F32', shape: [4096], data: new Float32Array(4096).fill(1.5) }]);
        await refused(() => saveModel(small, [{ name: 'w', dtype: 'F32', shape: [16384], data: new Float32Array(16384) }]), 'E_IO', /cannot write .*small\/model\.safetensors: no space left on device/);
        expect(readdirSync(small)).toEqual(['model.safetensors']);
        const kept = readFileSync(join(small, 'model.safetensors')); // not mapped: a map would keep the mount busy
        expect(kept.readFloatLE(kept.length - 4)).toBe(1.5);
      } finally {
        spawnSync('umount', ['-l', small]);
      }
    }
  });

  it('still writes what it is given, sharded or not, from any kind of view', () => {
    const shared = new Float32Array(new SharedArrayBuffer(8));
    shared.set([1, 2]);
    const tensors = [
      f32({ name: 'a', data: shared }),
      { name: 'b', dtype: 'BF16', shape: [2, 0], data: new Uint16Array(0) },
      { name: 'c', dtype: 'U8', shape: [3], data: Buffer.from([7, 8, 9]) },
    ];
    const one = join(root, 'ok', 'one');
    expect(saveModel(one, tensors)).toEqual(['model.safetensors']);
    const many = join(root, 'ok', 'many');
    expect(saveModel(many, tensors, { shardSize: 1 })).toHaveLength(4);
    for (const dir of [one, many]) {
      const c = openCheckpoint(dir);
      expect(c.names).toEqual(['a', 'b', 'c']);
      expect([...new Float32Array(c.array('a').slice().buffer)]).toEqual([1, 2]);
      expect([...c.bytes('c')]).toEqual([7, 8, 9]);
      expect(c.tensors.get('b')!.shape).toEqual([2, 0]);
      c.close();
    }
  });
});

describe('mergeTensors in-memory arguments', () => {
  const recipe = { merge_method: 'task_arithmetic', models: [{}] };
  const W = 'model.layers.0.mlp.up_proj.weight';
  const t = (data: ArrayBufferView = new Float32Array([1, 2]), o: Record<string, unknown> = {}) => ({ dtype: 'F32', shape: [2], data, ...o });
  const drain = async (options: unknown) => {
    const out: Array<{ name: string; data: Uint8Array }> = [];
    for await (const x of mergeTensors(recipe, options as TensorStreamOptions)) out.push({ name: x.name, data: x.data });
    return out;
  };

  it('refuses tensor sets that are not objects or Maps', async () => {
    await refused(() => drain({ base: { [W]: t() }, models: [null] }), 'E_ARGS',
      /options\.models\[0\] \(model-0\) must be an object or Map from tensor names to \{dtype, shape, data\}, got null/);
    await refused(() => drain({ base: { [W]: t() }, models: { length: 1 } }), 'E_ARGS',
      /in-memory merges need .*options\.models, an array .*; options\.models is an object with keys \["length"\]$/);
    await refused(() => drain({ base: null, models: [{ [W]: t() }] }), 'E_ARGS', /in-memory merges need .*; options\.base is null/);
    await refused(() => drain({ base: [t()], models: [{ [W]: t() }] }), 'E_ARGS', /options\.base is an array of 1$/);
    await refused(() => drain({ base: { [W]: t() }, models: ['abc'] }), 'E_ARGS', /options\.models\[0\] .*got "abc"/);
    await refused(() => drain({ base: { [W]: t() }, models: [{ [W]: null }] }), 'E_ARGS',
      /model-0: tensor "model\.layers\.0\.mlp\.up_proj\.weight": must be an object \{dtype, shape, data\}, got null/);
    await refused(() => drain({ base: new Map([[5, t()]]), models: [{ [W]: t() }] }), 'E_ARGS', /base: tensor names must be strings, got 5/);
  });

  it('a linear recipe without base_model needs no options.base: its first model supplies the names, as from files', async () => {
    const dir = tempDir();
    const sets = [
      { [W]: t(new Float32Array([1, 2])), other: t(new Float32Array([5, 6])) },
      { [W]: t(new Float32Array([3, 8])), other: t(new Float32Array([7, 1])) },
    ];
    const lin = { merge_method: 'linear', models: [{ parameters: { weight: 1 } }, { parameters: { weight: 0.5 } }] };
    const got: Record<string, number[]> = {};
    for await (const x of mergeTensors(lin, { models: sets })) got[x.name] = [...new Float32Array(x.data.slice().buffer)];
    // the same recipe from files
    sets.forEach((set, k) => saveModel(join(dir, `m${k}`), Object.entries(set).map(([name, v]) => ({ name, ...v }) as InMemoryTensor)));
    await merge({ ...lin, models: lin.models.map((m, k) => ({ model: join(dir, `m${k}`), ...m })) }, { out: join(dir, 'out') });
    const c = openCheckpoint(join(dir, 'out'));
    expect(got).toEqual(Object.fromEntries([W, 'other'].map((n) => [n, [...(c.array(n) as Float32Array)]])));
    c.close();
    expect(got[W]).toEqual([(1 * 1 + 0.5 * 3) / 1.5, (2 + 0.5 * 8) / 1.5].map(Math.fround));
    // given a base anyway, it is the base (named "base"), as before
    const withBase: string[] = [];
    for await (const x of mergeTensors(lin, { base: sets[0], models: sets })) withBase.push(x.name);
    expect(withBase).toEqual([W, 'other'].sort());
    await refused(async () => { for await (const _ of mergeTensors(lin, { base: { q: t() }, models: sets })) void _; }, 'E_SHAPE', /^model-0 \(model-0\) has none of the base model's tensors .* are not in base\)$/);
    // a recipe that names a base still needs it
    await refused(async () => { for await (const _ of mergeTensors({ ...lin, base_model: 'b' }, { models: sets })) void _; }, 'E_ARGS',
      /in-memory merges need options\.base .*a linear recipe without base_model may leave it out.*; options\.base is nothing$/);
  });

  it('refuses a detached buffer and an inherited dtype name', async () => {
    await refused(() => drain({ base: { [W]: t(detachedF32(2)) }, models: [{ [W]: t() }] }), 'E_ARGS',
      /base: tensor "model\.layers\.0\.mlp\.up_proj\.weight": data's ArrayBuffer is detached/);
    await refused(() => drain({ base: { [W]: t(new Uint8Array(2), { dtype: 'constructor' }) }, models: [{ [W]: t() }] }), 'E_ARGS',
      /base: tensor "model\.layers\.0\.mlp\.up_proj\.weight": unknown dtype "constructor"/);
    await refused(() => drain({ base: { [W]: t(new Uint8Array(8), { dtype: 'hasOwnProperty' }) }, models: [{ [W]: t() }] }), 'E_ARGS',
      /unknown dtype "hasOwnProperty"/);
    // A sparse shape passed every() (it skips holes) and became a bare RangeError; one of
    // length 2^32 - 1 must not be built first.
    const huge: number[] = [];
    huge.length = 2 ** 32 - 1;
    const t0 = performance.now();
    await refused(() => drain({ base: { [W]: t(new Float32Array(2), { shape: huge }) }, models: [{ [W]: t() }] }), 'E_ARGS', /shape must be a list of non-negative integers, got an array of 4294967295/);
    expect(performance.now() - t0).toBeLessThan(2000);
    await refused(() => drain({ base: { [W]: t(new Float32Array(2), { shape: [, 2] }) }, models: [{ [W]: t() }] }), 'E_ARGS', // eslint-disable-line no-sparse-arrays
      /base: tensor "model\.layers\.0\.mlp\.up_proj\.weight": shape must be a list of non-negative integers, got \[null,2\]/);
  });

  it('an input transferred during the merge is E_ARGS when its batch starts, naming it', async () => {
    // Three tensors of 16 MiB, a batch each; the batch after the next starts only after
    // the first tensor is yielded, when the third's input is transferred.
    const n = 4 << 20, X = 'model.layers.1.mlp.up_proj.weight', Y = 'model.layers.2.mlp.up_proj.weight';
    const e2 = new Float32Array(n);
    const f = (x = new Float32Array(n)) => ({ dtype: 'F32', shape: [n], data: x });
    const names: string[] = [];
    const run = async () => {
      for await (const m of mergeTensors(recipe, { base: { [W]: f(), [X]: f(), [Y]: f() }, models: [{ [W]: f(), [X]: f(), [Y]: f(e2) }], threads: 1 })) {
        names.push(m.name);
        if (names.length === 1) structuredClone(e2.buffer, { transfer: [e2.buffer] });
      }
    };
    await refused(run, 'E_ARGS', /^model-0: tensor "model\.layers\.2\.mlp\.up_proj\.weight": its data's ArrayBuffer was detached \(transferred\) during the merge/);
    expect(names).toEqual([W, X]);
  });

  it('merges data held in a SharedArrayBuffer like any other', async () => {
    const shared = new Float32Array(new SharedArrayBuffer(8));
    shared.set([1, 2]);
    const got = await drain({ base: { [W]: t(shared) }, models: [{ [W]: t(new Float32Array([3, 5])) }] });
    const want = await drain({ base: { [W]: t(new Float32Array([1, 2])) }, models: [{ [W]: t(new Float32Array([3, 5])) }] });
    expect(got.map((x) => x.name)).toEqual([W]);
    expect(Buffer.from(got[0].data).equals(Buffer.from(want[0].data))).toBe(true);
    const sharedExpert = new Float32Array(new SharedArrayBuffer(8));
    sharedExpert.set([3, 5]);
    const got2 = await drain({ base: { [W]: t(new Float32Array([1, 2])) }, models: [{ [W]: t(sharedExpert) }] });
    expect(Buffer.from(got2[0].data).equals(Buffer.from(want[0].data))).toBe(true);
  });

  it('refuses options that are not an object (streamMerge)', async () => {
    const parsed = parseRecipe(JSON.stringify({ ...recipe, base_model: 'base', models: [{ model: 'm' }] }), { resolvePath: (m) => m });
    await refused(async () => { for await (const _ of streamMerge(parsed, null as unknown as TensorStreamOptions)) void _; }, 'E_ARGS',
      /options must be an object, got null/);
    await refused(() => drain(null), 'E_ARGS', /mergeTensors\(recipe, options\): options must be an object, got null/);
    await refused(() => drain(7), 'E_ARGS', /options must be an object, got 7/);
    await refused(() => drain({ base: { [W]: t() }, models: [{ [W]: t() }], onWarning: 'log' }), 'E_ARGS', /options\.onWarning must be a function, got "log"/);
    // once a TypeError mid-merge, and ignored or taken as true
    await refused(() => drain({ base: { [W]: t() }, models: [{ [W]: t() }], onProgress: 5 }), 'E_ARGS', /^options\.onProgress must be a function, got 5$/);
    await refused(() => drain({ base: { [W]: t() }, models: [{ [W]: t() }], signal: 'x' }), 'E_ARGS', /^options\.signal must be an AbortSignal, got "x"$/);
    await refused(() => drain({ base: { [W]: t() }, models: [{ [W]: t() }], allowNonFinite: 1 }), 'E_ARGS', /^options\.allowNonFinite must be true or false, got 1$/);
  });

  it('an overflowing result is E_NONFINITE; with allowNonFinite it reaches onWarning, and plan warnings do too', async () => {
    // float16 60000 + 2 * (64000 - 60000) = 68000: beyond 65504.
    const f16 = (xs: number[]) => ({ dtype: 'F16', shape: [xs.length], data: new Uint16Array(xs) });
    const doc = { merge_method: 'task_arithmetic', models: [{ parameters: { weight: 2 } }] };
    const sets = { base: { [W]: f16([0x7b53, 0x3c00]), extra: t() }, models: [{ [W]: f16([0x7bd0, 0x3c00]) }] };
    const run = async (options: Record<string, unknown>) => {
      const out: string[] = [];
      for await (const x of mergeTensors(doc, { ...sets, ...options } as TensorStreamOptions)) out.push(x.name);
      return out;
    };
    await refused(() => run({}), 'E_NONFINITE', /tensor "model\.layers\.0\.mlp\.up_proj\.weight": 1 merged value\(s\) overflowed F16 \(beyond ±65504\)/);
    const warnings: string[] = [];
    expect(await run({ allowNonFinite: true, onWarning: (m: string) => warnings.push(m) })).toEqual(['extra', W]);
    expect(warnings).toHaveLength(2);
    expect(warnings[0]).toMatch(/extra/);
    expect(warnings[1]).toMatch(/1 merged value\(s\) overflowed F16 .*; written anyway/);
  });
});
