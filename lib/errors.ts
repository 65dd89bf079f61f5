/**
 * Every error a user can cause is a DellaError: one message naming what is wrong and
 * where, and a stable code for scripts. Anything else reaching the CLI is a bug.
 */
export type ErrorCode =
  | 'E_RECIPE' // the recipe is malformed or asks for something invalid
  | 'E_CHECKPOINT' // a checkpoint file or directory is malformed
  | 'E_SHAPE' // models disagree on tensors or shapes
  | 'E_NONFINITE' // NaN or infinity in an input tensor to be merged, or in a merged result (an overflow)
  | 'E_IO' // reading or writing failed (disk full, permissions, ...)
  | 'E_OUTPUT' // the output location is unusable (exists, not a directory, ...)
  | 'E_ARGS' // bad command-line or API arguments
  | 'E_ABORTED' // the merge was cancelled
  | 'E_NATIVE' // the native addon could not be loaded
  | 'E_CUDA'; // the GPU asked for (--device cuda) cannot be used, or failed (no plugin, driver or GPU; out of memory)

export class DellaError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'DellaError';
    this.code = code;
  }
}

export function isDellaError(e: unknown): e is DellaError {
  return e instanceof DellaError;
}

/** An fs failure as E_IO naming what was being done; a full disk reads alike wherever it strikes. */
export function ioError(what: string, e: unknown): DellaError {
  const err = e as NodeJS.ErrnoException;
  const reason = err.code === 'ENOSPC' ? 'no space left on device' : err.message;
  return new DellaError('E_IO', `${what}: ${reason}`, { cause: e });
}
