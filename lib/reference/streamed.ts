/**
 * Some rows of a tensor whose sparsifier or rescale looks at the whole tensor (TIES's
 * and breadcrumbs' cuts, the l1/l2/linf norm rescales), recomputed in memory bounded by
 * a row, not by the tensor: the whole-tensor facts a row needs are gathered first, in
 * passes over the rows, and then only the rows asked for are merged. The result equals
 * referenceMergeTensor's rows bit for bit (test/reference.test.ts); that function holds
 * whole-tensor arrays (binary64 deltas, JS arrays of keys), which for an embedding of
 * 500 M elements meant tens of GB, and JS arrays stop at about 134 M elements.
 *
 * A cut at ascending rank r (r elements before it in the order of SPEC §4: key, then
 * index) is (T, w): element i is before it when key_i < T, or key_i = T and fewer than
 * w elements of key T come before i. Found with two 16-bit histograms of the keys.
 */
import type { InputBytes, MergeTaskSpec, MergeTaskStats } from '../merge/task.js';
import { RESCALE_CODE, SPARSIFIER_CODE, type DTypeCode } from '../merge/task.js';
import { allocBytes, sliceBytes, type Bytes } from '../util/bytes.js';
import { dataView, dtypeSize, loadF32, magnitudeKey, storeF32 } from './dtypes.js';
import { tensorId } from './fnv.js';
import { fuseElement } from './fuse.js';
import { expertRowOffset, type ElementProbe } from './merge-tensor.js';
import { elementUniform } from './philox.js';
import { breadcrumbsWindow, magpruneQ, stableRanks } from './sparsify.js';

/** Rows of an input read through views of at most this many bytes (a map's slice). */
const BLOCK_BYTES = 64 << 20;

/** Row r of an input as fp32 values, through one view (bytes in memory) or views of blocks of rows (a map's slice). */
function rowReader(v: InputBytes, dtype: DTypeCode, offsetOf: (r: number) => number, n: number, rows: number, blockBytes: number) {
  const size = dtypeSize(dtype);
  let view: DataView | null = ArrayBuffer.isView(v) ? dataView(v) : null;
  let first = 0, end = ArrayBuffer.isView(v) ? rows : 0, at = 0; // rows [first, end) in view, from element `at`
  const block = Math.max(1, Math.floor(blockBytes / Math.max(1, n * size)));
  return (r: number, into: Float64Array): void => {
    if (r < first || r >= end) {
      first = r;
      end = Math.min(rows, r + block);
      at = offsetOf(first);
      view = dataView(sliceBytes(v as Exclude<InputBytes, ArrayBufferView>, at * size, (offsetOf(end - 1) + n) * size));
    }
    const o = ArrayBuffer.isView(v) ? offsetOf(r) : offsetOf(r) - at;
    for (let j = 0; j < n; j++) into[j] = loadF32(view!, dtype, o + j);
  };
}

interface Cut {
  key: number;
  /** elements of this key before the cut */
  w: number;
  /** elements of this key in all */
  equal: number;
}

/** Past every element (a cut at rank numel or more). */
const END: Cut = { key: Infinity, w: 0, equal: 0 };

/** Cuts at ascending ranks `ranks` of the `count` keys that `scan` visits (two passes). */
function cutsAt(ranks: readonly number[], count: number, scan: (visit: (key: number) => void) => void): Cut[] {
  if (ranks.every((r) => r >= count)) return ranks.map(() => END);
  const hi = new Float64Array(65536);
  scan((key) => { hi[key >>> 16]++; });
  const picks = ranks.map((r) => {
    let below = 0, h = 0;
    if (r < count) while (below + hi[h] <= r) below += hi[h++];
    return { r, h, below, lo: new Float64Array(65536) };
  });
  scan((key) => {
    for (const p of picks) if (key >>> 16 === p.h) p.lo[key & 0xffff]++;
  });
  return picks.map(({ r, h, below, lo }) => {
    if (r >= count) return END;
    let l = 0;
    while (below + lo[l] <= r) below += lo[l++];
    return { key: h * 65536 + l, w: r - below, equal: lo[l] };
  });
}

/** Whether an element of `key`, the `seen`-th of that key in index order, is before the cut. */
const before = (c: Cut, key: number, seen: number) => key < c.key || (key === c.key && seen < c.w);

