// Runs once before any test file (vitest globalSetup). The tests run lib/ through vitest,
// but two things they start run the compiled dist/: the CLI tests spawn bin/della-merge.js,
// and verify's worker threads load dist/validate/verify-worker.js. `npm test` compiles
// first; a hand-run `npx vitest` after editing lib/ would pair new code with old, so
// dist/ is rebuilt here when any lib/ source is newer than what was built from it.
import { execFileSync } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));

function newestIn(dir: string): number {
  let newest = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    newest = Math.max(newest, e.isDirectory() ? newestIn(p) : statSync(p).mtimeMs);
  }
  return newest;
}

function mtime(rel: string): number {
  try {
    return statSync(join(root, rel)).mtimeMs;
  } catch {
    return -1;
  }
}

export default function setup(): void {
  // What the spawned code loads; tsc rewrites every output, so one stale file means all.
  const built = Math.min(mtime('dist/cli.js'), mtime('dist/validate/verify-worker.js'));
  const source = newestIn(join(root, 'lib'));
  if (built >= source) return;
  console.log(built < 0 ? 'global-setup: dist/ is missing; building it (tsc, bundle)'
    : 'global-setup: lib/ is newer than dist/; rebuilding dist/ (tsc, bundle) so the CLI and verify workers run the code under test');
  const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
  execFileSync(process.execPath, [tsc, '-p', 'tsconfig.json'], { cwd: root, stdio: 'inherit' });
  execFileSync(process.execPath, ['scripts/bundle-cli.mjs'], { cwd: root, stdio: 'inherit' });
}
