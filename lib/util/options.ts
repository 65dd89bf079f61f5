import { DellaError } from '../errors.js';
import { showArg } from './show.js';
import { nearest } from '../recipe/params.js';

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

/**
 * Refuses an option the function does not have: a misspelt one (`threds`) or one of
 * another function (`device` given to mergeTensors, which runs on the CPU) was ignored.
 */
export function checkOptionNames(options: object, fn: string, names: readonly string[]): void {
  for (const key of Object.keys(options)) {
    if (!names.includes(key)) {
      const near = nearest(key, names); // a suggestion only for a likely typo
      const hint = near && near.distance <= Math.max(1, Math.floor(key.length / 3)) ? ` (did you mean "${near.name}"?)` : '';
      throw new DellaError('E_ARGS', `options.${key} is not an option of ${fn}${hint}; its options are ${names.join(', ')}`);
    }
  }
}
