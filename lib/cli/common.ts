/** What every command shares: argument parsing, output, signals, the run summary. */
import { parseArgs } from 'node:util';
import { DellaError } from '../errors.js';
import { packageVersion, type MergeReport } from '../merge/run.js';
import { formatBytes, parseSize } from '../util/size.js';
import { parseDevice } from '../merge/device.js';
import { HELP, USAGE } from './usage.js';

export function usageError(message: string, command?: string): DellaError {
  return new DellaError('E_ARGS', `${message}\n\n${command ? HELP[command] : USAGE.replace('{version}', packageVersion())}`);
}

export type OptionSpec = Record<string, { type: 'string' | 'boolean'; short?: string }>;
export type Parsed = { values: Record<string, string | boolean | undefined>; positionals: string[] };

export function parse(command: string, args: string[], options: OptionSpec): Parsed {
  try {
    const r = parseArgs({ args, options: { ...options, help: { type: 'boolean', short: 'h' } }, allowPositionals: true, strict: true });
    return { values: r.values as Parsed['values'], positionals: r.positionals };
  } catch (e) {
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

export const out = (s: string) => process.stdout.write(`${s}\n`);
export const err = (s: string) => process.stderr.write(`${s}\n`);

/** Cancels on SIGINT/SIGTERM; the merge then removes its temporary output. */
export function withSignals<T>(work: (signal: AbortSignal) => Promise<T>): Promise<T> {
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
