/** Every recipe and script in examples/ runs as written, against the demo's models. */
import { spawnSync } from 'node:child_process';
import { cpSync, readdirSync, readFileSync } from 'node:fs';
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

  it('merge-api.mjs runs', () => {
    const r = run([join(root, 'examples/merge-api.mjs')], cwd);
    expect(r.code, r.out).toBe(0);
    expect(r.out).toMatch(/della: \d+ tensors merged/);
    expect(r.out).toMatch(/BF16 \[256,688\] first bits 0x[0-9a-f]+/);
  });
});
