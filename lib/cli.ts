/**
 * The della-merge command. Exit codes: 0 success, 1 the merge or inspection failed
 * (bad recipe, checkpoint, shapes, I/O), 2 bad command-line usage, 130/143 interrupted
 * by SIGINT/SIGTERM, 70 an internal error (a bug: please report it).
 */
import { existsSync, mkdtempSync, readdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { DellaError, isDellaError } from './errors.js';
import { openCheckpoint, type Checkpoint } from './checkpoint/model.js';
import { loadRecipe, type Recipe, type TensorParams } from './recipe/index.js';
import { packageVersion, planRecipe, runMerge, type MergeReport } from './merge/run.js';
import type { MethodSpec } from './merge/methods.js';
import { createProgress } from './cli/progress.js';
import { formatBytes, parseSize } from './util/size.js';
import { writeDemoModels, DEMO_EXPERTS } from './demo.js';
import { bf16ToF32 } from './reference/dtypes.js';
import { verifyMerge, type VerifyReport } from './validate/verify.js';
import { assemble, parsePart } from './merge/parts.js';
import { doctor, doctorLines } from './cli/doctor.js';

const USAGE = `della-merge ${'{version}'}: fast DELLA / DARE / task-arithmetic merging of safetensors models

Usage:
  della-merge run RECIPE --out DIR [options]   merge the models of a recipe (YAML or JSON)
  della-merge verify OUT --recipe RECIPE       check a merged model against its recipe
  della-merge assemble --out DIR PART...       join the parts of a merge run with --part i/N
  della-merge inspect PATH [--json]            list the tensors of a checkpoint
  della-merge demo [--out DIR]                 build three small experts and merge them with DELLA
  della-merge doctor [--json]                  report the platform, binary, SIMD and CUDA status
  della-merge help [COMMAND]                   show help
  della-merge --version

Run "della-merge help run" for the merge options.`;

const RUN_USAGE = `Usage: della-merge run RECIPE --out DIR [options]

  --out DIR            output directory (must not exist, unless --overwrite)
  --seed N             random seed, an integer in [0, 2^53) (default: the recipe's, else 0)
  --threads N          kernel threads (default: all cores)
  --shard-size SIZE    largest output shard, e.g. 2GB, 500MiB (default 5GB)
  --overwrite          replace DIR if it exists (atomically, when the merge is complete)
  --report FILE        write a JSON report (tensors, bytes, seconds, parameters, warnings)
  --quiet              no progress output
  --json               print the report as JSON on stdout instead of a summary
  --part i/N           merge only part i of N byte-balanced parts (for N jobs, GPUs or
                       machines); join the N part directories with "della-merge assemble"
  --verify             after merging, verify the output (see "della-merge help verify")
  --allow-nonfinite    merge tensors holding NaN or infinity instead of refusing them
  --dry-run            print the plan (per tensor: method and parameters per model; totals)
                       without reading a tensor or writing anything; --out is not needed`;

const VERIFY_USAGE = `Usage: della-merge verify OUT --recipe RECIPE [--samples N] [--seed N] [--json]

  Checks that OUT has exactly the tensors, dtypes and shapes RECIPE plans, that every
  value is finite, that copied tensors equal the base's, and that sampled rows of every
  merged tensor (all rows of tensors up to 65,536 elements; N others, default 3),
  recomputed by the reference implementation, equal the output bit for bit. Prints per
  tensor the fraction of each expert's change kept, how often its surviving changes
  agree in sign with the merged change, and the norm of the merged change against the
  expert's. Exits 1 if anything differs.

  --seed N   the seed of the merge (default: OUT/della_merge_run.json, else the recipe's)`;

const ASSEMBLE_USAGE = `Usage: della-merge assemble --out DIR [--overwrite] [--json] PART_DIR...

  Joins the N directories written by "della-merge run RECIPE --out PART_DIR --part i/N"
  (i = 1..N) into DIR: the same files, byte for byte, that one run of the whole merge
  writes. Refuses parts of different merges, a part given twice, and missing parts.`;

const INSPECT_USAGE = `Usage: della-merge inspect PATH [--json]

  PATH is a .safetensors file or a model directory (model.safetensors,
  model.safetensors.index.json, or *.safetensors shards).`;

const DEMO_USAGE = `Usage: della-merge demo [--out DIR] [--threads N]

  Writes a small Llama-shaped base model and three experts (math, code, chat) into DIR
  (default: a new temporary directory), merges them with DELLA and shows what it did.`;

const DOCTOR_USAGE = `Usage: della-merge doctor [--json]

  Reports the platform, Node.js and glibc versions, which native binary is used
  (prebuilt or local build) and whether it loads, the CPU's SIMD extensions, and the
  CUDA plugin and driver status; prints what to do when something is missing.
  Exits 1 when the native binary cannot be loaded.`;

const HELP: Record<string, string> = {
  doctor: DOCTOR_USAGE,
  run: RUN_USAGE, verify: VERIFY_USAGE, assemble: ASSEMBLE_USAGE, inspect: INSPECT_USAGE, demo: DEMO_USAGE,
};

function usageError(message: string, command?: string): DellaError {
  return new DellaError('E_ARGS', `${message}\n\n${command ? HELP[command] : USAGE.replace('{version}', packageVersion())}`);
}

type OptionSpec = Record<string, { type: 'string' | 'boolean'; short?: string }>;
type Parsed = { values: Record<string, string | boolean | undefined>; positionals: string[] };

function parse(command: string, args: string[], options: OptionSpec): Parsed {
  try {
    const r = parseArgs({ args, options: { ...options, help: { type: 'boolean', short: 'h' } }, allowPositionals: true, strict: true });
    return { values: r.values as Parsed['values'], positionals: r.positionals };
  } catch (e) {
    throw usageError((e as Error).message, command);
  }
}

function intOption(value: string | undefined, name: string, lo: number, hi: number): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!/^\d+$/.test(value.trim()) || !Number.isSafeInteger(n) || n < lo || n > hi) {
    throw new DellaError('E_ARGS', `--${name} must be an integer from ${lo} to ${hi}, got "${value}"`);
  }
  return n;
}

