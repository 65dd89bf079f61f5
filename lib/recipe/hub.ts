/**
 * Hugging Face hub ids ("org/name", "org/name@revision") resolved from the local
 * Hugging Face cache, never the network: models--org--name/snapshots/<commit>, with
 * the commit read from refs/<revision> (default "main") or given directly.
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';

export const HUB_ID = /^([A-Za-z0-9][\w.-]*)\/([\w.-]+)(?:@([\w./-]+))?$/;

/** The cache directories searched, in order (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub). */
export function hubCacheDirs(env: NodeJS.ProcessEnv = process.env): string[] {
  const dirs: string[] = [];
  if (env.HF_HUB_CACHE) dirs.push(env.HF_HUB_CACHE);
  if (env.HUGGINGFACE_HUB_CACHE) dirs.push(env.HUGGINGFACE_HUB_CACHE);
  if (env.HF_HOME) dirs.push(join(env.HF_HOME, 'hub'));
  dirs.push(join(env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'huggingface', 'hub'));
  return [...new Set(dirs)];
}

export type HubLookup = { path: string } | { looked: string[] };

/** Finds a cached snapshot of a hub id; otherwise lists every place looked at. */
export function resolveHubId(id: string, env: NodeJS.ProcessEnv = process.env): HubLookup | null {
  const m = HUB_ID.exec(id);
  if (!m) return null;
  const [, org, name, revision = 'main'] = m;
  // A revision (or a ref's commit) names a path below the repository's refs/ and
  // snapshots/: "." and ".." segments would lead out of the cache.
  const inside = (s: string) => s.split('/').every((p) => p !== '' && p !== '.' && p !== '..');
  if (!inside(revision)) return null;
  const looked: string[] = [];
  for (const cache of hubCacheDirs(env)) {
    const repo = join(cache, `models--${org}--${name}`);
    let commit = revision;
    const ref = join(repo, 'refs', revision);
    if (existsSync(ref) && statSync(ref).isFile()) commit = readFileSync(ref, 'utf8').trim();
    if (!inside(commit)) {
      looked.push(`${ref} (its commit "${commit}" leads out of the cache)`);
      continue;
    }
    const snapshot = join(repo, 'snapshots', commit);
    if (existsSync(snapshot) && statSync(snapshot).isDirectory()) return { path: snapshot };
    looked.push(snapshot);
  }
  return { looked };
}
