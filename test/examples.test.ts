/** Every recipe and script in examples/ runs as written, against the demo's models. */
import { spawnSync } from 'node:child_process';
import { cpSync, mkdirSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { tempDir } from './helpers/models.js';

const root = resolve(import.meta.dirname, '..');
const bin = join(root, 'bin/della-merge.js');

function run(args: string[], cwd: string) {
  const r = spawnSync(process.execPath, args, { cwd, encoding: 'utf8' });
  return { code: r.status, out: r.stdout + r.stderr };
}

describe('examples/', () => {
  const cwd = tempDir('della-examples-');
  cpSync(join(root, 'examples'), join(cwd, 'examples'), { recursive: true });

  it('the demo makes the models the examples use', () => {
    const r = run([bin, 'demo', '--out', 'demo'], cwd);
    expect(r.code, r.out).toBe(0);
  });

  const recipes = readdirSync(join(root, 'examples')).filter((f) => /\.(ya?ml|json)$/.test(f));
  for (const recipe of recipes) {
    it(`${recipe} merges`, () => {
      const r = run([bin, 'run', join('examples', recipe), '--out', `merged-${recipe}`], cwd);
      expect(r.code, r.out).toBe(0);
      expect(r.out).toMatch(/merged +\w+: \d+ tensors merged/);
    });
  }

  it('merge-in-memory.mjs runs', () => {
    const r = run([join(root, 'examples/merge-in-memory.mjs')], cwd);
    expect(r.code, r.out).toBe(0);
    expect(r.out).toMatch(/model\.layers\.0\.mlp\.up_proj\.weight F32 \[64,256\]: kept \d+%, \d+% of each delta/);
  });

  it('custom-progress.mjs runs', () => {
    const r = run([join(root, 'examples/custom-progress.mjs')], cwd);
    expect(r.code, r.out).toBe(0);
    expect(r.out).toMatch(/100%  40\/40 tensors/);
    expect(r.out).toMatch(/done: 39 merged, 1 copied/);
  });

  it('the README shows the examples exactly as they are in examples/', () => {
    const readme = readFileSync(join(root, 'README.md'), 'utf8');
    const shown = [...readme.matchAll(/<!-- example: (\S+) -->\n```\w*\n([\s\S]*?)\n```/g)];
    expect(shown.length).toBeGreaterThanOrEqual(3);
    for (const [, file, body] of shown) expect(body, file).toBe(readFileSync(join(root, file), 'utf8').trimEnd());
  });

  // The job files as a runner would run them, with `npx della-merge` this checkout's CLI.
  describe('jobs/', () => {
    const shim = join(cwd, 'shim');
    mkdirSync(shim, { recursive: true });
    writeFileSync(join(shim, 'npx'), `#!/bin/sh\n[ "$1" = --yes ] && shift\nshift\nexec "${process.execPath}" "${bin}" "$@"\n`, { mode: 0o755 });
    const env = { ...process.env, PATH: `${shim}:${process.env.PATH}` };
    const sh = (script: string, extra: Record<string, string>, dir: string) => {
      const r = spawnSync('bash', ['-c', script], { cwd: dir, encoding: 'utf8', env: { ...env, ...extra } });
      return { code: r.status, out: r.stdout + r.stderr };
    };
    const recipe = () => join(cwd, 'examples', 'della.yaml');

    it('slurm-array.sh: the array tasks, then the assemble and verify of its comment', () => {
      const dir = join(cwd, 'slurm');
      mkdirSync(dir);
      symlinkSync(join(cwd, 'demo'), join(dir, 'demo')); // the recipe's model paths
      for (let i = 1; i <= 3; i++) {
        const r = sh(`bash ${join(root, 'examples/jobs/slurm-array.sh')} ${recipe()}`, { SLURM_ARRAY_TASK_COUNT: '3', SLURM_ARRAY_TASK_ID: String(i), SLURM_CPUS_PER_TASK: '1' }, dir);
        expect(r.code, r.out).toBe(0);
      }
      const text = readFileSync(join(root, 'examples/jobs/slurm-array.sh'), 'utf8');
      const after = /--wrap "(.*)"/.exec(text)![1].replaceAll('recipe.yaml', recipe());
      const r = sh(after, {}, dir);
      expect(r.code, r.out).toBe(0);
      expect(r.out).toMatch(/verified \d+ tensors/);
    });

    it('k8s-indexed-job.yaml: the 8 indexed pods, then the assemble job', () => {
      const dir = join(cwd, 'k8s');
      mkdirSync(dir);
      symlinkSync(join(cwd, 'demo'), join(dir, 'demo'));
      cpSync(recipe(), join(dir, 'recipe.yaml'));
      const text = readFileSync(join(root, 'examples/jobs/k8s-indexed-job.yaml'), 'utf8');
      const pod = /- >-\n\s+(i=.*;)\n\s+(npx .*)\n/.exec(text)!;
      for (let index = 0; index < 8; index++) {
        const r = sh(`${pod[1]} ${pod[2]}`, { JOB_COMPLETION_INDEX: String(index) }, dir);
        expect(r.code, r.out).toBe(0);
      }
      const assemble = /command: \["bash", "-c", "(npx --yes della-merge assemble .*)"\]/.exec(text)![1];
      const r = sh(assemble, {}, dir);
      expect(r.code, r.out).toBe(0);
      expect(r.out).toMatch(/verified \d+ tensors/);
    });
  });

  it('merge-api.mjs runs', () => {
    const r = run([join(root, 'examples/merge-api.mjs')], cwd);
    expect(r.code, r.out).toBe(0);
    expect(r.out).toMatch(/della: \d+ tensors merged/);
    expect(r.out).toMatch(/BF16 \[256,688\] first bits 0x[0-9a-f]+/);
  });
});
