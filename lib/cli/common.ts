/** What every command shares: argument parsing, output, signals, the run summary. */
import { accessSync, constants, existsSync, realpathSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { basename, dirname, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { DellaError, ioError } from '../errors.js';
import { packageVersion, type MergeReport } from '../merge/run.js';
import type { Recipe } from '../recipe/index.js';
import { INDEX_FILE, TEMP_MARK } from '../checkpoint/writer.js';
import { EXTRA_FILES } from '../merge/parts.js';
import { formatBytes, parseSize } from '../util/size.js';
import { parseDevice } from '../merge/device.js';
import { likelyMeant } from '../util/options.js';
import { HELP, USAGE } from './usage.js';
import { isWithin, makeDirs, nearestExisting } from '../util/fs.js';

export function usageError(message: string, command?: string): DellaError {
  return new DellaError('E_ARGS', `${message}\n\n${command ? HELP[command] : USAGE.replace('{version}', packageVersion())}`);
}

export type OptionSpec = Record<string, { type: 'string' | 'boolean'; short?: string }>;
export type Parsed = { values: Record<string, string | boolean | undefined>; positionals: string[] };

export function parse(command: string, args: string[], options: OptionSpec): Parsed {
  // "--seed -1": parseArgs would refuse the value as ambiguous, with its own advice; joined
  // as "--seed=-1", the value reaches the option's check and its range message.
  const joined: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a.startsWith('--') && options[a.slice(2)]?.type === 'string' && /^-\d/.test(args[i + 1] ?? '')) joined.push(`${a}=${args[++i]}`);
    else joined.push(a);
  }
  try {
    const r = parseArgs({ args: joined, options: { ...options, help: { type: 'boolean', short: 'h' } }, allowPositionals: true, strict: true, tokens: true });
    // parseArgs keeps the last of a repeated option: "--out a --out b" wrote to b
    // unannounced. A repeated flag (-q -q, as wrappers pass defaults) says nothing new.
    const seen = new Set<string>();
    for (const t of r.tokens) {
      if (t.kind !== 'option' || options[t.name]?.type !== 'string') continue;
      if (seen.has(t.name)) throw new Error(`--${t.name} is given more than once`);
      seen.add(t.name);
    }
    return { values: r.values as Parsed['values'], positionals: r.positionals };
  } catch (e) {
    // Node's own message for an unknown option ends in an unclosed quote; ours names the
    // option, a likely intended one, and how to pass a file whose name starts with '-'.
    const unknown = (e as { code?: string }).code === 'ERR_PARSE_ARGS_UNKNOWN_OPTION' && /'([^']+)'/.exec((e as Error).message)?.[1];
    if (unknown) {
      const word = unknown.replace(/^-+/, '').split('=')[0];
      const meant = unknown.startsWith('--') ? likelyMeant(word, [...Object.keys(options), 'help']) : null;
      const hint = meant ? ` (did you mean --${meant}?)` : '';
      throw usageError(`unknown option ${unknown} for ${command}` + (hint || `; a file whose name starts with "-" goes after "--", as in: della-merge ${command} -- ${unknown}`), command);
    }
    throw usageError((e as Error).message, command);
  }
}

export function intOption(value: string | undefined, name: string, lo: number, hi: number): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!/^\d+$/.test(value.trim()) || !Number.isSafeInteger(n) || n < lo || n > hi) {
    throw new DellaError('E_ARGS', `--${name} must be an integer from ${lo} to ${hi}, got "${value}"`);
  }
  return n;
}

/** --device cpu|cuda[:N] and --gpu-memory SIZE, checked before anything runs. */
export function deviceOptions(values: Parsed['values']): { device?: string; gpuMemory?: number } {
  const device = values.device as string | undefined;
  const spec = parseDevice(device);
  const gpuMemory = values['gpu-memory'] !== undefined ? parseSize(values['gpu-memory'] as string, '--gpu-memory') : undefined;
  if (gpuMemory !== undefined && spec.kind !== 'cuda') throw new DellaError('E_ARGS', '--gpu-memory needs --device cuda');
  return { device, gpuMemory };
}

/** stat without throwing: undefined for a missing path, or one under a file (ENOTDIR). */
function statOrNone(path: string) {
  try {
    return statSync(path, { throwIfNoEntry: false });
  } catch {
    return undefined;
  }
}

/**
 * Why `path` cannot be a file written later (null if it can): it is a directory, or the
 * nearest existing directory above it is a file or not writable. Missing directories
 * between are made when the file is written (writeReport). Checked before the work
 * starts, so the command does not finish its work and then fail on its last step.
 */
export function unwritableFile(path: string): string | null {
  const full = resolve(path);
  const st = statOrNone(full);
  if (st?.isDirectory()) return `${full} is a directory; give a file name`;
  const dir = nearestExisting(dirname(full));
  if (!statOrNone(dir)?.isDirectory()) return `${full}: ${dir} is not a directory`;
  try {
    accessSync(st ? full : dir, constants.W_OK);
  } catch (e) {
    return `${full}: ${st ? 'the file' : `the directory ${dir}`} is not writable (${(e as NodeJS.ErrnoException).code})`;
  }
  return null;
}

