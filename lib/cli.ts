/**
 * The della-merge command. Exit codes: 0 success, 1 the merge or inspection failed
 * (bad recipe, checkpoint, shapes, I/O), 2 bad command-line usage, 129/130/143 interrupted
 * by SIGHUP/SIGINT/SIGTERM, 70 an internal error (a bug: please report it).
 */
import { availableParallelism } from 'node:os';
import { isDellaError } from './errors.js';
import { openInput, type Checkpoint } from './checkpoint/model.js';
import { loadRecipe, type Recipe, type TensorParams } from './recipe/index.js';
import { inputPaths, packageVersion, planRecipe, runMerge } from './merge/run.js';
import { OutputDirectory } from './checkpoint/writer.js';
import type { MethodSpec } from './merge/methods.js';
import { createProgress } from './cli/progress.js';
import { formatBytes, parseSize } from './util/size.js';
import { columnWidth } from './util/show.js';
import { verifyMerge } from './validate/verify.js';
import { assemble, parsePart, partTensors } from './merge/parts.js';
import { planTotals } from './merge/plan.js';
import { doctor, doctorLines } from './cli/doctor.js';
import { checkReportFile, deviceOptions, err, intOption, out, parse, reportIsFile, summary, usageError, withSignals, writeReport } from './cli/common.js';
import { cmdDemo } from './cli/demo.js';
import { cmdVerify, verifySummary } from './cli/verify.js';
import { ASSEMBLE_USAGE, DOCTOR_USAGE, HELP, INSPECT_USAGE, RUN_USAGE, USAGE } from './cli/usage.js';

// run's -j N sets the merge's threads; --verify's workers take at most one a core, since
// each maps the files again and more than the cores only adds memory.
export function verifyThreads(threads: number | undefined): number | undefined {
  return threads === undefined ? undefined : Math.min(threads, availableParallelism());
}

async function cmdRun(args: string[]): Promise<number> {
  const { values, positionals } = parse('run', args, {
    out: { type: 'string', short: 'o' }, seed: { type: 'string' }, threads: { type: 'string', short: 'j' },
    'shard-size': { type: 'string' }, overwrite: { type: 'boolean' }, report: { type: 'string' },
    quiet: { type: 'boolean', short: 'q' }, json: { type: 'boolean' }, 'dry-run': { type: 'boolean', short: 'n' },
    verify: { type: 'boolean' }, 'allow-nonfinite': { type: 'boolean' }, part: { type: 'string' },
    device: { type: 'string' }, 'gpu-memory': { type: 'string' },
  });
  if (values.help) return out(RUN_USAGE), 0;
  if (positionals.length !== 1) throw usageError(positionals.length === 0 ? 'run needs a RECIPE file' : `run takes one RECIPE, got ${positionals.length}`, 'run');
  // Every option is checked even for --dry-run, which then plans what the run would do.
  const { device, gpuMemory } = deviceOptions(values);
  const seed = intOption(values.seed as string | undefined, 'seed', 0, Number.MAX_SAFE_INTEGER);
  const threads = intOption(values.threads as string | undefined, 'threads', 1, 1024);
  const shardSize = values['shard-size'] !== undefined ? parseSize(values['shard-size'] as string, '--shard-size') : undefined;
  const part = values.part !== undefined ? parsePart(values.part as string) : undefined;
  if (part && values.verify) throw usageError('--verify checks a whole merge: verify after "della-merge assemble"', 'run');
  if (values.report) checkReportFile(values.report as string, values.out as string | undefined); // before merging, not after the output is in place
  const overwrite = Boolean(values.overwrite);
  if (!values.out && !values['dry-run']) throw usageError('run needs --out DIR', 'run');
  const recipe = await loadRecipe(positionals[0]);
  if (values.report) checkReportFile(values.report as string, values.out as string | undefined, recipe);
  if (values['dry-run']) return dryRun(recipe, Boolean(values.json), seed, part, { out: values.out as string | undefined, overwrite });
  const progress = createProgress(process.stderr, values.quiet || values.json ? 'none' : 'auto');
  const report = await withSignals((signal) => runMerge(recipe, {
    out: values.out as string, seed, threads, shardSize, overwrite, signal,
    allowNonFinite: Boolean(values['allow-nonfinite']), part, device, gpuMemory, onProgress: (e) => progress.update(e),
  }).finally(() => progress.end()));
  // The output is in place and whole: a signal now stops the check, not the merge, so the
  // merge's summary and report come first (under the check's signal handling), and a
  // stopped check leaves them. A report going to a pipe is written once, at the end.
  const verified = values.verify
    ? await withSignals(async (signal) => {
      if (values.report && reportIsFile(values.report as string)) writeReport(values.report as string, report);
      if (!values.json) summary(report).forEach(out);
      return verifyMerge(report.out, recipe, { seed: report.seed, threads: verifyThreads(threads), signal });
    }, `the merge into ${report.out} is complete; not verifying it`)
    : null;
  const full = verified ? { ...report, verify: verified } : report;
  if (values.report) writeReport(values.report as string, full);
  if (values.json) out(JSON.stringify(full, null, 2));
  else if (verified) verifySummary(verified).forEach(out);
  else summary(report).forEach(out);
  return verified && !verified.ok ? 1 : 0;
}