/** `blockBytes`: the most bytes of a map's slice viewed at once (smaller in tests). */
export function streamedMergeRows(
  t: MergeTaskSpec, rows: readonly number[], probe?: ElementProbe, blockBytes = BLOCK_BYTES,
): { rows: Bytes[]; stats: MergeTaskStats } {
  const numel = t.shape.reduce((a, b) => a * b, 1);
  const n = t.shape.length >= 2 ? t.shape[t.shape.length - 1] : numel;
  const R = n === 0 ? 0 : numel / n;
  const K = t.experts.length;
  const id = tensorId(t.name);
  const outSize = dtypeSize(t.outDtype);
  const stats: MergeTaskStats = { nonfinite: new Array(K + 1).fill(0), kept: new Array(K).fill(0), outNonfinite: 0, numel: 0 };
  const readBase = rowReader(t.base!, t.baseDtype, (r) => r * n, n, R, blockBytes);
  const readExpert = t.experts.map((e) => rowReader(e.data, e.dtype, (r) => expertRowOffset(t.shape, e.shape, r, n), n, R, blockBytes));
  const b = new Float64Array(n), x = new Float64Array(n);
  /** Row r of expert k's delta into d (and the base row into b). */
  const deltaRow = (k: number, r: number, d: Float64Array) => {
    readBase(r, b);
    readExpert[k](r, x);
    for (let j = 0; j < n; j++) d[j] = Math.fround(x[j] - b[j]);
  };
  const d = new Float64Array(n), q = new Float64Array(n), keep = new Uint8Array(n);
  const uniform = (k: number, i: number) => elementUniform(t.seed, id, k, (t.flatOffset ?? 0) + i);

  // Per expert: its cuts, the number of each cut's key before every row asked for, and
  // the norm rescale's scale.
  const facts = t.experts.map((e, k) => {
    if (t.sparsifier === SPARSIFIER_CODE.none || e.density >= 1) return null;
    const keyOf = (v: number) => magnitudeKey(v, t.baseDtype);
    const scan = (visit: (key: number) => void) => {
      for (let r = 0; r < R; r++) {
        deltaRow(k, r, d);
        for (let j = 0; j < n; j++) visit(keyOf(d[j]));
      }
    };
    // breadcrumbs keeps the ascending ranks [lo, hi). magnitude keeps the top `count` in
    // descending key, ascending index: every key above the cut's, and of the cut's key
    // the first (by index) `count` - #{above}, which is not a cut in ascending order.
    let lo = END, hi = END, top: { key: number; need: number } | null = null;
    if (t.sparsifier === SPARSIFIER_CODE.magnitude) {
      const count = Math.floor(e.density * numel);
      if (count === 0) top = { key: Infinity, need: 0 };
      else {
        const [c] = cutsAt([numel - count], numel, scan);
        const above = numel - (numel - count - c.w) - c.equal; // #{key > c.key}
        top = { key: c.key, need: count - above };
      }
    } else if (t.sparsifier === SPARSIFIER_CODE.breadcrumbs) {
      const { bottom, top: high } = breadcrumbsWindow(numel, e.density, e.gamma);
      [lo, hi] = cutsAt([bottom, numel - high], numel, scan);
    }
    const cuts = t.sparsifier === SPARSIFIER_CODE.magnitude || t.sparsifier === SPARSIFIER_CODE.breadcrumbs;
    return { lo, hi, top, cuts, seenAt: new Map<number, [number, number]>(), scale: 1 };
  });

  /** Keep decisions and probabilities of row r of expert k (its delta in d); `seen`: keys of the cuts met so far. */
  const decide = (k: number, r: number, seen: [number, number]) => {
    const e = t.experts[k], f = facts[k]!;
    const i0 = r * n;
    q.fill(0);
    if (t.sparsifier === SPARSIFIER_CODE.magprune) {
      const ranks = stableRanks(Array.from(d, (v) => magnitudeKey(v, t.baseDtype)));
      for (let j = 0; j < n; j++) {
        q[j] = magpruneQ(ranks[j], n, e.density, e.epsilon);
        keep[j] = uniform(k, i0 + j) < q[j] ? 1 : 0;
      }
    } else if (t.sparsifier === SPARSIFIER_CODE.random) {
      for (let j = 0; j < n; j++) {
        q[j] = Math.fround(e.density);
        keep[j] = uniform(k, i0 + j) < q[j] ? 1 : 0;
      }
    } else if (f.top) {
      for (let j = 0; j < n; j++) {
        const key = magnitudeKey(d[j], t.baseDtype);
        keep[j] = key > f.top.key || (key === f.top.key && seen[0] < f.top.need) ? 1 : 0;
        if (key === f.top.key) seen[0]++;
      }
    } else {
      for (let j = 0; j < n; j++) {
        const key = magnitudeKey(d[j], t.baseDtype);
        keep[j] = !before(f.lo, key, seen[0]) && before(f.hi, key, seen[1]) ? 1 : 0;
        if (key === f.lo.key) seen[0]++;
        if (key === f.hi.key) seen[1]++;
      }
    }
  };

  // One pass over every row of each expert that needs one: the cuts' keys seen before
  // each row asked for, and the norm sums (binary64; row partials in index order, rows in order).
  const norm = t.rescale === RESCALE_CODE.l1 || t.rescale === RESCALE_CODE.l2 || t.rescale === RESCALE_CODE.linf;
  const wanted = new Set(rows);
  t.experts.forEach((_, k) => {
    const f = facts[k];
    if (!f || (!norm && !f.cuts)) return;
    const seen: [number, number] = [0, 0];
    let full = 0, kept = 0;
    for (let r = 0; r < R; r++) {
      if (wanted.has(r)) f.seenAt.set(r, [seen[0], seen[1]]);
      deltaRow(k, r, d);
      decide(k, r, seen);
      if (!norm) continue;
      let rowFull = 0, rowKept = 0;
      for (let j = 0; j < n; j++) {
        const m = t.rescale === RESCALE_CODE.l2 ? d[j] * d[j] : Math.abs(d[j]);
        if (t.rescale === RESCALE_CODE.linf) {
          rowFull = Math.max(rowFull, m);
          if (keep[j]) rowKept = Math.max(rowKept, m);
        } else {
          rowFull += m;
          if (keep[j]) rowKept += m;
        }
      }
      if (t.rescale === RESCALE_CODE.linf) {
        full = Math.max(full, rowFull);
        kept = Math.max(kept, rowKept);
      } else {
        full += rowFull;
        kept += rowKept;
      }
    }
    if (t.rescale === RESCALE_CODE.l2) {
      full = Math.sqrt(full);
      kept = Math.sqrt(kept);
    }
    if (norm) f.scale = Math.fround(full < 1e-7 || kept < 1e-7 ? 1 : full / kept);
  });

  // The rows asked for.
  const w = t.experts.map((e) => Math.fround(e.weight));
  const fuse = { consensus: t.consensus, normalize: t.normalize, lambda: t.lambda };
  const raws = t.experts.map(() => new Float64Array(n)), sparse = t.experts.map(() => new Float64Array(n));
  const p = new Float64Array(K);
  const out = rows.map((r) => {
    const row = allocBytes(n * outSize);
    const ov = dataView(row);
    for (let k = 0; k < K; k++) {
      deltaRow(k, r, d);
      raws[k].set(d);
      for (let j = 0; j < n; j++) if (!Number.isFinite(x[j])) stats.nonfinite[k + 1]++;
      const f = facts[k];
      if (!f) {
        sparse[k].set(d);
        stats.kept[k] += n;
        continue;
      }
      decide(k, r, [...(f.seenAt.get(r) ?? [0, 0])] as [number, number]);
      for (let j = 0; j < n; j++) {
        if (!keep[j]) {
          sparse[k][j] = 0;
          continue;
        }
        stats.kept[k]++;
        if (t.rescale === RESCALE_CODE.inverse) sparse[k][j] = Math.fround(d[j] * Math.fround(1 / q[j]));
        else if (t.rescale !== RESCALE_CODE.none) sparse[k][j] = Math.fround(d[j] * f.scale);
        else sparse[k][j] = d[j];
      }
    }
    readBase(r, b);
    for (let j = 0; j < n; j++) {
      if (!Number.isFinite(b[j])) stats.nonfinite[0]++;
      for (let k = 0; k < K; k++) p[k] = Math.fround(w[k] * sparse[k][j]);
      const m = fuseElement(p, w, fuse);
      storeF32(ov, t.outDtype, j, Math.fround(b[j] + m));
      if (!Number.isFinite(loadF32(ov, t.outDtype, j))) stats.outNonfinite++;
      if (probe) probe(r * n + j, raws.map((a) => a[j]), sparse.map((a) => a[j]), m);
    }
    stats.numel += n;
    return row;
  });
  return { rows: out, stats };
}
