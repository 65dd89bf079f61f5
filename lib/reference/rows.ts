/**
 * Recomputes chosen rows of a tensor with the reference, for verification: alone when
 * a row's result depends only on that row, after passes over the whole tensor when it
 * does not (TIES and breadcrumbs cut over the whole tensor; norm rescales sum over it:
 * streamed.ts).
 */
import type { MergeTaskSpec, MergeTaskStats } from '../merge/task.js';
import { RESCALE_CODE, SPARSIFIER_CODE, type InputBytes } from '../merge/task.js';
import { dtypeSize } from './dtypes.js';
import { allocBytes, sliceBytes, subBytes, type Bytes } from '../util/bytes.js';
import { expertRowOffset, geometry, referenceMergeTensor, type ElementProbe } from './merge-tensor.js';
import { streamedMergeRows } from './streamed.js';

export function needsWholeTensor(t: MergeTaskSpec): boolean {
  return t.base !== null && wholeTensorSparsifier(t.sparsifier, t.rescale);
}

/** Whether a delta's sparsifier or its rescale looks at the whole tensor (SPARSIFIER_CODE, RESCALE_CODE). */
export function wholeTensorSparsifier(sparsifier: number, rescale: number): boolean {
  const wholeCut = sparsifier === SPARSIFIER_CODE.magnitude || sparsifier === SPARSIFIER_CODE.breadcrumbs;
  const norm = rescale === RESCALE_CODE.l1 || rescale === RESCALE_CODE.l2 || rescale === RESCALE_CODE.linf;
  return sparsifier !== SPARSIFIER_CODE.none && (wholeCut || norm);
}

export interface RowsResult {
  /** the output bytes of each requested row, in the order asked */
  rows: Bytes[];
  /** statistics over the rows asked for */
  stats: MergeTaskStats;
}

/** Elements [from, from + n) of an input whose elements are `size` bytes (a slice of a
 * map is viewed only there: verify recomputes a few rows of tensors of any size). */
function elements(v: InputBytes, from: number, n: number, size: number): Bytes {
  return ArrayBuffer.isView(v) ? subBytes(v, from * size, (from + n) * size) : sliceBytes(v, from * size, (from + n) * size);
}

/**
 * The probe sees the elements of the requested rows only. `intoOut`: each row is written
 * at its place in `t.out` (the rows returned are views of it), else `t.out` is ignored.
 */
export function referenceMergeRows(t: MergeTaskSpec, rows: readonly number[], probe?: ElementProbe, intoOut = false): RowsResult {
  const { n } = geometry(t.shape);
  const outSize = dtypeSize(t.outDtype);
  if (needsWholeTensor(t)) return streamedMergeRows(t, rows, probe, { intoOut });
  const K = t.experts.length;
  const stats: MergeTaskStats = { nonfinite: new Array(K + 1).fill(0), kept: new Array(K).fill(0), outNonfinite: 0, numel: 0 };
  const inSize = dtypeSize(t.baseDtype);
  const out = rows.map((r) => {
    const row: MergeTaskSpec = {
      ...t,
      shape: [n],
      flatOffset: r * n,
      base: t.base && elements(t.base, r * n, n, inSize),
      out: intoOut ? subBytes(t.out, r * n * outSize, (r + 1) * n * outSize) : allocBytes(n * outSize),
      experts: t.experts.map((e) => {
        const size = dtypeSize(e.dtype);
        const off = expertRowOffset(t.shape, e.shape, r, n);
        return { ...e, shape: [n], data: elements(e.data, off, n, size) };
      }),
    };
    const s = referenceMergeTensor(row, probe && ((i, raw, sp, m) => probe(r * n + i, raw, sp, m)));
    s.nonfinite.forEach((c, k) => { stats.nonfinite[k] += c; });
    s.kept.forEach((c, k) => { stats.kept[k] += c; });
    stats.outNonfinite += s.outNonfinite;
    stats.numel += s.numel;
    return row.out as Bytes;
  });
  return { rows: out, stats };
}

/** Tensors up to this many elements are merged whole by referenceMergeTensor. */
const WHOLE_ELEMENTS = 1 << 24;

/**
 * The reference backend's merge of one tensor into t.out: referenceMergeTensor, whose
 * whole-tensor binary64 arrays (8 bytes an element per input) and JS arrays of keys
 * (which stop at about 134 M elements) do not scale, for tensors up to `wholeElements`;
 * row by row beyond it, after streamed.ts's passes where a row needs the whole tensor.
 * The bytes and statistics are the same either way (test/streamed-rows.test.ts).
 */
export function referenceMergeInto(t: MergeTaskSpec, wholeElements = WHOLE_ELEMENTS): MergeTaskStats {
  const { numel, rows } = geometry(t.shape);
  if (numel <= wholeElements) return referenceMergeTensor(t);
  return referenceMergeRows(t, Array.from({ length: rows }, (_, r) => r), undefined, true).stats;
}