async function cmdAssemble(args: string[]): Promise<number> {
  const { values, positionals } = parse('assemble', args, {
    out: { type: 'string', short: 'o' }, overwrite: { type: 'boolean' }, json: { type: 'boolean' },
  });
  if (values.help) return out(ASSEMBLE_USAGE), 0;
  if (!values.out) throw usageError('assemble needs --out DIR', 'assemble');
  if (positionals.length === 0) throw usageError('assemble needs the part directories', 'assemble');
  const r = await withSignals((signal) => assemble(positionals, values.out as string, { overwrite: Boolean(values.overwrite), signal }));
  if (values.json) out(JSON.stringify(r, null, 2));
  else {
    out(`assembled ${r.parts} parts: ${r.tensors} tensors, ${formatBytes(r.bytes)} in ${r.seconds.toFixed(2)} s`);
    out(`output   ${r.out}`);
    out(`files    ${r.files.join(', ')}`);
  }
  return 0;
}

function paramText(p: TensorParams, method: MethodSpec): string {
  const list = (xs: number[]) => `[${xs.map((x) => +x.toPrecision(6)).join(', ')}]`;
  if (method.kind === 'slerp') return `t=${+p.t.toPrecision(6)}`;
  const parts = [`weight=${list(p.experts.map((e) => e.weight))}`];
  if (method.kind === 'linear') return [...parts, `normalize=${p.normalize}`].join(' ');
  if (method.sparsifier !== 'none') parts.push(`density=${list(p.experts.map((e) => e.density))}`);
  if (method.sparsifier === 'magprune') parts.push(`epsilon=${list(p.experts.map((e) => e.epsilon))}`);
  if (method.sparsifier === 'breadcrumbs') parts.push(`gamma=${list(p.experts.map((e) => e.gamma))}`);
  parts.push(`lambda=${+p.lambda.toPrecision(6)}`, `consensus=${p.consensus}`, `normalize=${p.normalize}`, `rescale=${p.rescale}`);
  return parts.join(' ');
}

/** run --dry-run: the plan, from headers alone. */
function dryRun(
  recipe: Recipe, json: boolean, seedOption: number | undefined, part: { index: number; count: number } | undefined,
  output: { out?: string; overwrite: boolean },
): number {
  const { plan: whole, models } = planRecipe(recipe);
  try {
    if (output.out !== undefined) OutputDirectory.check(output.out, { overwrite: output.overwrite, inputs: inputPaths(models, recipe) });
  } finally {
    models.close();
  }
  const seed = seedOption ?? recipe.seed;
  const tensors = part ? partTensors(whole.tensors, part.index, part.count) : whole.tensors;
  const plan = { ...whole, tensors, totals: planTotals(tensors) };
  const t = plan.totals;
  if (json) {
    out(JSON.stringify({
      method: plan.method.name, base: recipe.baseModel.model, models: recipe.models.map((m) => m.model),
      seed, ...(part ? { part: `${part.index}/${part.count}` } : {}), layers: plan.layers, totals: t, warnings: [...recipe.warnings, ...plan.warnings],
      tensors: plan.tensors.map((x) => ({
        name: x.name, action: x.kind, dtype: x.outDtype, shape: x.shape, bytesRead: x.inBytes, bytesWritten: x.outBytes,
        ...(x.params ? { parameters: x.params } : {}),
      })),
    }, null, 2));
    return 0;
  }
  out(`plan     ${plan.method.name} (${plan.method.paper}); base ${recipe.baseModel.model}; ` +
    `models ${recipe.models.map((m) => m.model).join(', ')}; seed ${seed}${part ? `; part ${part.index}/${part.count}` : ''}`);
  const w = columnWidth(plan.tensors.map((x) => x.name), 6);
  for (const x of plan.tensors) {
    const what = x.kind === 'merge' ? paramText(x.params!, plan.method) : 'copied from the base';
    out(`${x.name.padEnd(w)}  ${x.kind.padEnd(5)}  ${x.outDtype.padEnd(4)}  [${x.shape.join(', ')}]  ${what}`);
  }
  out(`totals   ${t.tensors} tensors (${t.merged} merged, ${t.copied} copied), ${t.parameters.toLocaleString('en-US')} parameters ` +
    `(${t.mergedParameters.toLocaleString('en-US')} merged); would read ${formatBytes(t.bytesRead)} and write ${formatBytes(t.bytesWritten)}`);
  for (const warning of [...recipe.warnings, ...plan.warnings]) out(`warning  ${warning}`);
  return 0;
}