const out = (s: string) => process.stdout.write(`${s}\n`);
const err = (s: string) => process.stderr.write(`${s}\n`);

/** Cancels on SIGINT/SIGTERM; the merge then removes its temporary output. */
function withSignals<T>(work: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const controller = new AbortController();
  let received: NodeJS.Signals | null = null;
  const onSignal = (sig: NodeJS.Signals) => {
    if (received) process.exit(sig === 'SIGINT' ? 130 : 143); // second signal: leave now
    received = sig;
    err(`\n${sig}: stopping; removing the unfinished output...`);
    controller.abort();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  return work(controller.signal).finally(() => {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    if (received) process.exitCode = received === 'SIGINT' ? 130 : 143;
  });
}

function summary(r: MergeReport): string[] {
  const lines = [
    `merged   ${r.method}: ${r.tensors.merged} tensors merged, ${r.tensors.copied} copied, ` +
      `${(r.parameters.total / 1e6).toFixed(1)} M parameters in ${r.seconds.toFixed(2)} s ` +
      `(${(r.parameters.merged / 1e6 / Math.max(r.seconds, 1e-9)).toFixed(0)} M merged parameters/s, ${r.threads} threads)`,
    `read     ${formatBytes(r.bytes.read)}, wrote ${formatBytes(r.bytes.written)}`,
    `output   ${r.out}`,
    `files    ${r.files.join(', ')}`,
  ];
  for (const w of r.warnings) lines.push(`warning  ${w}`);
  return lines;
}

async function cmdRun(args: string[]): Promise<number> {
  const { values, positionals } = parse('run', args, {
    out: { type: 'string', short: 'o' }, seed: { type: 'string' }, threads: { type: 'string', short: 'j' },
    'shard-size': { type: 'string' }, overwrite: { type: 'boolean' }, report: { type: 'string' },
    quiet: { type: 'boolean', short: 'q' }, json: { type: 'boolean' }, 'dry-run': { type: 'boolean', short: 'n' },
    verify: { type: 'boolean' }, 'allow-nonfinite': { type: 'boolean' }, part: { type: 'string' },
  });
  if (values.help) return out(RUN_USAGE), 0;
  if (positionals.length !== 1) throw usageError(positionals.length === 0 ? 'run needs a RECIPE file' : `run takes one RECIPE, got ${positionals.length}`, 'run');
  if (values['dry-run']) return dryRun(await loadRecipe(positionals[0]), Boolean(values.json));
  if (!values.out) throw usageError('run needs --out DIR', 'run');
  const seed = intOption(values.seed as string | undefined, 'seed', 0, Number.MAX_SAFE_INTEGER);
  const threads = intOption(values.threads as string | undefined, 'threads', 1, 1024);
  const shardSize = values['shard-size'] !== undefined ? parseSize(values['shard-size'] as string, '--shard-size') : undefined;
  const part = values.part !== undefined ? parsePart(values.part as string) : undefined;
  if (part && values.verify) throw usageError('--verify checks a whole merge: verify after "della-merge assemble"', 'run');
  const recipe = await loadRecipe(positionals[0]);
  const progress = createProgress(process.stderr, values.quiet || values.json ? 'none' : 'auto');
  const report = await withSignals((signal) => runMerge(recipe, {
    out: values.out as string, seed, threads, shardSize, overwrite: Boolean(values.overwrite), signal,
    allowNonFinite: Boolean(values['allow-nonfinite']), part, onProgress: (e) => progress.update(e),
  }).finally(() => progress.end()));
  const verified = values.verify ? await verifyMerge(report.out, recipe, { seed: report.seed }) : null;
  const full = verified ? { ...report, verify: verified } : report;
  if (values.report) writeFileSync(resolve(values.report as string), `${JSON.stringify(full, null, 2)}\n`);
  if (values.json) out(JSON.stringify(full, null, 2));
  else {
    summary(report).forEach(out);
    if (verified) verifySummary(verified).forEach(out);
  }
  return verified && !verified.ok ? 1 : 0;
}

function pct(x: number | undefined): string {
  return x === undefined ? '' : `${(x * 100).toFixed(1)}%`;
}

function verifyTable(r: VerifyReport): string[] {
  const w = Math.max(6, ...r.checks.map((c) => c.name.length));
  const lines = [`${'tensor'.padEnd(w)}  status  rows       kept              sign agreement    norm ratio`];
  for (const c of r.checks) {
    const rows = `${c.rowsChecked}/${c.rowsTotal}`.padEnd(9);
    const list = (xs: number[] | undefined, f: (x: number) => string) => (xs ? xs.map(f).join(' ') : '').padEnd(17);
    lines.push(`${c.name.padEnd(w)}  ${(c.ok ? 'ok' : 'FAIL').padEnd(6)}  ${rows}  ${list(c.keptFraction, pct)} ${list(c.signAgreement, pct)} ${list(c.normRatio, (x) => x.toFixed(3))}`.trimEnd());
  }
  return lines;
}

function verifySummary(r: VerifyReport): string[] {
  const head = r.ok
    ? `verified ${r.tensors.checked} tensors (${r.rowsChecked} rows recomputed by the reference), all equal, all finite, in ${r.seconds.toFixed(2)} s`
    : `FAILED   ${r.tensors.failed} of ${r.tensors.checked} tensors differ from the recipe (seed ${r.seed}):`;
  return [head, ...r.problems.slice(0, 20).map((p) => `  ${p}`), ...(r.problems.length > 20 ? [`  ... and ${r.problems.length - 20} more`] : [])];
}

async function cmdAssemble(args: string[]): Promise<number> {
  const { values, positionals } = parse('assemble', args, {
    out: { type: 'string', short: 'o' }, overwrite: { type: 'boolean' }, json: { type: 'boolean' }, threads: { type: 'string', short: 'j' },
  });
  if (values.help) return out(ASSEMBLE_USAGE), 0;
  if (!values.out) throw usageError('assemble needs --out DIR', 'assemble');
  if (positionals.length === 0) throw usageError('assemble needs the part directories', 'assemble');
  const threads = intOption(values.threads as string | undefined, 'threads', 1, 1024);
  const r = await assemble(positionals, values.out as string, { overwrite: Boolean(values.overwrite), threads });
  if (values.json) out(JSON.stringify(r, null, 2));
  else {
    out(`assembled ${r.parts} parts: ${r.tensors} tensors, ${formatBytes(r.bytes)} in ${r.seconds.toFixed(2)} s`);
    out(`output   ${r.out}`);
    out(`files    ${r.files.join(', ')}`);
  }
  return 0;
}

async function cmdVerify(args: string[]): Promise<number> {
  const { values, positionals } = parse('verify', args, {
    recipe: { type: 'string', short: 'r' }, samples: { type: 'string' }, seed: { type: 'string' }, json: { type: 'boolean' },
  });
  if (values.help) return out(VERIFY_USAGE), 0;
  if (positionals.length !== 1) throw usageError('verify takes one OUT directory', 'verify');
  if (!values.recipe) throw usageError('verify needs --recipe RECIPE', 'verify');
  const samples = intOption(values.samples as string | undefined, 'samples', 1, 1_000_000);
  const seed = intOption(values.seed as string | undefined, 'seed', 0, Number.MAX_SAFE_INTEGER);
  const recipe = await loadRecipe(values.recipe as string);
  const report = await verifyMerge(resolve(positionals[0]), recipe, { samples, seed });
  if (values.json) out(JSON.stringify(report, null, 2));
  else [...verifyTable(report), '', ...verifySummary(report)].forEach(out);
  return report.ok ? 0 : 1;
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
function dryRun(recipe: Recipe, json: boolean): number {
  const { plan, models } = planRecipe(recipe);
  models.close();
  const t = plan.totals;
  if (json) {
    out(JSON.stringify({
      method: plan.method.name, base: recipe.baseModel.model, models: recipe.models.map((m) => m.model),
      seed: recipe.seed, layers: plan.layers, totals: t, warnings: [...recipe.warnings, ...plan.warnings],
      tensors: plan.tensors.map((x) => ({
        name: x.name, action: x.kind, dtype: x.outDtype, shape: x.shape, bytesRead: x.inBytes, bytesWritten: x.outBytes,
        ...(x.params ? { parameters: x.params } : {}),
      })),
    }, null, 2));
    return 0;
  }
  out(`plan     ${plan.method.name} (${plan.method.paper}); base ${recipe.baseModel.model}; ` +
    `models ${recipe.models.map((m) => m.model).join(', ')}; seed ${recipe.seed}`);
  const w = Math.max(...plan.tensors.map((x) => x.name.length), 6);
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
  const w = [0, 1, 2].map((i) => Math.max(...rows.map((r) => r[i].length), ['tensor', 'dtype', 'shape'][i].length));
  const lines = [`${'tensor'.padEnd(w[0])}  ${'dtype'.padEnd(w[1])}  ${'shape'.padEnd(w[2])}  size`];
  for (const r of rows) lines.push(`${r[0].padEnd(w[0])}  ${r[1].padEnd(w[1])}  ${r[2].padEnd(w[2])}  ${r[3]}`);
  const params = [...c.tensors.values()].reduce((a, t) => a + t.numel, 0);
  const byDtype = new Map<string, number>();
  for (const t of c.tensors.values()) byDtype.set(t.dtype, (byDtype.get(t.dtype) ?? 0) + 1);
  lines.push('', `${c.names.length} tensors, ${params.toLocaleString('en-US')} parameters, ${formatBytes(c.totalBytes)} ` +
    `in ${c.files.length} file(s); dtypes: ${[...byDtype].map(([d, n]) => `${d} ×${n}`).join(', ')}`);
  return lines;
}

async function cmdInspect(args: string[]): Promise<number> {
  const { values, positionals } = parse('inspect', args, { json: { type: 'boolean' } });
  if (values.help) return out(INSPECT_USAGE), 0;
  if (positionals.length !== 1) throw usageError('inspect takes one PATH', 'inspect');
  const c = openCheckpoint(positionals[0]);
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

/** Per expert: how much of its change survived, and how aligned the merged change is with it. */
function demoAnalysis(baseDir: string, expertDirs: string[], mergedDir: string, report: MergeReport): string[] {
  const base = openCheckpoint(baseDir);
  const merged = openCheckpoint(mergedDir);
  const experts = expertDirs.map((d) => openCheckpoint(d));
  try {
    const dot = new Array(experts.length).fill(0), ee = new Array(experts.length).fill(0);
    let mm = 0;
    for (const name of base.names) {
      if (base.tensors.get(name)!.dtype !== 'BF16') continue;
      const b = base.array(name) as Uint16Array, m = merged.array(name) as Uint16Array;
      const es = experts.map((e) => e.array(name) as Uint16Array);
      for (let i = 0; i < b.length; i++) {
        const bv = bf16ToF32(b[i]);
        const md = bf16ToF32(m[i]) - bv;
        mm += md * md;
        es.forEach((e, k) => {
          const ed = bf16ToF32(e[i]) - bv;
          dot[k] += md * ed;
          ee[k] += ed * ed;
        });
      }
    }
    const kept = experts.map((_, k) => {
      let s = 0, n = 0;
      for (const t of report.tensorReports) {
        if (t.keptFraction) {
          const numel = t.shape.reduce((a, b) => a * b, 1);
          s += t.keptFraction[k] * numel;
          n += numel;
        }
      }
      return n > 0 ? s / n : 1;
    });
    return [
      'what DELLA did, per expert (MAGPRUNE keeps ~density of each delta, favouring large magnitudes):',
      ...DEMO_EXPERTS.map((skill, k) =>
        `  ${skill.padEnd(5)} kept ${(kept[k] * 100).toFixed(1)}% of its delta; cosine(merged delta, its delta) = ${(dot[k] / Math.sqrt(mm * ee[k])).toFixed(3)}`),
    ];
  } finally {
    base.close();
    merged.close();
    experts.forEach((e) => e.close());
  }
}

async function cmdDemo(args: string[]): Promise<number> {
  const { values, positionals } = parse('demo', args, { out: { type: 'string', short: 'o' }, threads: { type: 'string', short: 'j' } });
  if (values.help) return out(DEMO_USAGE), 0;
  if (positionals.length > 0) throw usageError(`demo takes no positional arguments, got "${positionals[0]}"`, 'demo');
  const threads = intOption(values.threads as string | undefined, 'threads', 1, 1024);
  const dir = values.out ? resolve(values.out as string) : mkdtempSync(join(tmpdir(), 'della-merge-demo-'));
  // Only an empty directory, or an earlier demo's, is written into.
  if (values.out && existsSync(dir) && readdirSync(dir).length > 0 && !existsSync(join(dir, 'models', 'recipe.yaml'))) {
    throw new DellaError('E_OUTPUT', `${dir} exists and is not an earlier demo's directory; give an empty or new directory`);
  }
  const models = writeDemoModels(join(dir, 'models'));
  out(`della-merge demo`);
  out(`models   ${models.dir}: a base model (BF16, ${models.layers} layers, ${(models.parameters / 1e6).toFixed(2)} M parameters, 2 shards)`);
  out(`         and 3 experts fine-tuned from it: ${DEMO_EXPERTS.join(', ')}`);
  out(`recipe   ${models.recipeFile} (della, density 0.4, epsilon 0.15, lambda 1, seed 42)`);
  const recipe = await loadRecipe(models.recipeFile);
  const progress = createProgress(process.stderr, 'auto');
  const mergedDir = join(dir, 'merged');
  const report = await withSignals((signal) => runMerge(recipe, {
    out: mergedDir, threads, overwrite: true, signal, onProgress: (e) => progress.update(e),
  }).finally(() => progress.end()));
  summary(report).forEach(out);
  demoAnalysis(models.baseDir, models.expertDirs, mergedDir, report).forEach(out);
  out(`next     della-merge inspect ${mergedDir}`);
  out(`         della-merge run ${models.recipeFile} --out ${join(dir, 'merged-again')} --threads 1   # same bytes`);
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
        const { values } = parse('doctor', rest, { json: { type: 'boolean' } });
        if (values.help) return out(DOCTOR_USAGE), 0;
        const r = doctor(packageVersion());
        if (values.json) out(JSON.stringify(r, null, 2));
        else doctorLines(r).forEach(out);
        return r.ok ? 0 : 1;
      }
      case '--version': case '-v': case 'version': out(packageVersion()); return 0;
      case undefined: case 'help': case '--help': case '-h': {
        const topic = command === 'help' ? rest[0] : undefined;
        if (topic && !HELP[topic]) throw usageError(`no help for "${topic}"`);
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