/** Whether the merge may write a file of this name at the top of its output directory. */
function mergeWrites(name: string): boolean {
  return name.endsWith('.safetensors') || name === INDEX_FILE || name.startsWith('della_merge_') || EXTRA_FILES.includes(name);
}

/**
 * run --report FILE: refused up front, before anything is merged, where writing it
 * would replace the merge's own output or one of its inputs (the recipe, a model's files).
 */
export function checkReportFile(path: string, outDir: string | undefined, recipe?: Recipe): void {
  const full = resolve(path);
  if (outDir !== undefined && full === resolve(outDir)) throw new DellaError('E_OUTPUT', `--report ${full} is the output directory; give a file name`);
  const atTop = outDir !== undefined && isWithin(dirname(full), outDir) && isWithin(outDir, dirname(full));
  if (atTop && mergeWrites(basename(full))) {
    throw new DellaError('E_OUTPUT', `--report ${full} is a file the merge writes into ${resolve(outDir)}; give another name`);
  }
  if (recipe) {
    const inputs = [...(recipe.source ? [recipe.source] : []), recipe.baseModel.path, ...recipe.models.map((m) => m.path)];
    // Replacing one of their files or the recipe, or adding one a model would be read
    // by (a model.safetensors beside shards); a report.json beside them is harmless.
    const exists = existsSync(full);
    const hit = inputs.find((input) => isWithin(full, input) && (exists || mergeWrites(basename(full))));
    if (hit) throw new DellaError('E_OUTPUT', `--report ${full} would ${exists ? 'replace' : 'add to'} ${resolve(hit) === full ? '' : 'the files of '}${hit}, an input of this merge; give another path`);
  }
  const why = unwritableFile(path);
  if (why) throw new DellaError('E_OUTPUT', `--report ${why}`);
}

/** Whether the --report path is a regular file or not there yet: one that can be written
 * more than once (a pipe or /dev/stdout would pass on each writing). */
export function reportIsFile(path: string): boolean {
  try {
    return statSync(resolve(path)).isFile();
  } catch {
    return true; // new
  }
}

/** Writes the --report JSON, making its directory if needed (job scripts name a reports/
 * directory per run); a failure (disk full, ...) is E_IO saying the merge itself is done. */
export function writeReport(path: string, report: { out: string }): void {
  const full = resolve(path);
  const text = `${JSON.stringify(report, null, 2)}\n`;
  // A file is written beside itself and renamed over: a full disk must not leave a cut
  // JSON in place of an earlier report. /dev/stdout, a pipe: written to as they are.
  let special = false, target = full;
  try {
    special = !statSync(full).isFile();
    target = realpathSync(full); // through a link, as writing to it did
  } catch {
    // new
  }
  const tmp = `${target}${TEMP_MARK}${process.pid}`;
  try {
    makeDirs(dirname(full));
    if (special) {
      writeFileSync(full, text);
    } else {
      writeFileSync(tmp, text);
      renameSync(tmp, target);
    }
  } catch (e) {
    rmSync(tmp, { force: true });
    throw ioError(`the merge into ${report.out} is complete, but cannot write the report ${full}`, e);
  }
}

export const out = (s: string) => process.stdout.write(`${s}\n`);
export const err = (s: string) => process.stderr.write(`${s}\n`);

/** Exit statuses 128 + the signal's number, as a shell reports them. SIGHUP: the terminal
 * closed (an ssh session dropped), which should not leave an unfinished output either. */
const SIGNAL_EXIT: Partial<Record<NodeJS.Signals, number>> = { SIGHUP: 129, SIGINT: 130, SIGTERM: 143 };

/** Cancels on SIGHUP/SIGINT/SIGTERM; the merge then removes its temporary output. */
export function withSignals<T>(work: (signal: AbortSignal) => Promise<T>, stopping = 'removing the unfinished output'): Promise<T> {
  const controller = new AbortController();
  let received: NodeJS.Signals | null = null;
  const onSignal = (sig: NodeJS.Signals) => {
    if (received) process.exit(SIGNAL_EXIT[sig]); // second signal: leave now
    received = sig;
    if (sig !== 'SIGHUP') err(`\n${sig}: stopping; ${stopping}...`); // no terminal after a hangup
    controller.abort();
  };
  const signals = Object.keys(SIGNAL_EXIT) as NodeJS.Signals[];
  for (const sig of signals) process.on(sig, onSignal);
  return work(controller.signal).finally(() => {
    for (const sig of signals) process.off(sig, onSignal);
    if (received) process.exitCode = SIGNAL_EXIT[received];
  });
}

export function summary(r: MergeReport): string[] {
  const lines = [
    `merged   ${r.method}: ${r.tensors.merged} tensors merged, ${r.tensors.copied} copied, ` +
      `${(r.parameters.total / 1e6).toFixed(1)} M parameters in ${r.seconds.toFixed(2)} s ` +
      `(${(r.parameters.merged / 1e6 / Math.max(r.seconds, 1e-9)).toFixed(0)} M merged parameters/s, ` +
      `${r.device && r.device !== 'cpu' ? `on ${r.device}` : `${r.threads} threads`})`,
    `read     ${formatBytes(r.bytes.read)}, wrote ${formatBytes(r.bytes.written)}`,
    `output   ${r.out}`,
    `files    ${r.files.join(', ')}`,
  ];
  for (const w of r.warnings) lines.push(`warning  ${w}`);
  return lines;
}
