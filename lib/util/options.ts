import { DellaError } from '../errors.js';
import { showArg, showShort } from './show.js';
import { nearest } from '../recipe/params.js';

/**
 * What an option of the API may be: a JavaScript kind, one of a few strings, or
 * 'checked' for one whose value the function checks itself (a seed's range, say).
 */
export type OptionKind = 'boolean' | 'function' | 'string' | 'AbortSignal' | 'checked' | readonly string[];

function describe(kind: Exclude<OptionKind, 'checked'>): string {
  if (typeof kind !== 'string') return kind.map((s) => JSON.stringify(s)).join(' or ');
  return { boolean: 'true or false', function: 'a function', string: 'a string', AbortSignal: 'an AbortSignal' }[kind];
}

/**
 * Checks the options object an API function took from JavaScript against its `spec`
 * (every option it has, and its kind), before anything runs; undefined is the option's
 * default. Without it an option the function does not have was ignored (a misspelt
 * `threds`, or `device` given to mergeTensors, which runs on the CPU), `overwrite: 'no'`
 * counted as true, and an onProgress that is not a function failed mid-merge.
 * `signature` names the function in messages, as "merge(recipe, options)"; `nullHandled`
 * lists the options whose null the function refuses with its own message.
 */
export function checkOptions(options: unknown, signature: string, spec: Readonly<Record<string, OptionKind>>, nullHandled: readonly string[] = []): void {
  if (options === null || typeof options !== 'object') {
    throw new DellaError('E_ARGS', `${signature}: options must be an object, got ${showArg(options)}`);
  }
  const names = Object.keys(spec);
  for (const key of Object.keys(options)) {
    if (!Object.hasOwn(spec, key)) {
      const meant = likelyMeant(key, names);
      const hint = meant ? ` (did you mean "${meant}"?)` : '';
      throw new DellaError('E_ARGS', `options.${key} is not an option of ${signature.slice(0, signature.indexOf('('))}${hint}; its options are ${names.join(', ')}`);
    }
  }
  for (const [key, kind] of Object.entries(spec)) {
    const v = (options as Record<string, unknown>)[key];
    // null is refused alike for every option (some took it as the default, others
    // refused it, and one misread it), except where the function says what it wanted.
    if (v === null && !nullHandled.includes(key)) {
      throw new DellaError('E_ARGS', `options.${key} is null: leave it out (or undefined) for its default`);
    }
    if (v === undefined || kind === 'checked') continue;
    const ok = typeof kind !== 'string' ? kind.includes(v as string)
      : kind === 'AbortSignal' ? v instanceof AbortSignal : typeof v === kind;
    if (!ok) throw new DellaError('E_ARGS', `options.${key} must be ${describe(kind)}, got ${showArg(v)}`);
  }
}

/** The name `word` is likely a typo of (the nearest, within a third of its length), or null. */
export function likelyMeant(word: string, names: readonly string[]): string | null {
  const near = nearest(word, names);
  return near && near.distance <= Math.max(1, Math.floor(word.length / 3)) ? near.name : null;
}

/** A thread count as the API takes it: an integer from 1 to 1024. */
export function checkThreads(threads: unknown, given: unknown = threads): void {
  if (!Number.isInteger(threads) || (threads as number) < 1 || (threads as number) > 1024) {
    throw new DellaError('E_ARGS', `threads must be an integer from 1 to 1024, got ${showShort(given)}`);
  }
}
