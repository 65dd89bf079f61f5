/** The pipeline API: tensors in memory, merged tensors out, cancellation, worker threads. */
import { spawnSync } from 'node:child_process';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { closeSync, existsSync, ftruncateSync, mkdirSync, openSync, readdirSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import {
  assemble, layerCount, loadRecipe, merge, mergeTensors, openCheckpoint, parseRecipe, planRecipe, resolveTensorParams, saveModel, verifyMerge, DellaError,
  type MemoryTensor, type Recipe,
} from '../lib/index.js';
import { DTYPE_CODE } from '../lib/merge/task.js';
import { refused } from './helpers/errors.js';
import { tempDir } from './helpers/models.js';
import { drawBaseAndExperts, tensorBytes } from './helpers/tensors.js';
import { int, rng, testSeed } from './helpers/random.js';

const seed = testSeed();
const root = resolve(import.meta.dirname, '..');

function randomSets(r: () => number, K: number) {
  const names = ['model.layers.0.mlp.up_proj.weight', 'model.layers.1.mlp.up_proj.weight', 'model.norm.weight', 'lm_head.weight'];
  const sets: Array<Record<string, MemoryTensor>> = Array.from({ length: K + 1 }, () => ({}));
  for (const name of names) {
    const shape = name.includes('norm') ? [int(r, 1, 64)] : [int(r, 1, 40), int(r, 1, 90)];
    const numel = shape.reduce((a, b) => a * b, 1);
    const { base, experts } = drawBaseAndExperts(r, numel, K);
    [base, ...experts].forEach((v, m) => { sets[m][name] = { dtype: 'BF16', shape, data: tensorBytes(v, DTYPE_CODE.BF16) }; });
  }
  return { base: sets[0], models: sets.slice(1) };
}

const recipeDoc = {
  merge_method: 'della',
  models: [{ parameters: { weight: 1, density: 0.5, epsilon: 0.1 } }, { parameters: { weight: 0.7, density: 0.6, epsilon: 0.2 } }],
  parameters: { lambda: 1.1 },
  seed: 3,
};

describe(`pipeline API (DELLA_TEST_SEED=${seed})`, () => {
  it('merges tensors held in memory, equal to the same merge through files', async () => {
    const r = rng(seed);
    const { base, models } = randomSets(r, 2);
    const got = new Map<string, Uint8Array>();
    for await (const t of mergeTensors(recipeDoc, { base, models, threads: 2 })) {
      expect(t.report.kind).toBe('merge');
      got.set(t.name, t.data);
    }
    const dir = tempDir();
    const toFiles = (set: Record<string, MemoryTensor>, d: string) => saveModel(d, Object.entries(set).map(([name, t]) => ({ name, ...t })));
    toFiles(base, join(dir, 'base'));
    models.forEach((m, k) => toFiles(m, join(dir, `m${k}`)));
    await merge({ ...recipeDoc, base_model: join(dir, 'base'), models: recipeDoc.models.map((m, k) => ({ model: join(dir, `m${k}`), ...m })) }, { out: join(dir, 'out') });
    const c = openCheckpoint(join(dir, 'out'));
    expect([...got.keys()].sort()).toEqual(c.names);
    for (const name of c.names) expect(Buffer.from(got.get(name)!).equals(Buffer.from(c.bytes(name))), name).toBe(true);
    c.close();
  });

  it('streams merged tensors from files; cancelling stops it with E_ABORTED', async () => {
    const r = rng(seed + 1);
    const { base, models } = randomSets(r, 2);
    const dir = tempDir();
    saveModel(join(dir, 'base'), Object.entries(base).map(([name, t]) => ({ name, ...t })));
    models.forEach((m, k) => saveModel(join(dir, `m${k}`), Object.entries(m).map(([name, t]) => ({ name, ...t }))));
    const doc = { ...recipeDoc, base_model: join(dir, 'base'), models: recipeDoc.models.map((m, k) => ({ model: join(dir, `m${k}`), ...m })) };
    const names: string[] = [];
    for await (const t of mergeTensors(doc)) names.push(t.name);
    expect(names).toEqual(Object.keys(base).sort());
    const controller = new AbortController();
    controller.abort();
    const err = await (async () => { for await (const _ of mergeTensors(doc, { signal: controller.signal })) void _; })().catch((e) => e);
    expect(err).toBeInstanceOf(DellaError);
    expect(err.code).toBe('E_ABORTED');
    // Aborted at the first tensor, it stops there, not at the end of the batch (all of
    // these tensors are one batch).
    const midway = new AbortController();
    const seen: string[] = [];
    const late = await (async () => {
      for await (const t of mergeTensors(doc, { signal: midway.signal })) { seen.push(t.name); midway.abort(); }
    })().catch((e) => e);
    expect([late.code, seen.length]).toEqual(['E_ABORTED', 1]);
    // mergeTensors writes nothing in any case: its message says what stops
    expect([err.message, late.message]).toEqual(Array(2).fill('the merge was cancelled; no more tensors are yielded'));
    // the reason given to abort() is the error's cause (it was dropped), for merge() too
    const why = new Error('the user left');
    const reasoned = await (async () => { for await (const _ of mergeTensors(doc, { signal: AbortSignal.abort(why) })) void _; })().catch((e) => e);
    expect([reasoned.code, reasoned.cause]).toEqual(['E_ABORTED', why]);
    const merged = await merge(doc, { out: join(dir, 'never'), signal: AbortSignal.abort(why) }).catch((e) => e);
    expect([merged.code, merged.cause, merged.message]).toEqual(['E_ABORTED', why, 'the merge was cancelled; nothing was written']);
    expect(existsSync(join(dir, 'never'))).toBe(false);
    // leaving early is fine
    for await (const t of mergeTensors(doc)) if (t) break;
  });

  it('refuses malformed in-memory tensors with a message naming the tensor', async () => {
    const bad = { base: { w: { dtype: 'BF16', shape: [2, 2], data: new Uint16Array(3) } }, models: [{ w: { dtype: 'BF16', shape: [2, 2], data: new Uint16Array(4) } }] };
    const run = async () => { for await (const _ of mergeTensors({ merge_method: 'task_arithmetic', models: [{}] }, bad)) void _; };
    await expect(run()).rejects.toThrow(/base: tensor "w": 6 bytes given, shape \[2, 2\] of BF16 needs 8/);
  });

  it('is safe in worker threads, several at once', async () => {
    const code = `
      import { parentPort, workerData } from 'node:worker_threads';
      const { mergeTensors } = await import(${JSON.stringify(pathToFileURL(join(root, 'dist/index.js')).href)});
      const out = {};
      for await (const t of mergeTensors(workerData.recipe, { base: workerData.base, models: workerData.models, threads: 2 })) {
        out[t.name] = Buffer.from(t.data).toString('hex');
      }
      parentPort.postMessage(out);
    `;
    const { base, models } = randomSets(rng(seed + 2), 2);
    const run = () => new Promise<Record<string, string>>((done, fail) => {
      const w = new Worker(new URL(`data:text/javascript,${encodeURIComponent(code)}`), { workerData: { recipe: recipeDoc, base, models } });
      w.once('message', done);
      w.once('error', fail);
    });
    const [a, b, c] = await Promise.all([run(), run(), run()]);
    const here: Record<string, string> = {};
    for await (const t of mergeTensors(recipeDoc, { base, models })) here[t.name] = Buffer.from(t.data).toString('hex');
    expect(a).toEqual(here);
    expect(b).toEqual(here);
    expect(c).toEqual(here);
  });

  it('a worker stopped while the addon merges for it ends alone (it aborted the whole process)', () => {
    const dir = tempDir();
    const tensors = (v: number) => Array.from({ length: 8 }, (_, i) => ({ name: `w${i}`, dtype: 'F32', shape: [2048, 2048], data: new Float32Array(2048 * 2048).fill(v + i) }));
    saveModel(join(dir, 'base'), tensors(0));
    saveModel(join(dir, 'e'), tensors(1));
    const recipe = JSON.stringify({ merge_method: 'task_arithmetic', base_model: join(dir, 'base'), models: [{ model: join(dir, 'e') }] });
    const index = JSON.stringify(pathToFileURL(join(root, 'dist/index.js')).href);
    // In a child: a failure here killed the test runner's process too.
    const script = `
      import { Worker } from 'node:worker_threads';
      const code = \`
        import { parentPort, workerData } from 'node:worker_threads';
        const { merge } = await import(${index});
        await merge(workerData.recipe, { out: workerData.out, threads: 1, onProgress: () => parentPort.postMessage('batch') });
      \`;
      for (let i = 0; i < 3; i++) {
        const w = new Worker(new URL('data:text/javascript,' + encodeURIComponent(code)), { workerData: { recipe: ${recipe}, out: ${JSON.stringify(join(dir, 'o'))} + i } });
        await new Promise((done) => w.once('message', done)); // the first batch is done, the next one merging
        await w.terminate();
      }
      await new Promise((r) => setTimeout(r, 300));
      console.log('alive');
    `;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 120_000 });
    expect(r.stderr).toBe('');
    expect([r.status, r.stdout.trim()]).toEqual([0, 'alive']);
    // nor do they leave their unfinished outputs (a terminated Worker runs no 'exit' handler)
    expect(readdirSync(dir).sort()).toEqual(['base', 'e']);
  });
});

