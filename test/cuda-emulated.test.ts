/**
 * `della-merge run --device cuda` end to end on the emulated CUDA device: the CUDA
 * plugin's kernels and pipeline compiled as plain C++ and run on the CPU
 * (native/test/cuda_emu), loaded through DELLA_CUDA_PLUGIN exactly as the real plugin
 * is. The outputs and the run records' digests must equal the CPU's, byte for byte;
 * the device's errors (no GPU, a budget larger than its memory, a row larger than the
 * budget) must be one clear message with nothing left behind. `npm run test:native` builds the emulated plugin
 * (build-ctest/della_merge_cuda_emu.so); without it these tests are skipped.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { saveModel } from '../lib/index.js';
import { makeModels, tempDir, writeRecipe } from './helpers/models.js';
import { rng, testSeed } from './helpers/random.js';

const root = resolve(import.meta.dirname, '..');
const seed = testSeed();
const plugin = process.env.DELLA_CUDA_EMU_PLUGIN ?? join(root, 'build-ctest', 'della_merge_cuda_emu.so');
const havePlugin = existsSync(plugin);

function cli(args: string[], env: NodeJS.ProcessEnv = {}) {
  const r = spawnSync(process.execPath, [join(root, 'bin/della-merge.js'), ...args], {
    cwd: root, encoding: 'utf8', env: { ...process.env, NO_COLOR: '1', DELLA_CUDA_PLUGIN: plugin, ...env },
  });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

// Rows that take the 16-bit fast kernels (multiples of 8, up to 4096 and past it) and rows
// that take the generic ones, in BF16.
const shapes: Array<[string, number[]]> = [
  ['model.embed_tokens.weight', [24, 512]],
  ['model.layers.0.self_attn.q_proj.weight', [16, 4096]],
  ['model.layers.0.mlp.down_proj.weight', [3, 5000]],
  ['model.layers.0.mlp.up_proj.weight', [40, 72]],
  ['model.layers.0.input_layernorm.weight', [512]],
  ['model.layers.0.mlp.gate.bias', [7, 1]],
  ['lm_head.weight', [9, 30]],
];

const recipes: Record<string, (experts: Array<{ model: string; weight: number }>) => unknown> = {
  della: (e) => ({ merge_method: 'della', models: e.map((m) => ({ model: m.model, parameters: { weight: m.weight, density: 0.4, epsilon: 0.15 } })) }),
  dare_ties: (e) => ({ merge_method: 'dare_ties', models: e.map((m) => ({ model: m.model, parameters: { weight: m.weight, density: 0.5 } })) }),
  ties: (e) => ({ merge_method: 'ties', models: e.map((m) => ({ model: m.model, parameters: { weight: m.weight, density: 0.3 } })) }),
  breadcrumbs_l2: (e) => ({ merge_method: 'breadcrumbs', models: e.map((m) => ({ model: m.model, parameters: { weight: m.weight, density: 0.6, gamma: 0.01 } })), parameters: { rescale: 'l2' } }),
  task_arithmetic: (e) => ({ merge_method: 'task_arithmetic', models: e.map((m) => ({ model: m.model, parameters: { weight: m.weight } })) }),
};

function digests(dir: string): unknown {
  return JSON.parse(readFileSync(join(dir, 'della_merge_run.json'), 'utf8')).xxh64;
}

describe.skipIf(!havePlugin)(`--device cuda on the emulated device (DELLA_TEST_SEED=${seed})`, () => {
  it('doctor finds the emulated device through DELLA_CUDA_PLUGIN', () => {
    const doc = JSON.parse(cli(['doctor', '--json']).stdout);
    expect(doc.cuda.plugin).toBe(plugin);
    expect(doc.cuda.available).toBe(true);
    expect(JSON.stringify(doc.cuda)).toMatch(/emulated CUDA device/);
    expect(doc.cuda.device).toMatchObject({ runtime: '13.0', driverCuda: '13.0' });
    // The versions are in the text, for bug reports; a newer driver is fine.
    expect(cli(['doctor'], { DELLA_CUDA_EMU_DRIVER: '13020' }).stdout).toMatch(/^cuda .*; CUDA runtime 13\.0, driver for CUDA 13\.2$/m);
  });

  it('della, dare_ties, ties, breadcrumbs and task arithmetic give the CPU\'s bytes and digests', () => {
    const dir = tempDir('della-cuda-emu-');
    const models = makeModels(rng(seed), dir, { dtype: 'BF16', experts: 3, shapes });
    const experts = models.experts.map((m, k) => ({ model: m, weight: 1 - 0.25 * k }));
    for (const [name, make] of Object.entries(recipes)) {
      const recipe = writeRecipe(join(dir, `${name}.yaml`), { ...(make(experts) as object), base_model: models.base, dtype: 'bfloat16', seed: 11 });
      const cpu = cli(['run', recipe, '--out', join(dir, `cpu-${name}`), '--quiet']);
      expect(cpu.code, cpu.stderr).toBe(0);
      // Small slabs and two streams: tensors span several slabs, as large models do.
      const gpu = cli(['run', recipe, '--out', join(dir, `gpu-${name}`), '--quiet', '--device', 'cuda', '--gpu-memory', '64MiB']);
      expect(gpu.code, `${name}: ${gpu.stderr}`).toBe(0);
      const files = readdirSync(join(dir, `cpu-${name}`)).filter((f) => f.endsWith('.safetensors'));
      expect(files.length).toBeGreaterThan(0);
      for (const f of files) {
        expect(readFileSync(join(dir, `gpu-${name}`, f)).equals(readFileSync(join(dir, `cpu-${name}`, f))), `${name}: ${f}`).toBe(true);
      }
      expect(digests(join(dir, `gpu-${name}`)), name).toEqual(digests(join(dir, `cpu-${name}`)));
      // The inputs copied to the device straight from their read-only maps, registered
      // with CUDA (DELLA_CUDA_INPUTS=register), not through the staging buffers.
      const direct = cli(['run', recipe, '--out', join(dir, `direct-${name}`), '--quiet', '--device', 'cuda', '--gpu-memory', '64MiB'],
        { DELLA_CUDA_INPUTS: 'register', DELLA_CUDA_PROFILE: '1' });
      expect(direct.code, `${name}: ${direct.stderr}`).toBe(0);
      const copied = [...direct.stderr.matchAll(/copied from there ([0-9.]+) MB/g)].reduce((a, m) => a + Number(m[1]), 0);
      expect(copied, `${name}: ${direct.stderr}`).toBeGreaterThan(0);
      expect(direct.stderr).not.toMatch(/refused/);
      expect(digests(join(dir, `direct-${name}`)), name).toEqual(digests(join(dir, `cpu-${name}`)));
    }
  }, 120_000);

  it('the device opens on a worker thread (cudaOpenAsync) while the run sets up, and its errors keep their code', () => {
    // The emulated context takes 400 ms to create, as a real one takes about 300: the JS
    // thread's timers must keep running meanwhile.
    const script = `
      import { loadNative } from ${JSON.stringify(join(root, 'dist', 'native.js'))};
      const native = loadNative();
      let ticks = 0;
      const timer = setInterval(() => ticks++, 10);
      const t0 = performance.now();
      const result = await native.cudaOpenAsync({ device: 0, memory: 0 }).then((d) => d.name, (e) => 'failed: ' + e.cudaCode + ': ' + e.message);
      clearInterval(timer);
      console.log(JSON.stringify({ ms: performance.now() - t0, ticks, result }));`;
    const probe = (env: NodeJS.ProcessEnv) => {
      const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], {
        cwd: root, encoding: 'utf8', env: { ...process.env, DELLA_CUDA_PLUGIN: plugin, ...env },
      });
      expect(r.status, r.stderr).toBe(0);
      return JSON.parse(r.stdout) as { ms: number; ticks: number; result: string };
    };
    const slow = probe({ DELLA_CUDA_EMU_OPEN_MS: '400' });
    expect(slow.result).toMatch(/emulated CUDA device/);
    expect(slow.ms).toBeGreaterThanOrEqual(390);
    expect(slow.ticks).toBeGreaterThanOrEqual(5); // a blocking open lets none run
    const none = probe({ DELLA_CUDA_EMU_DEVICES: '0' });
    expect(none.result).toMatch(/^failed: E_NO_DEVICE: .*no CUDA-capable device/);

    // A whole run: its report counts the wait for the device (the part that its setup,
    // a few milliseconds here, did not cover) and the output equals the CPU's.
    const dir = tempDir('della-cuda-emu-');
    const models = makeModels(rng(seed + 3), dir, { dtype: 'BF16', experts: 2, layers: 1 });
    const recipe = writeRecipe(join(dir, 'recipe.yaml'), {
      ...(recipes.della(models.experts.map((m) => ({ model: m, weight: 0.5 }))) as object), base_model: models.base, dtype: 'bfloat16',
    });
    const run = cli(['run', recipe, '--out', join(dir, 'gpu'), '--device', 'cuda', '--quiet', '--report', join(dir, 'r.json')],
      { DELLA_CUDA_EMU_OPEN_MS: '400' });
    expect(run.code, run.stderr).toBe(0);
    const { phases } = JSON.parse(readFileSync(join(dir, 'r.json'), 'utf8'));
    expect(phases.setup + phases.device).toBeGreaterThanOrEqual(0.39);
    const cpu = cli(['run', recipe, '--out', join(dir, 'cpu'), '--quiet']);
    expect(cpu.code, cpu.stderr).toBe(0);
    expect(digests(join(dir, 'gpu'))).toEqual(digests(join(dir, 'cpu')));
  }, 60_000);

  it('a device without a GPU, or a budget past its memory, is one clear error and leaves nothing behind', () => {
    const dir = tempDir('della-cuda-emu-');
    const models = makeModels(rng(seed + 1), dir, { dtype: 'BF16', experts: 2, layers: 1 });
    const recipe = writeRecipe(join(dir, 'recipe.yaml'), {
      ...(recipes.della(models.experts.map((m) => ({ model: m, weight: 0.5 }))) as object), base_model: models.base, dtype: 'bfloat16',
    });
    const before = readdirSync(dir).sort();

    const none = cli(['run', recipe, '--out', join(dir, 'a'), '--device', 'cuda'], { DELLA_CUDA_EMU_DEVICES: '0' });
    expect(none.code).toBe(1);
    expect(none.stderr.trim().split('\n')).toHaveLength(1);
    expect(none.stderr).toMatch(/^della-merge: --device cuda:0 is unavailable: .*no CUDA-capable device.*\(cudaErrorNoDevice\)/);
    // The emulated driver "loads"; without the kernel's device nodes (this machine, CI),
    // the message says what is missing and the usual causes.
    if (!existsSync('/dev/nvidiactl') && !existsSync('/dev/dxg')) {
      expect(none.stderr).toMatch(/unavailable: the NVIDIA driver's library is installed but this process sees no GPU device \(no \/dev\/nvidiactl: the NVIDIA kernel module is not loaded, or a container was started without its GPUs, e\.g\. docker run --gpus all\): /);
    }

    // No driver, and a driver older than the plugin's runtime: the runtime says the same
    // for both; the message tells them apart and says what to install.
    const noDriver = cli(['run', recipe, '--out', join(dir, 'a'), '--device', 'cuda'], { DELLA_CUDA_EMU_DRIVER: 'none' });
    expect(noDriver.code).toBe(1);
    expect(noDriver.stderr.trim().split('\n')).toHaveLength(1);
    expect(noDriver.stderr).toMatch(/^della-merge: --device cuda:0 is unavailable: no NVIDIA driver found \(the CUDA runtime could not load libcuda\.so\.1\): .*\(cudaErrorInsufficientDriver\)\n$/);
    const oldDriver = cli(['run', recipe, '--out', join(dir, 'a'), '--device', 'cuda:0'], { DELLA_CUDA_EMU_DRIVER: '12040' });
    expect(oldDriver.code).toBe(1);
    expect(oldDriver.stderr.trim().split('\n')).toHaveLength(1);
    expect(oldDriver.stderr).toMatch(/^della-merge: --device cuda:0 is unavailable: the NVIDIA driver supports CUDA 12\.4 and this plugin needs CUDA 13\.0 or newer \(Linux driver 580\.65\.06 or newer\): update the driver, or build the plugin with a CUDA toolkit the driver supports: .*\(cudaErrorInsufficientDriver\)\n$/);

    const big = cli(['run', recipe, '--out', join(dir, 'b'), '--device', 'cuda', '--gpu-memory', '2GiB'], { DELLA_CUDA_EMU_MEMORY: String(1 << 30) });
    expect(big.code).toBe(1);
    expect(big.stderr.trim().split('\n')).toHaveLength(1);
    expect(big.stderr).toMatch(/GPU memory budget \(--gpu-memory\) of 2\.00 GiB is more than the 1\.00 GiB free on cuda:0/);

    const small = cli(['run', recipe, '--out', join(dir, 'c'), '--device', 'cuda', '--gpu-memory', '8MiB']);
    expect(small.code).toBe(1);
    expect(small.stderr).toMatch(/is too small: give at least 16\.0 MiB per stream/);

    expect(readdirSync(dir).sort()).toEqual(before);
  }, 60_000);

  it('an input cut short as the plugin stages it stops the merge with a message, not SIGBUS, and leaves nothing behind', () => {
    // DELLA_CUDA_EMU_CUT truncates the expert just before the first slab is staged: the
    // plugin's host threads read past the cut (zeros, through the addon's SIGBUS guard)
    // and the check after the batch abandons the merge.
    const dir = tempDir('della-cuda-emu-');
    const models = makeModels(rng(seed + 4), dir, { dtype: 'BF16', experts: 1, shapes: [['model.a.weight', [256, 1024]]] });
    const recipe = writeRecipe(join(dir, 'recipe.yaml'), {
      ...(recipes.della(models.experts.map((m) => ({ model: m, weight: 0.5 }))) as object), base_model: models.base, dtype: 'bfloat16',
    });
    const victim = join(models.experts[0], 'model.safetensors');
    const bytes = readFileSync(victim);
    const before = readdirSync(dir).sort();
    // Staged through pinned memory (the default), and copied from the registered maps.
    for (const inputs of ['staged', 'register']) {
      writeFileSync(victim, bytes);
      const r = cli(['run', recipe, '--out', join(dir, 'merged'), '--device', 'cuda'], { DELLA_CUDA_EMU_CUT: `${victim}:4096`, DELLA_CUDA_INPUTS: inputs });
      expect(r.code, `${inputs}: ${r.stderr}`).toBe(1);
      expect(r.stderr).toBe(`della-merge: ${victim} changed size while it was being read (${bytes.length} → 4096 bytes); the merge is abandoned (rerun it on stable inputs)\n`);
      expect(readdirSync(dir).sort()).toEqual(before);
    }
  }, 60_000);

  it('a tensor whose row does not fit the memory budget stops the merge with one clear error and leaves nothing behind', () => {
    const dir = tempDir('della-cuda-emu-');
    // One small matrix, then a 1-D tensor of 4 M elements: one "row", which needs more
    // device memory at K = 3 than the 16 MiB each of three streams gets of 48 MiB.
    const models = makeModels(rng(seed + 2), dir, {
      dtype: 'BF16', experts: 3, shapes: [['model.a.weight', [16, 512]], ['model.z.weight', [4_000_000]]],
    });
    const recipe = writeRecipe(join(dir, 'recipe.yaml'), {
      ...(recipes.della(models.experts.map((m) => ({ model: m, weight: 0.5 }))) as object), base_model: models.base, dtype: 'bfloat16',
    });
    const before = readdirSync(dir).sort();
    const r = cli(['run', recipe, '--out', join(dir, 'merged'), '--device', 'cuda', '--gpu-memory', '48MiB']);
    expect(r.code).toBe(1);
    const lines = r.stderr.trim().split('\n');
    expect(lines, r.stderr).toHaveLength(1);
    expect(lines[0]).toMatch(/^della-merge: .*a tensor of shape \[4000000\] needs [0-9.]+ MiB of device memory for one row, more than the 16\.0 MiB per stream that the device memory budget allows: raise --gpu-memory/);
    expect(readdirSync(dir).sort()).toEqual(before); // no output, no temporary directory
    const ok = cli(['run', recipe, '--out', join(dir, 'merged'), '--device', 'cuda', '--gpu-memory', '512MiB', '--quiet']);
    expect(ok.code, ok.stderr).toBe(0);
    const cpu = cli(['run', recipe, '--out', join(dir, 'cpu'), '--quiet']);
    expect(cpu.code, cpu.stderr).toBe(0);
    expect(digests(join(dir, 'merged'))).toEqual(digests(join(dir, 'cpu')));
  }, 120_000);

  it('results that overflow float16 are refused as on the CPU (out_check_kernel), and with --allow-nonfinite written alike', () => {
    const dir = tempDir('della-cuda-emu-');
    // Bases near 60000 and experts 4000 above, weighted 2: some results pass 65504.
    const n = 16 * 512;
    const base = new Uint16Array(n).fill(0x7b53); // 60000
    const expert = new Uint16Array(n).map((_, i) => (i % 3 === 0 ? 0x7bd0 : 0x7b53)); // 64000 or 60000
    saveModel(join(dir, 'base'), [{ name: 'model.a.weight', dtype: 'F16', shape: [16, 512], data: base }]);
    saveModel(join(dir, 'x'), [{ name: 'model.a.weight', dtype: 'F16', shape: [16, 512], data: expert }]);
    const recipe = writeRecipe(join(dir, 'recipe.yaml'), {
      merge_method: 'dare_ties', base_model: join(dir, 'base'), models: [{ model: join(dir, 'x'), parameters: { weight: 2, density: 0.5 } }],
    });
    const before = readdirSync(dir).sort();
    const counts: string[] = [];
    for (const device of ['cpu', 'cuda']) {
      const r = cli(['run', recipe, '--out', join(dir, `merged-${device}`), '--device', device]);
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr).toMatch(/tensor "model\.a\.weight": \d+ merged value\(s\) overflowed F16 \(beyond ±65504\)/);
      counts.push(r.stderr.match(/(\d+) merged value/)![1]);
      expect(readdirSync(dir).sort()).toEqual(before);
    }
    expect(counts[1]).toBe(counts[0]);
    for (const device of ['cpu', 'cuda']) {
      const r = cli(['run', recipe, '--out', join(dir, `merged-${device}`), '--device', device, '--allow-nonfinite', '--quiet']);
      expect(r.code, r.stderr).toBe(0);
    }
    expect(digests(join(dir, 'merged-cuda'))).toEqual(digests(join(dir, 'merged-cpu')));
  }, 120_000);
});
