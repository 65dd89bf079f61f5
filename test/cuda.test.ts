/**
 * The CUDA plugin from the host side, where no GPU is needed: it is built when nvcc is
 * present, the core addon never links CUDA, and --device cuda fails before anything is
 * written (no plugin, driver or GPU) with one message naming the loader's or runtime's
 * reason. On a machine with a GPU the "no GPU" cases are skipped and a GPU merge is
 * compared byte for byte with the CPU's instead (scripts/gpu-check.sh does more).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { isDellaError, merge } from '../lib/index.js';
import { parseDevice } from '../lib/merge/device.js';
import { loadNative, nativeLocation } from '../lib/native.js';
import { makeModels, tempDir, writeRecipe } from './helpers/models.js';
import { rng, testSeed } from './helpers/random.js';

const root = resolve(import.meta.dirname, '..');
const seed = testSeed();

function cli(args: string[], env: NodeJS.ProcessEnv = {}) {
  const r = spawnSync(process.execPath, [join(root, 'bin/della-merge.js'), ...args], {
    cwd: root, encoding: 'utf8', env: { ...process.env, NO_COLOR: '1', ...env },
  });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

function hasNvcc(): boolean {
  for (const p of (process.env.PATH ?? '').split(':').concat(['/usr/local/cuda/bin'])) {
    if (p && existsSync(join(p, 'nvcc'))) return true;
  }
  return false;
}

const addon = nativeLocation().path!;
const pluginFile = join(dirname(addon), 'della_merge_cuda.so');
const info = loadNative().cudaInfo(0);
const gpu = info.ok;
const explicitAddon = Boolean(process.env.DELLA_NATIVE_PATH); // test:asan builds without the plugin

function neededLibraries(file: string): string[] {
  const out = execFileSync('readelf', ['-d', file], { encoding: 'utf8' });
  return [...out.matchAll(/\(NEEDED\)\s+Shared library: \[([^\]]+)\]/g)].map((m) => m[1]);
}
const haveReadelf = spawnSync('readelf', ['--version']).status === 0;

function recipeIn(dir: string) {
  const r = rng(seed);
  const models = makeModels(r, dir, { dtype: 'BF16', experts: 2, layers: 2 });
  return writeRecipe(join(dir, 'recipe.yaml'), {
    merge_method: 'della',
    base_model: models.base,
    models: models.experts.map((m) => ({ model: m, parameters: { weight: 0.7, density: 0.5, epsilon: 0.1 } })),
    dtype: 'bfloat16',
    seed: 3,
  });
}

/** Everything in `dir` except the models and the recipe the test made. */
function leftovers(dir: string): string[] {
  return readdirSync(dir).filter((f) => !['base', 'expert0', 'expert1', 'recipe.yaml'].includes(f));
}

