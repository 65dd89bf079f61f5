/**
 * The GPU check's helper scripts, which run without a GPU: the end-to-end model
 * generator (seeded: the same arguments give the same bytes, so GPU runs on different
 * days merge the same models) and the Nsight Systems trace summary.
 */
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { tempDir } from './helpers/models.js';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');

function node(args: string[]) {
  return spawnSync(process.execPath, args, { cwd: root, encoding: 'utf8' });
}

describe('scripts/gpu-e2e-models.mjs', () => {
  it('writes the same four models for the same arguments, with recipes that merge them', () => {
    const dims = ['--hidden', '64', '--layers', '2', '--inter', '128', '--vocab', '256'];
    const a = tempDir('della-gen-'), b = tempDir('della-gen-');
    for (const dir of [a, b]) {
      const r = node(['scripts/gpu-e2e-models.mjs', dir, ...dims]);
      expect(r.status, r.stderr).toBe(0);
      const info = JSON.parse(r.stdout);
      expect(info.parameters).toBe(2 * 256 * 64 + 2 * (64 * 64 * 2 + 16 * 64 * 2 + 3 * 128 * 64 + 2 * 64) + 64);
      expect(info.recipes).toEqual(['della', 'dare_ties', 'ties', 'breadcrumbs_l2']);
    }
    for (const m of ['base', 'expert0', 'expert1', 'expert2']) {
      const files = readdirSync(join(a, m)).filter((f) => f.endsWith('.safetensors'));
      expect(files.length).toBeGreaterThan(0);
      for (const f of files) expect(readFileSync(join(a, m, f)).equals(readFileSync(join(b, m, f))), `${m}/${f}`).toBe(true);
    }
    // The experts differ from the base (and from each other) in low mantissa bits only.
    const base = readFileSync(join(a, 'base', 'model.safetensors'));
    const e0 = readFileSync(join(a, 'expert0', 'model.safetensors'));
    const e1 = readFileSync(join(a, 'expert1', 'model.safetensors'));
    expect(e0.equals(base)).toBe(false);
    expect(e0.equals(e1)).toBe(false);
    const out = join(a, 'merged');
    const run = node(['bin/della-merge.js', 'run', join(a, 'della.json'), '--out', out, '--quiet']);
    expect(run.status, run.stderr).toBe(0);
  }, 60_000);
});

describe('scripts/gpu-nsys-gaps.mjs', () => {
  it('sums what ran on the GPU and finds the idle gaps in a cuda_gpu_trace CSV', () => {
    const dir = tempDir('della-nsys-');
    const csv = join(dir, 'trace.csv');
    // Kernel names hold commas inside quotes, as nsys writes them.
    writeFileSync(csv, [
      '"Start (ns)","Duration (ns)","CorrId","GrdX","Strm","Name"',
      '1000000,500000,1,,13,"[CUDA memcpy Host-to-Device]"',
      '1200000,600000,2,64,14,"magprune_half_kernel<(unsigned short)1, 256, 16>(della::cuda::SlabParams, int)"',
      '2000000,300000,3,,13,"[CUDA memcpy Device-to-Host]"',
      '3000000,1000000,4,128,15,"fuse_fixed_kernel<3, (della::Consensus)1>(della::cuda::SlabParams)"',
      '',
    ].join('\n'));
    const r = node(['scripts/gpu-nsys-gaps.mjs', csv]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('4 operations over 3.0 ms; something running 70.0% (2.1 ms), uploads 16.7%, kernels 53.3%, downloads 10.0%; idle 0.9000 ms in 2 gaps');
    expect(r.stdout).toContain('longest gaps: 0.7000 ms at +1.3 ms, 0.2000 ms at +0.8000 ms');
    writeFileSync(csv, 'not,a,trace\n1,2,3\n');
    const bad = node(['scripts/gpu-nsys-gaps.mjs', csv]);
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/no header with Start, Duration and Name columns/);
  });
});
