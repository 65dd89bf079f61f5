/** A merge split into N parts and assembled is byte-identical to one run. */
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeModels, tempDir, writeRecipe } from './helpers/models.js';
import { rng, testSeed } from './helpers/random.js';

const root = resolve(import.meta.dirname, '..');
const seed = testSeed();

function cli(args: string[]) {
  const r = spawnSync(process.execPath, [join(root, 'bin/della-merge.js'), ...args], { encoding: 'utf8' });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

function files(dir: string): Map<string, string> {
  return new Map(readdirSync(dir).sort().map((f) => [f, readFileSync(join(dir, f)).toString('hex')]));
}

describe(`run --part i/N and assemble (DELLA_TEST_SEED=${seed})`, () => {
  for (const [method, N] of [['della', 3], ['ties', 2], ['slerp', 4]] as const) {
    it(`${method}: ${N} parts assembled equal one run, byte for byte`, () => {
      const dir = tempDir();
      const m = makeModels(rng(seed ^ N), dir, { dtype: 'BF16', experts: method === 'slerp' ? 1 : 3, layers: 4 });
      const params = method === 'slerp' ? {} : method === 'ties' ? { density: 0.4 } : { density: 0.5, epsilon: 0.1 };
      const recipe = writeRecipe(join(dir, 'r.yaml'), {
        merge_method: method, base_model: m.base, models: m.experts.map((model) => ({ model, parameters: params })),
        ...(method === 'slerp' ? { parameters: { t: [0.1, 0.9] } } : {}), seed: 11,
      });
      const one = cli(['run', recipe, '--out', join(dir, 'one'), '--shard-size', '1500', '-q']);
      expect(one.code, one.stderr).toBe(0);
      const parts: string[] = [];
      const counts: number[] = [];
      // parts in any order, each with its own thread count
      for (const i of Array.from({ length: N }, (_, k) => N - k)) {
        const p = join(dir, `part${i}`);
        const r = cli(['run', recipe, '--out', p, '--part', `${i}/${N}`, '--shard-size', '1500', '--threads', String(1 + (i % 2)), '--json']);
        expect(r.code, r.stderr).toBe(0);
        counts.push(JSON.parse(r.stdout).tensors.total);
        parts.push(p);
      }
      const total = JSON.parse(cli(['run', recipe, '--dry-run', '--json']).stdout).totals.tensors;
      expect(counts.reduce((a, b) => a + b, 0)).toBe(total);
      expect(Math.min(...counts)).toBeGreaterThan(0);
      const a = cli(['assemble', '--out', join(dir, 'assembled'), ...parts]);
      expect(a.code, a.stderr).toBe(0);
      expect(a.stdout).toMatch(new RegExp(`assembled ${N} parts: ${total} tensors`));
      expect(files(join(dir, 'assembled'))).toEqual(files(join(dir, 'one')));
      expect(cli(['verify', join(dir, 'assembled'), '--recipe', recipe]).code).toBe(0);
    });
  }

  it('refuses a missing part, a part given twice, parts of different merges, and a bad --part', () => {
    const dir = tempDir();
    const m = makeModels(rng(seed + 9), dir, { dtype: 'F16', experts: 2 });
    const recipe = (s: number) => writeRecipe(join(dir, `r${s}.yaml`), { merge_method: 'della', base_model: m.base, models: m.experts.map((model) => ({ model })), seed: s });
    const r1 = recipe(1), r2 = recipe(2);
    for (const i of [1, 2]) expect(cli(['run', r1, '--out', join(dir, `a${i}`), '--part', `${i}/2`, '-q']).code).toBe(0);
    expect(cli(['run', r2, '--out', join(dir, 'b2'), '--part', '2/2', '-q']).code).toBe(0);
    const missing = cli(['assemble', '--out', join(dir, 'x'), join(dir, 'a1')]);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toMatch(/parts 2\/2 are missing/);
    expect(cli(['assemble', '--out', join(dir, 'x'), join(dir, 'a1'), join(dir, 'a1')]).stderr).toMatch(/part 1\/2 is given twice/);
    expect(cli(['assemble', '--out', join(dir, 'x'), join(dir, 'a1'), join(dir, 'b2')]).stderr).toMatch(/belongs to a different merge/);
    // A part from a version that recorded SHA-256 digests cannot join one that records XXH64.
    const partFile = join(dir, 'a2', 'della_merge_part.json');
    const rec = JSON.parse(readFileSync(partFile, 'utf8'));
    writeFileSync(partFile, JSON.stringify({ ...rec, xxh64: undefined, sha256: rec.xxh64 }));
    expect(cli(['assemble', '--out', join(dir, 'x'), join(dir, 'a1'), join(dir, 'a2')]).stderr).toMatch(/a2 was made by a della-merge version that records sha256 digests, .*a1 by one that records xxh64/);
    writeFileSync(partFile, JSON.stringify({ ...rec, xxh64: undefined }));
    expect(cli(['assemble', '--out', join(dir, 'x'), join(dir, 'a1'), join(dir, 'a2')]).stderr).toMatch(/della_merge_part\.json records no tensor digests/);
    expect(cli(['run', r1, '--out', join(dir, 'y'), '--part', '3/2']).stderr).toMatch(/part 3\/2 is not valid/);
    expect(cli(['run', r1, '--out', join(dir, 'y'), '--part', 'half']).stderr).toMatch(/--part takes i\/N/);
    expect(readdirSync(dir).filter((f) => f === 'x' || f === 'y' || f.includes('della-tmp'))).toEqual([]);
  });
});
