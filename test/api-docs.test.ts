/**
 * docs/api is what `npm run docs` makes of lib/index.ts now: regenerated into a temporary
 * directory with the script's own arguments and compared file by file.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join, relative, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { tempDir } from './helpers/models.js';

const root = resolve(import.meta.dirname, '..');

function files(dir: string): string[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => relative(dir, join(e.parentPath, e.name)))
    .sort();
}

describe('docs/api', () => {
  it('is up to date with lib/index.ts (after changing the API: npm run docs)', () => {
    const script = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).scripts.docs as string;
    const args = script.split(/\s+/);
    expect(args[0]).toBe('typedoc');
    const at = args.indexOf('--out');
    expect(args[at + 1]).toBe('docs/api');
    const out = tempDir('della-api-docs-');
    args[at + 1] = out;
    const r = spawnSync(process.execPath, [join(root, 'node_modules/typedoc/bin/typedoc'), ...args.slice(1)], { cwd: root, encoding: 'utf8' });
    expect(r.status, r.stdout + r.stderr).toBe(0);
    const committed = join(root, 'docs/api');
    expect(files(out)).toEqual(files(committed));
    for (const f of files(committed)) {
      expect(readFileSync(join(out, f), 'utf8'), `docs/api/${f} is stale: run npm run docs`).toBe(readFileSync(join(committed, f), 'utf8'));
    }
  }, 180_000);
});

describe('docs/SPEC.md', () => {
  // The contract lives beside the repository (../shared/SPEC.md) where the project is
  // developed; the copy in docs/ is what readers of the package and the README can open.
  const shared = resolve(root, '..', 'shared', 'SPEC.md');
  it.skipIf(!existsSync(shared))('is the project\'s contract, ../shared/SPEC.md, word for word', () => {
    expect(readFileSync(join(root, 'docs', 'SPEC.md'), 'utf8')).toBe(readFileSync(shared, 'utf8'));
  });
});
