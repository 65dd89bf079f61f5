import { DellaError } from '../errors.js';
import { showArg } from './show.js';

/** What an option of the API may be: a JavaScript kind, or one of a few strings. */
export type OptionKind = 'boolean' | 'function' | 'string' | 'AbortSignal' | readonly string[];

function describe(kind: OptionKind): string {
  if (typeof kind !== 'string') return kind.map((s) => JSON.stringify(s)).join(' or ');
  return { boolean: 'true or false', function: 'a function', string: 'a string', AbortSignal: 'an AbortSignal' }[kind];
}

/**
 * Checks the kinds of the options an API function took from JavaScript, before anything
 * runs; undefined is the option's default. Without it `overwrite: 'no'` would count as
 * true, and an onProgress that is not a function would fail mid-merge.
 */
export function checkOptionKinds(options: object, kinds: Record<string, OptionKind>): void {
  for (const [key, kind] of Object.entries(kinds)) {
    const v = (options as Record<string, unknown>)[key];
    if (v === undefined) continue;
    const ok = typeof kind !== 'string' ? kind.includes(v as string)
      : kind === 'AbortSignal' ? v instanceof AbortSignal : typeof v === kind;
    if (!ok) throw new DellaError('E_ARGS', `options.${key} must be ${describe(kind)}, got ${showArg(v)}`);
  }
}
