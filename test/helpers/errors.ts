/** Assertions about the DellaErrors that bad input must give. */
import { expect } from 'vitest';
import { DellaError } from '../../lib/errors.js';

/** Runs `work` and expects it to throw (or reject with) a DellaError of `code` whose message matches. */
export async function refused(work: () => unknown, code: string, message: RegExp): Promise<DellaError> {
  let err: unknown;
  try {
    await work();
  } catch (e) {
    err = e;
  }
  expect(err, String(err)).toBeInstanceOf(DellaError);
  expect((err as DellaError).code, String(err)).toBe(code);
  expect((err as DellaError).message).toMatch(message);
  return err as DellaError;
}