function inspectLines(c: Checkpoint): string[] {
  const rows = c.names.map((n) => {
    const t = c.tensors.get(n)!;
    return [n, t.dtype, `[${t.shape.join(', ')}]`, formatBytes(t.byteLength)];
  });
  const w = [0, 1, 2].map((i) => columnWidth(rows.map((r) => r[i]), ['tensor', 'dtype', 'shape'][i].length));
  const lines = [`${'tensor'.padEnd(w[0])}  ${'dtype'.padEnd(w[1])}  ${'shape'.padEnd(w[2])}  size`];
  for (const r of rows) lines.push(`${r[0].padEnd(w[0])}  ${r[1].padEnd(w[1])}  ${r[2].padEnd(w[2])}  ${r[3]}`);
  const params = [...c.tensors.values()].reduce((a, t) => a + t.numel, 0);
  const byDtype = new Map<string, number>();
  for (const t of c.tensors.values()) byDtype.set(t.dtype, (byDtype.get(t.dtype) ?? 0) + 1);
  lines.push('', `${c.names.length} tensors, ${params.toLocaleString('en-US')} parameters, ${formatBytes(c.totalBytes)} ` +
    `in ${c.files.length} file(s); dtypes: ${byDtype.size === 0 ? 'none' : [...byDtype].map(([d, n]) => `${d} ×${n}`).join(', ')}`);
  return lines;
}

async function cmdInspect(args: string[]): Promise<number> {
  const { values, positionals } = parse('inspect', args, { json: { type: 'boolean' } });
  if (values.help) return out(INSPECT_USAGE), 0;
  if (positionals.length !== 1) throw usageError('inspect takes one PATH', 'inspect');
  const c = openInput(positionals[0]);
  try {
    if (values.json) {
      out(JSON.stringify({
        path: c.path, files: c.files, totalBytes: c.totalBytes,
        parameters: [...c.tensors.values()].reduce((a, t) => a + t.numel, 0),
        tensors: c.names.map((n) => {
          const t = c.tensors.get(n)!;
          return { name: n, dtype: t.dtype, shape: t.shape, bytes: t.byteLength, file: t.file };
        }),
      }, null, 2));
    } else {
      inspectLines(c).forEach(out);
    }
  } finally {
    c.close();
  }
  return 0;
}

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case 'run': return await cmdRun(rest);
      case 'inspect': return await cmdInspect(rest);
      case 'verify': return await cmdVerify(rest);
      case 'assemble': return await cmdAssemble(rest);
      case 'demo': return await cmdDemo(rest);
      case 'doctor': {
        const { values, positionals } = parse('doctor', rest, { json: { type: 'boolean' } });
        if (values.help) return out(DOCTOR_USAGE), 0;
        if (positionals.length > 0) throw usageError(`doctor takes no positional arguments, got "${positionals[0]}"`, 'doctor');
        const r = doctor(packageVersion());
        if (values.json) out(JSON.stringify(r, null, 2));
        else doctorLines(r).forEach(out);
        return r.ok ? 0 : 1;
      }
      case '--version': case '-v': case 'version':
        if (rest.length > 0) throw usageError(`${command} takes no arguments, got "${rest[0]}"`);
        out(packageVersion());
        return 0;
      case undefined: case 'help': case '--help': case '-h': {
        if (rest.length > 1) throw usageError(`${command} takes one COMMAND, got ${rest.map((a) => `"${a}"`).join(' ')}`);
        const topic = ['help', '--help', '-h'].includes(rest[0]) ? undefined : rest[0]; // "help help", "help --help": the overview
        if (topic && !Object.hasOwn(HELP, topic)) throw usageError(`no help for "${topic}"`);
        out(topic ? HELP[topic] : USAGE.replace('{version}', packageVersion()));
        return 0;
      }
      default: throw usageError(`unknown command "${command}"`);
    }
  } catch (e) {
    if (isDellaError(e)) {
      err(`della-merge: ${e.message}`);
      return e.code === 'E_ARGS' ? 2 : e.code === 'E_ABORTED' ? (process.exitCode as number) || 130 : 1;
    }
    throw e;
  }
}