describe(`CUDA plugin, host side (DELLA_TEST_SEED=${seed})`, () => {
  it.skipIf(!hasNvcc() || explicitAddon)('is built beside the addon when nvcc is present', () => {
    expect(existsSync(pluginFile), `${pluginFile} (nvcc found, so CMake should have built it)`).toBe(true);
    expect(info.plugin).toBe(pluginFile);
    expect(info.pluginExists).toBe(true);
  });

  it.skipIf(!haveReadelf)('the core addon links no CUDA library; the plugin links the CUDA runtime statically', () => {
    const needed = neededLibraries(addon);
    expect(needed.length).toBeGreaterThan(0);
    expect(needed.filter((l) => /cuda|cublas|nvrtc|nvidia/i.test(l))).toEqual([]);
    if (existsSync(pluginFile)) {
      expect(neededLibraries(pluginFile).filter((l) => /cuda/i.test(l))).toEqual([]);
    }
  });

  it('parses --device and rejects anything else', () => {
    expect(parseDevice(undefined)).toEqual({ kind: 'cpu' });
    expect(parseDevice('cpu')).toEqual({ kind: 'cpu' });
    expect(parseDevice('cuda')).toEqual({ kind: 'cuda', index: 0 });
    expect(parseDevice('cuda:3')).toEqual({ kind: 'cuda', index: 3 });
    for (const bad of ['gpu', 'cuda:', 'cuda:x', 'CUDA', 'cuda:-1', 'cpu:0', '']) {
      expect(() => parseDevice(bad), bad).toThrow(/is not one of cpu, cuda, cuda:N/);
    }
  });

  it('run rejects --device bogus and --gpu-memory nonsense with exit code 2, writing nothing', () => {
    const dir = tempDir('della-cuda-');
    const recipe = recipeIn(dir);
    const out = join(dir, 'merged');
    const bogus = cli(['run', recipe, '--out', out, '--device', 'bogus']);
    expect(bogus.code).toBe(2);
    expect(bogus.stderr).toMatch(/device "bogus" is not one of cpu, cuda, cuda:N/);
    const nonsense = cli(['run', recipe, '--out', out, '--device', 'cuda', '--gpu-memory', 'nonsense']);
    expect(nonsense.code).toBe(2);
    expect(nonsense.stderr).toMatch(/--gpu-memory "nonsense" is not a size/);
    const cpuBudget = cli(['run', recipe, '--out', out, '--gpu-memory', '2GiB']);
    expect(cpuBudget.code).toBe(2);
    expect(cpuBudget.stderr).toMatch(/--gpu-memory needs --device cuda/);
    expect(leftovers(dir)).toEqual([]);
  });

  it('run --device cuda with the plugin missing fails with the loader\'s reason and leaves nothing behind', () => {
    const dir = tempDir('della-cuda-');
    const recipe = recipeIn(dir);
    const missing = join(dir, 'no-such-dir', 'della_merge_cuda.so');
    const r = cli(['run', recipe, '--out', join(dir, 'new-parent', 'deeper', 'merged'), '--device', 'cuda'], { DELLA_CUDA_PLUGIN: missing });
    expect(r.code).toBe(1);
    const lines = r.stderr.trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^della-merge: --device cuda:0 is unavailable: the CUDA plugin could not be loaded: /);
    expect(lines[0]).toContain(missing);
    expect(lines[0]).toMatch(/No such file or directory \(DELLA_CUDA_PLUGIN names it; unset it to load the plugin beside the addon\)$/);
    expect(leftovers(dir)).toEqual([]); // no output, no temporary directory, not even the parent
    // An addon without a plugin beside it: how to get one where the prebuilt package has
    // none (e.g. linux-arm64 released without an arm64 CUDA toolkit).
    const lone = join(dir, 'lone');
    mkdirSync(lone);
    copyFileSync(nativeLocation().path!, join(lone, 'della_merge.node'));
    const env = { DELLA_NATIVE_PATH: join(lone, 'della_merge.node'), DELLA_CUDA_PLUGIN: '' };
    const none = cli(['run', recipe, '--out', join(dir, 'merged'), '--device', 'cuda'], env);
    expect(none.code).toBe(1);
    expect(none.stderr).toContain(join(lone, 'della_merge_cuda.so'));
    expect(none.stderr).toContain('DELLA_FORCE_BUILD=1 npm rebuild della-merge');
    expect(leftovers(dir)).toEqual(['lone']);
  });

  it.skipIf(gpu || !info.pluginExists)('run --device cuda without a driver or GPU fails with the runtime\'s reason and leaves nothing behind', () => {
    const dir = tempDir('della-cuda-');
    const recipe = recipeIn(dir);
    const r = cli(['run', recipe, '--out', join(dir, 'merged'), '--device', 'cuda:0', '--gpu-memory', '1GiB']);
    expect(r.code).toBe(1);
    const lines = r.stderr.trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^della-merge: --device cuda:0 is unavailable: /);
    expect(lines[0]).toContain(info.error!); // the CUDA runtime's own words, e.g. "CUDA driver version is insufficient"
    expect(info.error).toMatch(/\(cuda[A-Za-z]+\)/); // ...with the runtime's error name
    // Where the NVIDIA driver is not installed at all (this machine, CI), the message says
    // so rather than leaving "insufficient driver version" to be read as an old driver.
    if (!existsSync('/proc/driver/nvidia/version') && /cudaErrorInsufficientDriver/.test(info.error!)) expect(lines[0]).toMatch(/: no NVIDIA driver found \(the CUDA runtime could not load libcuda\.so\.1\): /);
    expect(leftovers(dir)).toEqual([]);
    const demo = cli(['demo', '--out', join(dir, 'demo'), '--device', 'cuda']);
    expect(demo.code).toBe(1);
    expect(leftovers(dir)).toEqual([]); // the demo checks the device before writing its models
  });

  it.skipIf(gpu)('merge({ device: "cuda" }) rejects with E_CUDA and writes nothing; CPU merges are unaffected', async () => {
    const dir = tempDir('della-cuda-');
    const recipe = recipeIn(dir);
    const err = await merge(recipe, { out: join(dir, 'merged'), device: 'cuda' }).catch((e) => e);
    expect(isDellaError(err)).toBe(true);
    expect(err.code).toBe('E_CUDA');
    expect(err.message).toMatch(/--device cuda:0 is unavailable: /);
    expect(leftovers(dir)).toEqual([]);
    const report = await merge(recipe, { out: join(dir, 'merged'), device: 'cpu' });
    expect(report.device).toBe('cpu');
    expect(readdirSync(join(dir, 'merged'))).toContain('model.safetensors');
  });

  it('doctor reports the plugin and why CUDA is (un)available', () => {
    const r = cli(['doctor', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const doc = JSON.parse(r.stdout);
    expect(doc.cuda.pluginPath).toBe(info.plugin);
    expect(doc.cuda.plugin).toBe(info.pluginExists ? info.plugin : null);
    expect(doc.cuda.available).toBe(gpu);
    if (!gpu) expect(doc.cuda.note).toContain(info.error!);
    const text = cli(['doctor']).stdout;
    expect(text).toMatch(/^cuda +plugin /m);
    const missing = cli(['doctor', '--json'], { DELLA_CUDA_PLUGIN: '/nonexistent/della_merge_cuda.so' });
    const m = JSON.parse(missing.stdout);
    expect(m.cuda.plugin).toBeNull();
    expect(m.cuda.available).toBe(false);
    expect(m.cuda.note).toMatch(/could not be loaded: \/nonexistent\/della_merge_cuda\.so: cannot open shared object file/);
  });

  it('doctor with a DELLA_NATIVE_PATH that does not load names the variable in its fix, not a rebuild', () => {
    const r = cli(['doctor'], { DELLA_NATIVE_PATH: '/nonexistent/della_merge.node' });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/^binary +\/nonexistent\/della_merge\.node \(explicit\) does not load: /m);
    expect(r.stdout).toMatch(/^cpu +\d+ cores \(Node\.js's count\); SIMD and kernels unknown \(the binary does not load\)$/m);
    expect(r.stdout).toMatch(/^fix +DELLA_NATIVE_PATH names \/nonexistent\/della_merge\.node, which does not load: point it at a built della_merge\.node, or unset it/m);
    expect(r.stdout).not.toMatch(/npm rebuild/);
  });

  it('doctor names the CPU kernel paths this machine selects', () => {
    const doc = JSON.parse(cli(['doctor', '--json']).stdout);
    const features: string[] = doc.cpu.features;
    expect(doc.cpu.kernels).toMatch(/row functions/);
    // The row functions' clone follows the CPU: AVX-512 where it has AVX-512BW, named
    // x86-64-v4 by GCC >= 12 builds and avx512f by GCC 10 and 11 (the release binary).
    // (Sanitizer and fixed-SIMD test builds have no clones and say so.)
    if (process.arch === 'x64' && !/no run-time dispatch/.test(doc.cpu.kernels)) {
      expect(doc.cpu.kernels).toMatch(features.includes('avx512bw') ? /x86-64-v4|avx512f/ : /x86-64-v3|avx2|baseline/);
    }
    expect(cli(['doctor']).stdout).toMatch(/^cpu .*; kernels: .*row functions/m);
  });

  it.skipIf(!gpu)('on a GPU: run --device cuda writes the same bytes as the CPU', () => {
    const dir = tempDir('della-cuda-');
    const recipe = recipeIn(dir);
    const a = cli(['run', recipe, '--out', join(dir, 'cpu'), '--quiet']);
    const b = cli(['run', recipe, '--out', join(dir, 'gpu'), '--quiet', '--device', 'cuda', '--gpu-memory', '1GiB']);
    expect(a.code, a.stderr).toBe(0);
    expect(b.code, b.stderr).toBe(0);
    for (const f of readdirSync(join(dir, 'cpu')).filter((x) => x.endsWith('.safetensors'))) {
      expect(readFileSync(join(dir, 'gpu', f)).equals(readFileSync(join(dir, 'cpu', f))), f).toBe(true);
    }
  });
});
