/** verify: passes good merges of every kind and fails on a single flipped byte. */
import { spawnSync } from 'node:child_process';
import { readFileSync, readdirSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadRecipe, merge, openCheckpoint, saveModel } from '../lib/index.js';
import { countNonFinite, verifyMerge } from '../lib/validate/verify.js';
import { makeModels, tempDir, writeRecipe } from './helpers/models.js';
import { rng, testSeed } from './helpers/random.js';
import { drawBaseAndExperts, tensorBytes } from './helpers/tensors.js';
import { DTYPE_CODE } from '../lib/merge/task.js';
import { createHash } from 'node:crypto';
import { loadNative } from '../lib/native.js';

const root = resolve(import.meta.dirname, '..');
const seed = testSeed();

function cli(args: string[]) {
  const r = spawnSync(process.execPath, [join(root, 'bin/della-merge.js'), ...args], { encoding: 'utf8' });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Flips one bit of tensor `name`'s element `index` (its last, if it has fewer) in the output files. */
function flip(out: string, name: string, index: number) {
  const c = openCheckpoint(out);
  const t = c.tensors.get(name)!;
  const size = t.byteLength / t.numel;
  c.close();
  const bytes = readFileSync(t.file);
  bytes[t.offset + Math.min(index, t.numel - 1) * size] ^= 1;
  writeFileSync(t.file, bytes);
}


describe(`verify (DELLA_TEST_SEED=${seed})`, () => {
  const cases: Array<[string, 'BF16' | 'F16' | 'F32', Record<string, unknown>, Record<string, unknown>]> = [
    ['della', 'BF16', { density: 0.5, epsilon: 0.1 }, { lambda: 1.1 }],
    ['ties', 'F16', { density: 0.4 }, { rescale: 'l2' }],
    ['breadcrumbs_ties', 'F32', { density: 0.7, gamma: 0.05 }, {}],
    ['dare_linear', 'BF16', { density: 0.3 }, { rescale: 'linf' }],
    ['linear', 'F16', { weight: 2 }, {}],
    ['slerp', 'BF16', {}, { t: [0.2, 0.8] }],
  ];
  for (const [method, dtype, perModel, global] of cases) {
    it(`${method} ${dtype}: a good merge passes; one flipped bit anywhere fails`, async () => {
      const r = rng(seed ^ method.length);
      const dir = tempDir();
      const m = makeModels(r, dir, { dtype, experts: method === 'slerp' ? 1 : 2 });
      const recipe = writeRecipe(join(dir, 'r.yaml'), {
        merge_method: method, base_model: m.base,
        models: m.experts.map((model) => ({ model, parameters: perModel })), parameters: global, seed: 5,
      });
      const out = join(dir, 'merged');
      await merge(recipe, { out, shardSize: 2000 });
      const parsed = await loadRecipe(recipe);
      const good = await verifyMerge(out, parsed);
      expect(good.problems, `DELLA_TEST_SEED=${seed}`).toEqual([]);
      expect(good.ok).toBe(true);
      expect(good.rowsChecked).toBeGreaterThan(0);
      const merged = good.checks.find((c) => c.kind === 'merge')!;
      if (method !== 'linear' && method !== 'slerp') {
        expect(merged.keptFraction!.length).toBe(2);
        expect(merged.signAgreement!.every((x) => x >= 0 && x <= 1)).toBe(true);
      }
      flip(out, 'model.layers.1.mlp.down_proj.weight', 0);
      const bad = await verifyMerge(out, parsed);
      expect(bad.ok).toBe(false);
      expect(bad.problems.join('\n')).toMatch(/"model\.layers\.1\.mlp\.down_proj\.weight": its bytes changed since the merge wrote them/);
      expect(bad.problems.join('\n')).toMatch(/row 0 differs from the reference recomputation \(first at element 0\)/);
    });
  }

  it('recomputes sampled rows of large tensors; without the merge record a flip in them is still caught', async () => {
    const r = rng(seed + 3);
    const dir = tempDir();
    const base = drawBaseAndExperts(r, 400 * 200, 2);
    saveModel(join(dir, 'base'), [{ name: 'model.layers.0.w', dtype: 'BF16', shape: [400, 200], data: tensorBytes(base.base, DTYPE_CODE.BF16) }]);
    base.experts.forEach((v, k) => saveModel(join(dir, `e${k}`), [{ name: 'model.layers.0.w', dtype: 'BF16', shape: [400, 200], data: tensorBytes(v, DTYPE_CODE.BF16) }]));
    const recipe = writeRecipe(join(dir, 'r.yaml'), { merge_method: 'della', base_model: join(dir, 'base'), models: [0, 1].map((k) => ({ model: join(dir, `e${k}`), parameters: { density: 0.6, epsilon: 0.2 } })) });
    const out = join(dir, 'o');
    await merge(recipe, { out });
    const parsed = await loadRecipe(recipe);
    const good = await verifyMerge(out, parsed, { samples: 5 });
    expect(good.ok).toBe(true);
    expect(good.checks[0].rowsChecked).toBe(5);
    expect(good.checks[0].rowsTotal).toBe(400);
    rmSync(join(out, 'della_merge_run.json'));
    expect(spawnSync('mkfifo', [join(out, 'della_merge_run.json')]).status).toBe(0); // used to block verify forever
    flip(out, 'model.layers.0.w', 399 * 200 + 7); // the last row is always sampled
    await expect(verifyMerge(out, parsed, { onProgress: 'log' as unknown as () => void })).rejects.toMatchObject({ code: 'E_ARGS', message: 'options.onProgress must be a function, got "log"' });
    await expect(verifyMerge(out, parsed, null as unknown as object)).rejects.toMatchObject({ code: 'E_ARGS', message: 'verifyMerge(out, recipe, options): options must be an object, got null' });
    const bad = await verifyMerge(out, parsed, { samples: 5 });
    expect(bad.ok).toBe(false);
    expect(bad.problems.join('\n')).toMatch(/della_merge_run\.json is missing/);
    expect(bad.problems.join('\n')).toMatch(/row 399 differs from the reference recomputation \(first at element 79807\)/);
  });

  it('worker threads check the whole-tensor methods\' large tensors: the same report as one thread, failures and cancellation included', async () => {
    const r = rng(seed + 11);
    const dir = tempDir();
    // four tensors over 65,536 elements (their rows need passes over the whole tensor), one small
    const shapes: Array<[string, number[]]> = [['model.layers.0.a', [300, 256]], ['model.layers.0.b', [260, 300]], ['model.layers.1.a', [300, 256]], ['model.layers.1.b', [70000]], ['model.norm', [64]]];
    const drawn = shapes.map(([, shape]) => drawBaseAndExperts(r, shape.reduce((a, b) => a * b, 1), 3));
    const model = (m: number) => shapes.map(([name, shape], i) => ({ name, dtype: 'BF16', shape, data: tensorBytes(m < 0 ? drawn[i].base : drawn[i].experts[m], DTYPE_CODE.BF16) }));
    saveModel(join(dir, 'base'), model(-1));
    [0, 1, 2].forEach((k) => saveModel(join(dir, `e${k}`), model(k)));
    for (const [method, global] of [['ties', {}], ['breadcrumbs_ties', { rescale: true, gamma: 0.05 }]] as const) {
      const recipe = writeRecipe(join(dir, `${method}.yaml`), {
        merge_method: method, base_model: join(dir, 'base'), parameters: global,
        models: [0, 1, 2].map((k) => ({ model: join(dir, `e${k}`), parameters: { density: [0.3, 0.5, 0.7][k], weight: 1 } })),
      });
      const out = join(dir, `o-${method}`);
      await merge(recipe, { out });
      const parsed = await loadRecipe(recipe);
      const strip = (x: Awaited<ReturnType<typeof verifyMerge>>) => ({ ...x, seconds: 0 });
      const one = await verifyMerge(out, parsed, { threads: 1 });
      expect(one.ok, one.problems.join('\n')).toBe(true);
      const order: string[] = [];
      const three = await verifyMerge(out, parsed, { threads: 3, onProgress: (_d, _t, name) => order.push(name) });
      expect(strip(three), `${method} (DELLA_TEST_SEED=${seed})`).toEqual(strip(one));
      expect(order).toEqual(one.checks.map((c) => c.name)); // progress in plan order
      // the CLI (its bundle finds the worker's module too)
      const viaCli = cli(['verify', out, '--recipe', recipe, '--threads', '2', '--json']);
      expect(viaCli.code, viaCli.stderr).toBe(0);
      expect({ ...JSON.parse(viaCli.stdout), seconds: 0 }).toEqual(JSON.parse(JSON.stringify(strip(one))));
      flip(out, 'model.layers.1.a', 299 * 256 + 3); // the last row is always sampled
      rmSync(join(out, 'della_merge_run.json'));
      const bad = await verifyMerge(out, parsed, { threads: 2 });
      expect(bad.ok).toBe(false);
      expect(bad.problems.join('\n')).toMatch(/"model\.layers\.1\.a": row 299 differs from the reference recomputation \(first at element 76547\)/);
      expect(strip(bad)).toEqual(strip(await verifyMerge(out, parsed, { threads: 1 })));
    }
    // Workers that cannot help leave the work to the main thread: the same report as one thread.
    const tiesOut = join(dir, 'o-ties'), ties = await loadRecipe(join(dir, 'ties.yaml'));
    const file = join(dir, 'e1', 'model.safetensors'), saved = readFileSync(file);
    const removed = [];
    for (const threads of [1, 2]) {
      writeFileSync(file, saved);
      const pending = verifyMerge(tiesOut, ties, { threads }); // the main thread has opened the files when this returns
      rmSync(file); // so the workers cannot
      removed.push({ ...(await pending), seconds: 0 });
    }
    writeFileSync(file, saved);
    expect(removed[0].ok).toBe(false);
    expect(removed[0].problems.join('\n')).toMatch(/e1.*rerun verify on files that stay put/);
    expect(removed[1]).toEqual(removed[0]);
    // a recipe that cannot be copied to a thread (a function added to it)
    const odd = { ...ties, note: () => 1 } as typeof ties;
    expect({ ...(await verifyMerge(tiesOut, odd, { threads: 2 })), seconds: 0 }).toEqual({ ...(await verifyMerge(tiesOut, odd, { threads: 1 })), seconds: 0 });
    const zero = cli(['verify', join(dir, 'o-ties'), '--recipe', join(dir, 'ties.yaml'), '--threads', '0']);
    expect(zero.code).toBe(2);
    expect(zero.stderr).toMatch(/threads/);
    await expect(verifyMerge(join(dir, 'o-ties'), await loadRecipe(join(dir, 'ties.yaml')), { threads: 0 })).rejects.toMatchObject({ code: 'E_ARGS', message: 'threads must be an integer from 1 to 1024, got 0' });
    // cancelled while the workers check: E_ABORTED, and the workers are stopped
    const controller = new AbortController();
    const pending = verifyMerge(join(dir, 'o-ties'), await loadRecipe(join(dir, 'ties.yaml')), { threads: 2, signal: controller.signal });
    setTimeout(() => controller.abort(), 5);
    await expect(pending).rejects.toMatchObject({ code: 'E_ABORTED' });
  });

  it('the CLI: run --verify, verify with a table and --json, a wrong seed fails', () => {
    const dir = tempDir();
    const m = makeModels(rng(seed + 4), dir, { dtype: 'BF16', experts: 2 });
    const recipe = writeRecipe(join(dir, 'r.yaml'), { merge_method: 'della', base_model: m.base, models: m.experts.map((model) => ({ model, parameters: { density: 0.5, epsilon: 0.2 } })) });
    const run = cli(['run', recipe, '--out', join(dir, 'o'), '--verify', '--seed', '77']);
    expect(run.code, run.stderr).toBe(0);
    expect(run.stdout).toMatch(/verified \d+ tensors \(\d+ rows recomputed by the reference\), all equal, all finite/);
    // a report to a pipe or /dev/stdout is written once, with the check (a file, before it too)
    const q = (a: string) => `'${a.replace(/'/g, "'\\''")}'`;
    const piped = spawnSync('sh', ['-c', `${q(process.execPath)} ${q(join(root, 'bin/della-merge.js'))} run ${q(recipe)} --out ${q(join(dir, 'o2'))} --verify --report /dev/stdout -q | cat`], { encoding: 'utf8' });
    expect(piped.status, piped.stderr).toBe(0);
    expect(piped.stdout.match(/^\{$/gm)).toHaveLength(1);
    expect(piped.stdout).toMatch(/^ {2}"verify": \{$/m);
    const v = cli(['verify', join(dir, 'o'), '--recipe', recipe]);
    expect(v.code, v.stderr).toBe(0);
    expect(v.stdout).toMatch(/model\.layers\.0\.mlp\.down_proj\.weight +ok +\d+\/\d+ +\d+\.\d% \d+\.\d%/);
    // the run's --seed 77 overrode the recipe's 0: verify says which it used
    expect(v.stdout).toMatch(/\nnote +rows recomputed with seed 77, the merge's \(della_merge_run\.json\), not the recipe's 0: a run's --seed overrides it\nverified/);
    expect(cli(['verify', join(dir, 'o'), '--recipe', recipe, '--seed', '77']).stdout).not.toMatch(/note/);
    const j = JSON.parse(cli(['verify', join(dir, 'o'), '--recipe', recipe, '--json']).stdout);
    expect(j.ok).toBe(true);
    expect(j.seed).toBe(77);
    const wrong = cli(['verify', join(dir, 'o'), '--recipe', recipe, '--seed', '78']);
    expect(wrong.code).toBe(1);
    expect(wrong.stdout).toMatch(/FAILED/);
    expect(readdirSync(join(dir, 'o'))).toContain('della_merge_run.json');
  });
  it('counts non-finite stored values of every dtype, aligned in memory or not', () => {
    const r = rng(seed ^ 0xf1f1);
    const cases = [
      { dtype: 'BF16', size: 2, bad: [0x7f80, 0xff80, 0x7fc0, 0x7f81, 0xffff], good: [0, 0x8000, 0x7f7f, 0xff7f, 0x3f80, 1] },
      { dtype: 'F16', size: 2, bad: [0x7c00, 0xfc00, 0x7e00, 0x7c01], good: [0, 0x8000, 0x7bff, 0xfbff, 0x3c00, 1] },
      { dtype: 'F32', size: 4, bad: [0x7f800000, 0xff800000, 0x7fc00000, 0x7f800001], good: [0, 0x80000000, 0x7f7fffff, 0xff7fffff, 1, 0x3f800000] },
      { dtype: 'F64', size: 8, bad: [[0, 0x7ff00000], [0, 0xfff00000], [1, 0x7ff80000]], good: [[0, 0], [0xffffffff, 0x7fefffff], [0, 0x3ff00000], [1, 0x80000000]] },
    ] as const;
    for (const c of cases) {
      const count = 1000;
      const held = new Uint8Array(count * c.size + 8);
      for (const shift of [0, 1, 2]) {
        const b = held.subarray(shift, shift + count * c.size);
        const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
        let want = 0;
        for (let i = 0; i < count; i++) {
          const bad = r() < 0.1;
          const list = (bad ? c.bad : c.good) as readonly (number | readonly number[])[];
          const v = list[Math.floor(r() * list.length)];
          if (bad) want++;
          if (c.size === 2) dv.setUint16(2 * i, v as number, true);
          else if (c.size === 4) dv.setUint32(4 * i, v as number, true);
          else { dv.setUint32(8 * i, (v as number[])[0], true); dv.setUint32(8 * i + 4, (v as number[])[1], true); }
        }
        expect(countNonFinite(b, c.dtype), `${c.dtype}, byte shift ${shift} (DELLA_TEST_SEED=${seed})`).toBe(want);
      }
    }
  });

  it('xxh64 (the recorded digest) gives the reference implementation\'s answers', () => {
    // From xxhsum -H1 (xxHash 0.8.1) over bytes (i * 131 + 7) mod 256.
    const known: Array<[number, string]> = [
      [0, 'ef46db3751d8e999'], [1, 'a96c7f0ce858bbb7'], [3, 'bed43740ee6332bb'], [4, 'fa212ae44b3bb23d'],
      [7, '2744460dd675d2c0'], [8, '994b676b71ce94dd'], [31, '6711d55e306b5d8f'], [32, '07f7b8e3bc5d6e25'],
      [33, '09f85eeb4e1cbe9f'], [63, 'b7c9968c066cb6a5'], [64, '50d4159a0411632e'], [100, '9ddada11d3dc2d8f'],
      [1000, '0bf0bdbcc82eb373'], [1000003, '2b4d5b88880ffcc2'],
    ];
    const native = loadNative();
    for (const [n, want] of known) {
      const bytes = new Uint8Array(n).map((_, i) => (i * 131 + 7) & 255);
      expect(native.xxh64(bytes), `length ${n}`).toBe(want);
    }
    expect(() => native.xxh64('abc' as unknown as Uint8Array)).toThrow(/xxh64 takes a Uint8Array/);
  });

  it('reads records of earlier versions, which hold SHA-256 digests', async () => {
    const dir = tempDir();
    const m = makeModels(rng(seed + 6), dir, { dtype: 'F16', experts: 2 });
    const recipe = writeRecipe(join(dir, 'r.yaml'), { merge_method: 'ties', base_model: m.base, models: m.experts.map((model) => ({ model, parameters: { density: 0.5 } })) });
    const out = join(dir, 'o');
    await merge(recipe, { out });
    const file = join(out, 'della_merge_run.json');
    const record = JSON.parse(readFileSync(file, 'utf8'));
    expect(Object.values(record.xxh64).every((d) => /^[0-9a-f]{16}$/.test(String(d)))).toBe(true);
    // A malformed seed in the record is named, not silently replaced by the recipe's.
    writeFileSync(file, JSON.stringify({ ...record, seed: 'x' }));
    expect((await verifyMerge(out, await loadRecipe(recipe))).problems).toEqual(
      [`della_merge_run.json records the seed "x", not an integer in [0, 2^53): rows were recomputed with the recipe's seed 0`]);
    // A record of another method, or with digests of tensors the plan has none of (both passed).
    writeFileSync(file, JSON.stringify({ ...record, method: 'della' }));
    expect((await verifyMerge(out, await loadRecipe(recipe))).problems).toEqual(
      ['della_merge_run.json records the method "della", but the recipe\'s is ties']);
    writeFileSync(file, JSON.stringify({ ...record, xxh64: { ...record.xxh64, 'model.ghost': '0000000000000000' } }));
    expect((await verifyMerge(out, await loadRecipe(recipe))).problems).toEqual(
      ['della_merge_run.json records digests of 1 tensor(s) the plan does not have (first: "model.ghost")']);
    // A record that differs in its last digit reads as different: digests are shown whole.
    const name = 'model.layers.0.mlp.down_proj.weight';
    const real = record.xxh64[name] as string;
    const edited = real.slice(0, 15) + (real[15] === '0' ? '1' : '0');
    writeFileSync(file, JSON.stringify({ ...record, xxh64: { ...record.xxh64, [name]: edited } }));
    expect((await verifyMerge(out, await loadRecipe(recipe))).problems).toContain(
      `tensor "${name}": its bytes changed since the merge wrote them, or its record did (XXH64 ${real}, recorded ${edited})`);
    const c = openCheckpoint(out);
    const sha256 = Object.fromEntries(c.names.map((name) => [name, createHash('sha256').update(c.bytes(name)).digest('hex')]));
    c.close();
    delete record.xxh64;
    writeFileSync(file, JSON.stringify({ ...record, sha256 }));
    const parsed = await loadRecipe(recipe);
    expect((await verifyMerge(out, parsed)).problems).toEqual([]);
    flip(out, 'model.layers.0.mlp.down_proj.weight', 3);
    const bad = await verifyMerge(out, parsed);
    expect(bad.problems.join('\n')).toMatch(/"model\.layers\.0\.mlp\.down_proj\.weight": its bytes changed since the merge wrote them, or its record did \(SHA-256 [0-9a-f]{64}, recorded [0-9a-f]{64}\)/);
  });

  it('an input or output file modified while verify reads it fails the verification, naming the file', async () => {
    const dir = tempDir();
    const m = makeModels(rng(seed + 7), dir, { dtype: 'BF16', experts: 2 });
    const recipe = writeRecipe(join(dir, 'r.yaml'), { merge_method: 'della', base_model: m.base, models: m.experts.map((model) => ({ model, parameters: { density: 0.5, epsilon: 0.1 } })) });
    const out = join(dir, 'o');
    await merge(recipe, { out });
    const parsed = await loadRecipe(recipe);
    for (const victim of [join(m.experts[0], 'model.safetensors'), join(out, 'model.safetensors')]) {
      let touched = false;
      const r = await verifyMerge(out, parsed, {
        onProgress: () => {
          if (!touched) utimesSync(victim, new Date(), new Date(Date.now() + 5000));
          touched = true;
        },
      });
      expect(touched).toBe(true);
      expect(r.ok).toBe(false);
      expect(r.problems).toEqual([`${victim} was modified while it was being read: rerun verify on files that stay put`]);
    }
  });
  it('an AbortSignal cancels the check (E_ABORTED), before it starts or between tensors, and leaves the output alone', async () => {
    const dir = tempDir();
    const tensors = Array.from({ length: 40 }, (_, i) => ({ name: `t${String(i).padStart(2, '0')}`, dtype: 'F32', shape: [2, 2], data: new Float32Array(4).fill(i) }));
    saveModel(join(dir, 'base'), tensors);
    saveModel(join(dir, 'e'), tensors.map((t) => ({ ...t, data: new Float32Array(4).fill(1) })));
    const recipe = writeRecipe(join(dir, 'r.yaml'), { merge_method: 'task_arithmetic', base_model: join(dir, 'base'), models: [{ model: join(dir, 'e') }] });
    const out = join(dir, 'o');
    await merge(recipe, { out });
    const parsed = await loadRecipe(recipe);
    const before = readdirSync(out).sort();
    await expect(verifyMerge(out, parsed, { signal: AbortSignal.abort() })).rejects.toMatchObject({ code: 'E_ABORTED' });
    const controller = new AbortController();
    let seen = 0;
    const onProgress = (done: number) => {
      seen = done;
      if (done === 5) controller.abort();
    };
    await expect(verifyMerge(out, parsed, { signal: controller.signal, onProgress })).rejects.toMatchObject({
      code: 'E_ABORTED', message: `the check of ${out} was cancelled; the output is left as it is, unverified`,
    });
    expect(seen).toBe(5); // it stops after the tensor at hand
    expect(readdirSync(out).sort()).toEqual(before);
    expect((await verifyMerge(out, parsed)).ok).toBe(true);
  });
});
