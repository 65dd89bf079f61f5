import { existsSync, mkdirSync, readFileSync, realpathSync, rmdirSync, statSync } from 'node:fs';
import { dirname, resolve, sep } from 'node:path';

/** The path itself if it exists, else its nearest existing ancestor (a path under a
 * file stops at that file, whose child existsSync reports missing). */
export function nearestExisting(path: string): string {
  let d = resolve(path);
  while (!existsSync(d) && dirname(d) !== d) d = dirname(d);
  return d;
}

/**
 * mkdir -p, one level at a time: Node 20's mkdirSync(path, { recursive: true }) loops
 * forever on a path under /proc (procfs answers ENOENT for every level), where this
 * fails at once. Returns the outermost directory it made, as mkdirSync's recursive form;
 * like it, throws EEXIST when `dir` is an existing file.
 */
export function makeDirs(dir: string): string | undefined {
  const missing: string[] = [];
  for (let d = resolve(dir); !existsSync(d); d = dirname(d)) {
    missing.push(d);
    if (dirname(d) === d) break;
  }
  if (missing.length === 0 && !statSync(dir).isDirectory()) mkdirSync(dir); // mkdir's own EEXIST
  missing.reverse();
  for (const d of missing) {
    try {
      mkdirSync(d);
    } catch (e) {
      // made meanwhile by another process: fine if it is a directory
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST' || !statSync(d).isDirectory()) throw e;
    }
  }
  return missing[0];
}

/** Removes `dir` and its parents up to `outermost` (what makeDirs made), while they
 * are empty: undoing makeDirs after a failure. Both are absolute paths. */
export function removeEmptyDirs(dir: string, outermost: string): void {
  for (let d = dir; d === outermost || d.startsWith(`${outermost}/`); d = dirname(d)) {
    try {
      rmdirSync(d);
    } catch {
      return; // not empty (something else was put there), or gone already
    }
    if (d === outermost) return;
  }
}

/** Whether `path` is `dir` or lies inside it, through symbolic links too (either may
 * not exist yet: its nearest existing ancestor's real path is taken). */
export function isWithin(path: string, dir: string): boolean {
  const real = (p: string) => {
    const near = nearestExisting(p);
    return realpathSync(near) + resolve(p).slice(near.length);
  };
  const p = real(path), d = real(dir);
  return p === d || p.startsWith(d.endsWith(sep) ? d : d + sep); // '/' holds everything
}

/** readFileSync of a file the merge wrote, refusing anything else put in its place: a
 * FIFO would block forever, a device never end. */
export function readRegularFile(path: string): string {
  if (!statSync(path).isFile()) throw Object.assign(new Error('not a regular file'), { code: 'EFTYPE' });
  return readFileSync(path, 'utf8');
}
