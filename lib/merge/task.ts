/**
 * The kernel contract: one tensor's merge, fully resolved. The native addon
 * (mergeBatch) and lib/reference take exactly this object, so the two can be swapped
 * and compared. Codes are small integers because the binding passes them straight
 * to the C++ enums in native/include/della.
 */
import type { NativeOutputFile, NativeSlice } from '../native.js';
import { sliceBytes, type Bytes } from '../util/bytes.js';

/** The code of each float dtype in MergeTaskSpec and `reference`'s functions (the kernels' own). */
export const DTYPE_CODE = { F32: 0, F16: 1, BF16: 2, F64: 3 } as const;
export type FloatDType = keyof typeof DTYPE_CODE;
export type DTypeCode = (typeof DTYPE_CODE)[FloatDType];

/** MergeTaskSpec.sparsifier codes: how each expert's delta is sparsified (SPEC §4). */
export const SPARSIFIER_CODE = { none: 0, magprune: 1, random: 2, magnitude: 3, breadcrumbs: 4 } as const;
/** MergeTaskSpec.rescale codes: how the survivors are rescaled (SPEC §4, §6). */
export const RESCALE_CODE = { none: 0, inverse: 1, l1: 2, l2: 3, linf: 4 } as const;
/** MergeTaskSpec.consensus codes: the sign election, if any (SPEC §5). */
export const CONSENSUS_CODE = { none: 0, sum: 1, count: 2 } as const;

/** Input bytes: a typed array, or a slice of a mapped file (which the addon reads
 * without a JS buffer, and lib/reference through views of it). */
export type InputBytes = ArrayBufferView | NativeSlice;

/** An input's bytes: a slice of a map as a view, or a copy when over 4 GiB. */
export function inputView(b: InputBytes): ArrayBufferView {
  return ArrayBuffer.isView(b) ? b : sliceBytes(b);
}

export interface ExpertTask {
  data: InputBytes;
  dtype: DTypeCode;
  /** equal to the base's, or larger in every dimension (embedding sub-block rule) */
  shape: number[];
  weight: number;
  density: number;
  epsilon: number;
  /** breadcrumbs' outlier fraction */
  gamma: number;
}

export interface MergeTaskSpec {
  /** output tensor name: its FNV-1a hash is the Philox tensor id */
  name: string;
  /** null: a plain weighted combination of the experts' values (linear, slerp) */
  base: InputBytes | null;
  baseDtype: DTypeCode;
  out: ArrayBufferView;
  outDtype: DTypeCode;
  shape: number[];
  experts: ExpertTask[];
  sparsifier: number;
  rescale: number;
  consensus: number;
  normalize: boolean;
  lambda: number;
  seed: number;
  /**
   * lib/reference only: the flat index of this task's first element in its tensor,
   * when a task holds some rows of a larger tensor (verification recomputes rows).
   */
  flatOffset?: number;
}

/**
 * A merge's output written straight to its place in an output file, slab by slab of
 * whole rows through `buffer` (two slabs: one merged into while the other is written),
 * by the native CPU kernels only. Memory for the tensor is then `buffer`, not its size.
 */
export interface FileOutput {
  file: NativeOutputFile;
  /** the tensor's absolute offset in the file */
  offset: number;
  /** block-aligned (allocStaging's); each half holds a slab */
  buffer: Bytes;
}

/** What the native addon takes: a MergeTaskSpec whose output may go to a file. */
export type NativeMergeTaskSpec = Omit<MergeTaskSpec, 'out'> & { out: ArrayBufferView | FileOutput };

export interface CopyTaskSpec {
  src: InputBytes;
  dst: ArrayBufferView;
}

export interface MergeTaskStats {
  /** non-finite input values: [base, expert 0, expert 1, ...] */
  nonfinite: number[];
  /** per expert: elements of its delta that survived sparsification */
  kept: number[];
  /** merged values stored as NaN or infinity: from non-finite inputs, or an overflow of the output dtype */
  outNonfinite: number;
  numel: number;
  /** XXH64 of the output bytes, as 16 hex digits, when the batch asked for digests */
  xxh64?: string;
}

export interface DotTaskSpec {
  a: InputBytes;
  aDtype: DTypeCode;
  b: InputBytes;
  bDtype: DTypeCode;
  shape: number[];
}

/** Sums for slerp in binary64 (row partials in index order, rows in order). */
export interface DotStats {
  dot: number;
  aa: number;
  bb: number;
  nonfinite: [number, number];
}

export interface BatchSpec {
  threads: number;
  merges: NativeMergeTaskSpec[];
  copies: CopyTaskSpec[];
  /** run the merges on this CUDA device (opened with cudaOpen), with this memory budget in bytes */
  cuda?: { device: number; memory: number } | null;
  /** CPU merges only: also hash each merge's output as it is written (stats' xxh64) */
  digests?: boolean;
  /** set its first byte to stop the merges written to files (FileOutput) before their next slab */
  cancel?: Uint8Array;
}