describe('API arguments: every wrong one is a DellaError naming it, never a crash or a hang', () => {
  const dir = tempDir('della-api-args-');
  saveModel(join(dir, 'base'), [{ name: 'w', dtype: 'F32', shape: [2, 2], data: new Float32Array([1, 2, 3, 4]) }]);
  saveModel(join(dir, 'x'), [{ name: 'w', dtype: 'F32', shape: [2, 2], data: new Float32Array([2, 2, 4, 4]) }]);
  const doc = { merge_method: 'task_arithmetic', base_model: join(dir, 'base'), models: [{ model: join(dir, 'x') }] };

  it('merge() options of the wrong kind', async () => {
    const out = join(dir, 'never');
    await refused(() => merge(doc, { out, backend: 'gpu' as 'native' }), 'E_ARGS', /backend must be "native" or "reference", got "gpu"/);
    await refused(() => merge(doc, { out, device: 42 as unknown as string }), 'E_ARGS', /device must be a string/);
    await refused(() => merge(doc, { out, onProgress: 5 as unknown as () => void }), 'E_ARGS', /onProgress must be a function/);
    await refused(() => merge(doc, { out, signal: {} as AbortSignal }), 'E_ARGS', /signal must be an AbortSignal/);
    // options that are not merge()'s were ignored (a typo, or another function's)
    await refused(() => merge(doc, { out, threds: 2 } as unknown as { out: string }), 'E_ARGS',
      /^options\.threds is not an option of merge \(did you mean "threads"\?\); its options are out, seed, threads, /);
    await refused(async () => { for await (const _ of mergeTensors(doc, { device: 'cuda' } as object)) void _; }, 'E_ARGS',
      /^options\.device is not an option of mergeTensors; its options are base, models, /);
    await refused(() => assemble([dir], out, { force: true } as object), 'E_ARGS', /^options\.force is not an option of assemble/);
    await refused(() => verifyMerge(dir, parseRecipe(JSON.stringify(doc)), { sample: 3 } as object), 'E_ARGS', /^options\.sample is not an option of verifyMerge \(did you mean "samples"\?\)/);
    await refused(() => verifyMerge(5 as unknown as string, 5 as unknown as Recipe), 'E_ARGS', /^verifyMerge\(out, recipe\) takes the output directory, got 5$/);
    await refused(() => merge(doc, { out, seed: '3' as unknown as number }), 'E_ARGS', /^seed must be an integer in \[0, 2\^53\), got "3"$/);
    // a string would count as true: 'no' used to overwrite, 'false' to allow non-finite values
    await refused(() => merge(doc, { out, overwrite: 'no' as unknown as boolean }), 'E_ARGS', /^options\.overwrite must be true or false, got "no"$/);
    await refused(() => merge(doc, { out, allowNonFinite: 'false' as unknown as boolean }), 'E_ARGS', /^options\.allowNonFinite must be true or false, got "false"$/);
    expect(existsSync(out)).toBe(false);
    // a count-sized table per part used to exhaust the heap
    await refused(() => merge(doc, { out, part: { index: 1, count: 1e9 } }), 'E_ARGS', /at most 65536 parts/);
    await refused(() => merge(doc, { out, part: '1/2' as unknown as { index: number; count: number } }), 'E_ARGS', /part must be \{ index, count \}/);
    await refused(() => merge({ ...doc, mergeMethod: 'ties', baseModel: 'b' }, { out }), 'E_RECIPE', /unknown key "mergeMethod"/);
    await refused(() => merge({ ...doc, seed: Symbol('s') }, { out }), 'E_RECIPE', /not plain data/);
    expect(existsSync(out)).toBe(false);
  });

  it('every function\'s options are checked alike: unknown keys, wrong kinds and null', async () => {
    const out = join(dir, 'never');
    const T = [{ name: 'w', dtype: 'F32' as const, shape: [2], data: new Float32Array([1, 2]) }];
    const rfile = join(dir, 'opts.yaml');
    writeFileSync(rfile, JSON.stringify(doc));
    // saveModel, loadRecipe and parseRecipe ignored typos and threw TypeErrors
    await refused(() => saveModel(join(dir, 's1'), T, { shardsize: 4 } as object), 'E_ARGS', /^options\.shardsize is not an option of saveModel \(did you mean "shardSize"\?\)/);
    await refused(() => loadRecipe(rfile, null as unknown as object), 'E_ARGS', /^loadRecipe\(file, options\): options must be an object, got null$/);
    await refused(() => loadRecipe(rfile, { cwd: 5 } as unknown as object), 'E_ARGS', /^options\.cwd must be a string, got 5$/);
    await refused(() => loadRecipe(rfile, { Cwd: '/tmp' } as object), 'E_ARGS', /^options\.Cwd is not an option of loadRecipe \(did you mean "cwd"\?\)/);
    await refused(() => parseRecipe(JSON.stringify(doc), { resolvePath: 5 } as unknown as object), 'E_ARGS', /^options\.resolvePath must be a function, got 5$/);
    await refused(() => parseRecipe(JSON.stringify(doc), { resolvepath: (m: string) => m } as object), 'E_ARGS', /did you mean "resolvePath"/);
    expect(existsSync(join(dir, 's1'))).toBe(false);
    // null: some options took it as the default, others refused it, gpuMemory misread it
    for (const key of ['threads', 'seed', 'shardSize', 'overwrite', 'onProgress', 'signal', 'device', 'gpuMemory', 'part']) {
      await refused(() => merge(doc, { out, [key]: null } as unknown as { out: string }), 'E_ARGS', new RegExp(`^options\\.${key} is null: leave it out \\(or undefined\\) for its default$`));
    }
    await refused(() => verifyMerge(dir, parseRecipe(JSON.stringify(doc)), { threads: null } as unknown as object), 'E_ARGS', /^options\.threads is null/);
    await refused(() => verifyMerge(dir, parseRecipe(JSON.stringify(doc)), { samples: '3' } as unknown as object), 'E_ARGS', /^samples must be a positive integer, got "3"$/);
    // part: 0 or false was "no part", and extra keys were ignored
    await refused(() => merge(doc, { out, part: 0 } as unknown as { out: string }), 'E_ARGS', /part must be \{ index, count \}, got 0/);
    await refused(() => merge(doc, { out, part: { index: 1, count: 2, x: 1 } } as unknown as { out: string }), 'E_ARGS', /part must be \{ index, count \}, got a key "x" too/);
    // a typo is named before the recipe is read
    await refused(() => merge(join(dir, 'nope.yaml'), { out, threds: 1 } as unknown as { out: string }), 'E_ARGS', /^options\.threds is not an option of merge/);
    expect(existsSync(out)).toBe(false);
  });

  it('a Recipe with a field set wrong is named as such, not read as a recipe document', async () => {
    const out = join(dir, 'never');
    const rfile = join(dir, 'opts.yaml');
    writeFileSync(rfile, JSON.stringify(doc));
    const r = await loadRecipe(rfile);
    await refused(() => merge({ ...r, models: null } as unknown as Recipe, { out }), 'E_ARGS', /^the Recipe object's models must be an array, got null \(a Recipe from loadRecipe/);
    await refused(() => merge({ ...r, baseModel: 'b' } as unknown as Recipe, { out }), 'E_ARGS', /^the Recipe object's baseModel must be an object with a path string, got "b"/);
    await refused(() => planRecipe({ ...r, mergeMethod: 3 } as unknown as Recipe), 'E_ARGS', /^planRecipe\(recipe\): the Recipe object's mergeMethod must be a method name string, got 3/);
    // a document written in camelCase by mistake is a document, told the keys it meant
    await refused(() => merge({ mergeMethod: 'ties', baseModel: join(dir, 'base'), models: [{ model: join(dir, 'x') }] }, { out }), 'E_RECIPE', /unknown key "mergeMethod" at the top level \(did you mean "merge_method"\?\)/);
    const { warnings: _, ...noWarnings } = r; // warnings are the parser's output: leaving them out is fine
    expect((await merge(noWarnings as Recipe, { out: join(dir, 'no-warnings') })).tensors.merged).toBe(1);
    expect(existsSync(out)).toBe(false);
  });

  it('resolveTensorParams checks its recipe and arguments; layerCount its names', async () => {
    const r = parseRecipe(JSON.stringify({ ...doc, merge_method: 'ties', models: [{ model: join(dir, 'x'), parameters: { density: [0.2, 0.8] } }] }));
    expect(resolveTensorParams(r, 'model.layers.1.w', 3).experts[0].density).toBe(0.5);
    const changed = { ...r, models: [{ ...r.models[0], parameters: { density: 5 } }] };
    await refused(() => resolveTensorParams(changed, 'w', 0), 'E_RECIPE', /density/);
    await refused(() => resolveTensorParams(r, 5 as unknown as string, 0), 'E_ARGS', /tensorName must be a string, got 5/);
    for (const layers of [-1, 1.5, '2']) {
      await refused(() => resolveTensorParams(r, 'w', layers as number), 'E_ARGS', /layers must be a whole number >= 0/);
    }
    await refused(() => resolveTensorParams('r.yaml' as unknown as Recipe, 'w', 0), 'E_ARGS', /takes a parsed Recipe/);
    await refused(() => layerCount([5] as unknown as string[]), 'E_ARGS', /layerCount\(names\) takes the base model's tensor names \(strings\), got 5 among them/);
  });

  it('an empty tensor merges whatever its last dimension (rows of 2^40 were refused with a bare RangeError)', async () => {
    const d = tempDir('della-api-empty-');
    for (const m of ['b', 'e']) {
      saveModel(join(d, m), [{ name: 'empty', dtype: 'BF16', shape: [0, 2 ** 40], data: new Uint16Array(0) }, { name: 'w', dtype: 'F32', shape: [2], data: new Float32Array([1, m === 'b' ? 1 : 3]) }]);
    }
    for (const method of ['della', 'ties', 'task_arithmetic']) {
      const report = await merge({ merge_method: method, base_model: join(d, 'b'), models: [{ model: join(d, 'e'), parameters: method === 'task_arithmetic' ? {} : { density: 1 } }] }, { out: join(d, method) });
      expect(report.tensors).toEqual({ total: 2, merged: 2, copied: 0 });
      const c = openCheckpoint(join(d, method));
      expect([c.tensors.get('empty')!.shape, [...(c.array('w') as Float32Array)]]).toEqual([[0, 2 ** 40], [1, 3]]);
      c.close();
    }
  });

  it('functions that take a parsed Recipe, a path or a list', async () => {
    const recipe = join(dir, 'r.yaml');
    writeFileSync(recipe, JSON.stringify(doc));
    await refused(() => planRecipe(recipe as unknown as Recipe), 'E_ARGS', /planRecipe\(recipe\) takes a parsed Recipe .*got the string/);
    await refused(() => verifyMerge(dir, recipe as unknown as Recipe), 'E_ARGS', /verifyMerge\(out, recipe\) takes a parsed Recipe/);
    await refused(() => parseRecipe(doc as unknown as string), 'E_ARGS', /parseRecipe\(text\) takes the recipe's YAML or JSON text/);
    await refused(() => loadRecipe(5 as unknown as string), 'E_ARGS', /loadRecipe\(file\) takes a recipe file path, got 5/);
    await refused(() => openCheckpoint(5 as unknown as string), 'E_ARGS', /openCheckpoint\(path\) takes a file or directory path/);
    await refused(() => layerCount(null as unknown as string[]), 'E_ARGS', /layerCount\(names\) takes/);
    await refused(() => assemble(dir as unknown as string[], join(dir, 'a')), 'E_ARGS', /assemble\(partDirs, out\) takes a list/);
    const c = openCheckpoint(join(dir, 'base'));
    expect(() => (c.names as string[]).push('x')).toThrow(TypeError); // the checkpoint's own list: frozen, not shared
    expect(c.names).toEqual(['w']);
    c.close();
    await refused(() => c.bytes('w'), 'E_ARGS', /the checkpoint is closed/);
  });

  it('a view of openCheckpoint may be written to: the write stays in memory, the file is unchanged (it was a SIGSEGV)', () => {
    const file = join(dir, 'base', 'model.safetensors');
    const before = readFileSync(file);
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', `
      const { openCheckpoint } = await import(${JSON.stringify(pathToFileURL(join(root, 'dist/index.js')).href)});
      const c = openCheckpoint(${JSON.stringify(join(dir, 'base'))});
      const w = c.array('w');
      w[0] = 42;
      c.bytes('w')[7] = 0; // the high byte of 2
      console.log(JSON.stringify([...c.array('w')]));
    `], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect([r.status, JSON.parse(r.stdout)]).toEqual([0, [42, 0, 3, 4]]);
    expect(readFileSync(file)).toEqual(before);
  });

  it('a Recipe object changed after parsing is checked as a recipe file is (it reached the kernels as given)', async () => {
    const good = parseRecipe(JSON.stringify({ ...doc, merge_method: 'ties', models: [{ model: join(dir, 'x'), parameters: { density: 0.5 } }] }));
    expect(planRecipe(good).plan.tensors).toHaveLength(1);
    const out = join(dir, 'changed');
    await refused(() => merge({ ...good, dtype: 'I8' } as unknown as Recipe, { out }), 'E_RECIPE', /^dtype "I8" is not a supported dtype/);
    await refused(() => merge({ ...good, models: [] }, { out }), 'E_RECIPE', /^models must be a non-empty list/);
    await refused(() => merge({ ...good, models: good.models.map((m) => ({ ...m, parameters: { density: 5 } })) }, { out }), 'E_RECIPE',
      /parameter "density" must be in \(0, 1\], got 5/);
    await refused(() => verifyMerge(dir, { ...good, mergeMethod: 'dela' }), 'E_RECIPE', /"dela".*did you mean "della"/);
    expect(existsSync(out)).toBe(false);
    // A valid change runs, and the recorded recipe says what ran.
    const lower = { ...good, models: good.models.map((m) => ({ ...m, parameters: { density: 0.25 } })) };
    const report = await merge(lower, { out });
    expect(report.tensorReports.find((t) => t.name === 'w')!.parameters!.density).toEqual([0.25]);
    expect(readFileSync(join(out, 'della_merge_recipe.yaml'), 'utf8')).toMatch(/density: 0\.25/);
  });

  it('a recipe listing the base under another spelling (and naming it so as tokenizer_source) is used as parsed', async () => {
    // checkedRecipe once parsed it again without the base entry: the tokenizer_source
    // became unknown (run refused it), and without it the recipe counted as changed and
    // lost its file (which --overwrite of its directory then deleted).
    const home = join(dir, 'spelled');
    mkdirSync(home, { recursive: true });
    const file = join(home, 'r.yaml');
    writeFileSync(file, `merge_method: ties\nbase_model: ./base\ntokenizer_source: base/\nmodels:\n  - model: base/\n  - model: x\n    parameters: {density: 0.5}\n`);
    const loaded = await loadRecipe(file, { cwd: dir });
    const report = await merge(loaded, { out: join(dir, 'spelled-out') });
    expect(report.tensors.merged).toBe(1);
    await refused(() => merge(loaded, { out: home, overwrite: true }), 'E_OUTPUT', /holds .*spelled\/r\.yaml, an input of this merge/);
    expect(existsSync(file)).toBe(true);
  });

  it('verifyMerge refuses a seed that is not an integer in [0, 2^53) instead of failing a good merge', async () => {
    const out = join(dir, 'good');
    await merge(doc, { out });
    const recipe = await loadRecipe(join(dir, 'r.yaml'));
    for (const seed of [-1, NaN, 1.5, '42']) {
      await refused(() => verifyMerge(out, recipe, { seed: seed as number }), 'E_ARGS', /seed must be an integer in \[0, 2\^53\)/);
    }
    expect((await verifyMerge(out, recipe)).ok).toBe(true);
  });

  it("an onProgress that throws at 'finish' fails the merge with nothing left", async () => {
    const out = join(dir, 'finish-throws');
    await expect(merge(doc, { out, onProgress: (e) => { if (e.phase === 'finish') throw new Error('no thanks'); } })).rejects.toThrow('no thanks');
    expect(existsSync(out)).toBe(false);
  });

  // Node 20's recursive mkdir loops forever under /proc; the output's parents are made a level at a time.
  it.skipIf(!existsSync('/proc/self'))('an output under /proc fails at once (E_IO) instead of hanging', async () => {
    await refused(() => merge(doc, { out: '/proc/della-nope/merged' }), 'E_IO', /cannot create \/proc\/della-nope/);
  });
});
