// What every benchmark's JSON records about where and from what it ran, so a figure can
// be traced to a commit and a machine without relying on the folder it was copied into.
import { spawnSync } from 'node:child_process';
import { cpus } from 'node:os';

/** The commit of this checkout ("+dirty" when tracked files differ), or null outside git. */
function commit() {
  const cwd = new URL('../..', import.meta.url).pathname;
  const head = spawnSync('git', ['rev-parse', '--short', 'HEAD'], { cwd, encoding: 'utf8' });
  if (head.status !== 0) return null;
  const dirty = spawnSync('git', ['diff', '--quiet', 'HEAD', '--'], { cwd }).status === 1;
  return head.stdout.trim() + (dirty ? '+dirty' : '');
}

/** date, cpu, cores and commit, for the start of a result object. */
export function provenance() {
  return { date: new Date().toISOString(), cpu: cpus()[0]?.model, cores: cpus().length, commit: commit() };
}
