/**
 * bench/peer/run.js is part of `npm run bench` but only a measuring aid: without a
 * Python that imports torch it must print one "skipped" line and succeed, before it
 * loads anything else. The interpreter is forced to a missing one, so this passes
 * whether or not torch is installed here.
 */
import { spawnSync } from 'node:child_process';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const script = join(resolve(import.meta.dirname, '..'), 'bench/peer/run.js');

function run(args: string[], env: NodeJS.ProcessEnv) {
  const r = spawnSync(process.execPath, [script, ...args], { encoding: 'utf8', env: { ...process.env, ...env }, timeout: 30_000 });
  return { code: r.status, stdout: r.stdout, out: r.stdout + r.stderr };
}

describe('bench/peer/run.js', () => {
  it('skips with one line and exit 0 when the peer interpreter is missing ($DELLA_PEER_PYTHON)', () => {
    const r = run(['--rows', '8', '--cols', '8'], { DELLA_PEER_PYTHON: '/nonexistent/python3' });
    expect(r.code, r.out).toBe(0);
    expect(r.stdout).toBe('bench/peer skipped: no Python with torch (tried /nonexistent/python3); on Debian: apt-get install python3-torch\n');
  });

  it('--python names the interpreter, over $DELLA_PEER_PYTHON', () => {
    const r = run(['--python', '/nonexistent/python-a'], { DELLA_PEER_PYTHON: '/nonexistent/python-b' });
    expect(r.code, r.out).toBe(0);
    expect(r.stdout).toMatch(/^bench\/peer skipped: .*\(tried \/nonexistent\/python-a\)/);
  });
});
