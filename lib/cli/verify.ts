/** della-merge verify and its table. */
import { resolve } from 'node:path';
import { loadRecipe } from '../recipe/index.js';
import { verifyMerge, type VerifyReport } from '../validate/verify.js';
import { intOption, out, parse, usageError, withSignals } from './common.js';
import { VERIFY_USAGE } from './usage.js';
import { columnWidth } from '../util/show.js';

function pct(x: number | undefined): string {
  return x === undefined ? '' : `${(x * 100).toFixed(1)}%`;
}

function verifyTable(r: VerifyReport): string[] {
  const w = columnWidth(r.checks.map((c) => c.name), 6);
  const lines = [`${'tensor'.padEnd(w)}  status  rows       kept              sign agreement    norm ratio`];
  for (const c of r.checks) {
    const rows = `${c.rowsChecked}/${c.rowsTotal}`.padEnd(9);
    const list = (xs: number[] | undefined, f: (x: number) => string) => (xs ? xs.map(f).join(' ') : '').padEnd(17);
    lines.push(`${c.name.padEnd(w)}  ${(c.ok ? 'ok' : 'FAIL').padEnd(6)}  ${rows}  ${list(c.keptFraction, pct)} ${list(c.signAgreement, pct)} ${list(c.normRatio, (x) => x.toFixed(3))}`.trimEnd());
  }
  return lines;
}

/**
 * The seed rows were recomputed with, when it is not the recipe's: it came from the
 * merge's record (a run's --seed overrides the recipe's), so a recipe that differs from
 * the merge's only in its seed still verifies; said, so that is not missed.
 */
export function seedNote(used: number, recipe: number, given: number | undefined): string[] {
  if (used === recipe || given !== undefined) return [];
  return [`note     rows recomputed with seed ${used}, the merge's (della_merge_run.json), not the recipe's ${recipe}: a run's --seed overrides it`];
}

export function verifySummary(r: VerifyReport): string[] {
  const head = r.ok
    ? `verified ${r.tensors.checked} tensors (${r.rowsChecked} rows recomputed by the reference), all equal, all finite, in ${r.seconds.toFixed(2)} s`
    : r.tensors.failed > 0
      ? `FAILED   ${r.tensors.failed} of ${r.tensors.checked} tensors fail the checks (seed ${r.seed}):`
      : `FAILED   the output as a whole (its ${r.tensors.checked} tensors pass their checks; seed ${r.seed}):`;
  return [head, ...r.problems.slice(0, 20).map((p) => `  ${p}`), ...(r.problems.length > 20 ? [`  ... and ${r.problems.length - 20} more`] : [])];
}

export async function cmdVerify(args: string[]): Promise<number> {
  const { values, positionals } = parse('verify', args, {
    recipe: { type: 'string', short: 'r' }, samples: { type: 'string' }, seed: { type: 'string' }, threads: { type: 'string', short: 'j' }, json: { type: 'boolean' },
  });
  if (values.help) return out(VERIFY_USAGE), 0;
  if (positionals.length !== 1) throw usageError('verify takes one OUT directory', 'verify');
  if (!values.recipe) throw usageError('verify needs --recipe RECIPE', 'verify');
  const samples = intOption(values.samples as string | undefined, 'samples', 1, 1_000_000);
  const seed = intOption(values.seed as string | undefined, 'seed', 0, Number.MAX_SAFE_INTEGER);
  const threads = intOption(values.threads as string | undefined, 'threads', 1, 1024);
  const recipe = await loadRecipe(values.recipe as string);
  const report = await withSignals((signal) => verifyMerge(resolve(positionals[0]), recipe, { samples, seed, threads, signal }), 'the output is left as it is');
  if (values.json) out(JSON.stringify(report, null, 2));
  else [...verifyTable(report), '', ...seedNote(report.seed, recipe.seed, seed), ...verifySummary(report)].forEach(out);
  return report.ok ? 0 : 1;
}
