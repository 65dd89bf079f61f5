/**
 * bench/tables.js prints RESULTS.md's tables from the benchmarks' JSON, so that no figure
 * is copied by hand. Its fresh-clone section gathers every end-to-end run kept under
 * fresh-clone-<commit>/ and counts the runs that met the CPU speed issue's targets.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

const script = join(resolve(import.meta.dirname, '..'), 'bench/tables.js');
const dir = mkdtempSync(join(tmpdir(), 'della-tables-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function row(date: string, method: string, mps: number, ratio: number, extra: Record<string, unknown> = {}) {
  return {
    date, cpu: 'test CPU', cores: 2, method, experts: 3, dtype: 'BF16', parametersPerModel: 1e9, inputBytes: 8e9,
    readOnceSeconds: 1.5, mergeSeconds: 1e3 / mps, ratioToReadOnce: ratio, mParamsPerSecond: mps,
    peakAnonBytes: 200 * 2 ** 20, threads: 2, ...extra,
  };
}

function run(d: Record<string, Record<string, unknown>>) {
  for (const [folder, files] of Object.entries(d)) {
    mkdirSync(join(dir, folder), { recursive: true });
    for (const [name, body] of Object.entries(files)) writeFileSync(join(dir, folder, name), JSON.stringify(body));
  }
  const r = spawnSync(process.execPath, [script, dir], { encoding: 'utf8', timeout: 30_000 });
  return { code: r.status, out: r.stdout + r.stderr };
}

describe('bench/tables.js', () => {
  it('tabulates the fresh-clone runs oldest first and counts the runs that met each target', () => {
    const r = run({
      'fresh-clone-aaaaaaa': {
        'e2e-1b-2.json': [row('2026-01-02T10:00:00Z', 'della', 250, 2.5), row('2026-01-02T10:00:10Z', 'task_arithmetic', 700, 2.4)],
        'not-e2e.json': { ignored: true },
      },
      'fresh-clone-bbbbbbb': {
        // The commit recorded in the JSON wins over the folder's name.
        'e2e-1b-1.json': [row('2026-01-01T09:00:00Z', 'della', 150.04, 1.2, { commit: 'ccccccc' }), row('2026-01-01T09:00:10Z', 'ties', 320, 1.1)],
      },
      'other-folder': { 'e2e-1b.json': [row('2026-01-03T00:00:00Z', 'della', 999, 1)] },
    });
    expect(r.code, r.out).toBe(0);
    const lines = r.out.split('\n');
    const first = lines.findIndex((l) => l.includes('`ccccccc`'));
    const second = lines.findIndex((l) => l.includes('`aaaaaaa`'));
    expect(first, r.out).toBeGreaterThan(0);
    expect(second, r.out).toBeGreaterThan(first);
    expect(lines[first]).toBe('| 2026-01-01 09:00 | `ccccccc` | 1.50 s | 150.0 | 320.0 | – | – | 200 MiB |');
    expect(lines[second]).toBe('| 2026-01-02 10:00 | `aaaaaaa` | 1.50 s | 250.0 | – | – | 2.4× | 200 MiB |');
    expect(r.out).not.toContain('999');
    expect(r.out).toContain('- della: 2 runs, 150.0–250.0 M/s, median 200.0 M/s; ≥ 200 M/s in 1 of 2');
    expect(r.out).toContain('- ties: 1 run, 320.0–320.0 M/s, median 320.0 M/s; ≥ 300 M/s in 1 of 1');
    expect(r.out).toContain('- task_arithmetic: 1 run, 2.4–2.4×, median 2.4×; ≤ 2× the read in 0 of 1');
  });
});
