/**
 * Some rows of a tensor whose sparsifier or rescale looks at the whole tensor (TIES's
 * and breadcrumbs' cuts, the l1/l2/linf norm rescales), recomputed in memory bounded by
 * a row, not by the tensor: the whole-tensor facts a row needs are gathered first, in
 * passes over the rows, and then only the rows asked for are merged. The result equals
 * referenceMergeTensor's rows bit for bit (test/streamed-rows.test.ts); that function
 * holds whole-tensor arrays (binary64 deltas, JS arrays of keys), which for an embedding
 * of 500 M elements meant tens of GB, and JS arrays stop at about 134 M elements.
 *
 * A cut at ascending rank r (r elements before it in the order of SPEC §4: key, then
 * index) is (T, w): element i is before it when key_i < T, or key_i = T and fewer than
 * w elements of key T come before i. Found with two 16-bit histograms of the keys, of
 * which the first is trivial for the 15-bit keys of half-precision bases.
 *
 * Each pass reads a base row once for all experts, and works on whole rows of typed
 * arrays (verify spends most of its time here: a TIES verify of a BF16 model is one
 * pass over every merged element of every expert).
 */
import type { InputBytes, MergeTaskSpec, MergeTaskStats } from '../merge/task.js';
import { DTYPE_CODE, RESCALE_CODE, SPARSIFIER_CODE, type DTypeCode } from '../merge/task.js';
import { allocBytes, sliceBytes, subBytes, type Bytes } from '../util/bytes.js';
import { dataView, dtypeSize, loadF32, loadF32Row, magnitudeKeys, storeF32 } from './dtypes.js';
import { tensorId } from './fnv.js';
import { fuseElement } from './fuse.js';
import { expertRowOffset, geometry, type ElementProbe } from './merge-tensor.js';
import { elementUniform } from './philox.js';
import { breadcrumbsWindow, magpruneQ, stableRanks } from './sparsify.js';

/** Rows of an input read through views of at most this many bytes (a map's slice). */
const BLOCK_BYTES = 64 << 20;

/**
 * Counts of the cuts' keys before each row asked for are taken from copies of the
 * second histograms at those rows (no further pass over the tensor) while the copies
 * take at most this many bytes (256 KiB each); beyond it (many rows asked for) a third
 * pass counts them.
 */
const SNAPSHOT_BYTES = 64 << 20;

/** Row r of an input as fp32 values, through one view (bytes in memory) or views of blocks of rows (a map's slice). */
function rowReader(v: InputBytes, dtype: DTypeCode, offsetOf: (r: number) => number, n: number, rows: number, blockBytes: number) {
  const size = dtypeSize(dtype);
  const inMemory = ArrayBuffer.isView(v);
  let view: ArrayBufferView | null = inMemory ? v : null;
  let first = 0, end = inMemory ? rows : 0, at = 0; // rows [first, end) in view, from element `at`
  const block = Math.max(1, Math.floor(blockBytes / Math.max(1, n * size)));
  return (r: number, into: Float32Array): void => {
    if (r < first || r >= end) {
      first = r;
      end = Math.min(rows, r + block);
      at = offsetOf(first);
      view = sliceBytes(v as Exclude<InputBytes, ArrayBufferView>, at * size, (offsetOf(end - 1) + n) * size);
    }
    loadF32Row(view!, dtype, inMemory ? offsetOf(r) : offsetOf(r) - at, n, into);
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

/** Counts of keys by their low 16 bits (binary64 only for tensors of 2^32 elements or more). */
type Counts = Uint32Array | Float64Array;

/**
 * Where the cut at ascending rank r lies: among the keys whose high 16 bits are h, of
 * which `lo` counts the low 16 bits; `below` keys have lower high bits.
 */
interface Pick {
  r: number;
  h: number;
  below: number;
  lo: Counts;
}

function cutOf(p: Pick): Cut {
  let below = p.below, l = 0;
  while (below + p.lo[l] <= p.r) below += p.lo[l++];
  return { key: p.h * 65536 + l, w: p.r - below, equal: p.lo[l] };
}

interface ExpertFacts {
  /** ascending ranks of the cuts: magnitude's one, breadcrumbs' two */
  ranks: number[];
  /** breadcrumbs keeps the ascending ranks [lo, hi) */
  lo: Cut;
  hi: Cut;
  /**
   * magnitude keeps the top `count` in descending key, ascending index: every key above
   * the cut's, and of the cut's key the first (by index) `need`, which is not a cut in
   * ascending order.
   */
  top: { key: number; need: number } | null;
  cuts: boolean;
  /** per row asked for: the elements of each cut's key before it */
  seenAt: Map<number, [number, number]>;
  /** the norm rescale's factor */
  scale: number;
  /** by 15-bit key: 1 kept, 0 dropped, CUT_KEY a cut's key (its elements are counted) */
  classes: Uint8Array | null;
}

const CUT_KEY = 2;

/** The classes of every 15-bit key under magnitude's top or breadcrumbs' window. */
function keyClasses(f: ExpertFacts): Uint8Array {
  const classes = new Uint8Array(1 << 15);
  for (let key = 0; key < classes.length; key++) {
    if (f.top) classes[key] = key === f.top.key ? CUT_KEY : +(key > f.top.key);
    else classes[key] = key === f.lo.key || key === f.hi.key ? CUT_KEY : +(key > f.lo.key && key < f.hi.key);
  }
  return classes;
}

/** Where the rows go, and sizes that tests make smaller to reach every path. */
export interface StreamedOptions {
  /** write row r at its place in t.out (the rows returned are views of it), rather than into new memory */
  intoOut?: boolean;
  /** the most bytes of a map's slice viewed at once */
  blockBytes?: number;
  /** the most bytes of histogram copies (beyond it, a third pass) */
  snapshotBytes?: number;
}

export function streamedMergeRows(
  t: MergeTaskSpec, rows: readonly number[], probe?: ElementProbe,
  { intoOut = false, blockBytes = BLOCK_BYTES, snapshotBytes = SNAPSHOT_BYTES }: StreamedOptions = {},
): { rows: Bytes[]; stats: MergeTaskStats } {
  const { numel, n, rows: R } = geometry(t.shape);
  const K = t.experts.length;
  const bad = rows.find((r) => !Number.isInteger(r) || r < 0 || r >= R);
  if (bad !== undefined) throw new RangeError(`row ${bad} of a tensor of ${R} rows`);
  const id = tensorId(t.name);
  const outSize = dtypeSize(t.outDtype);
  const stats: MergeTaskStats = { nonfinite: new Array(K + 1).fill(0), kept: new Array(K).fill(0), outNonfinite: 0, numel: 0 };
  const readBase = rowReader(t.base!, t.baseDtype, (r) => r * n, n, R, blockBytes);
  const readExpert = t.experts.map((e) => rowReader(e.data, e.dtype, (r) => expertRowOffset(t.shape, e.shape, r, n), n, R, blockBytes));
  const b = new Float32Array(n), x = new Float32Array(n), d = new Float32Array(n), keys = new Uint32Array(n);
  const q = new Float64Array(n), keep = new Uint8Array(n);
  const uniform = (k: number, i: number) => elementUniform(t.seed, id, k, (t.flatOffset ?? 0) + i);
  const halfKeys = t.baseDtype === DTYPE_CODE.BF16 || t.baseDtype === DTYPE_CODE.F16; // 15 bits, else 31

  /** Expert k's delta in row r into d, and its keys into `keys` (the base row is in b). */
  const deltaRow = (k: number, r: number) => {
    readExpert[k](r, x);
    for (let j = 0; j < n; j++) d[j] = x[j] - b[j]; // the Float32Array rounds: an fp32 subtraction
    magnitudeKeys(d, t.baseDtype, n, keys);
  };
  /** A pass over every row, the base's read once: visit(k, r) sees the delta of each of `experts` in turn. */
  const pass = (experts: readonly number[], visit: (k: number, r: number) => void, atRow?: (r: number) => void) => {
    if (experts.length === 0) return;
    for (let r = 0; r < R; r++) {
      atRow?.(r);
      readBase(r, b);
      for (const k of experts) {
        deltaRow(k, r);
        visit(k, r);
      }
    }
  };

  const facts: (ExpertFacts | null)[] = t.experts.map((e) => {
    if (t.sparsifier === SPARSIFIER_CODE.none || e.density >= 1) return null;
    const f: ExpertFacts = { ranks: [], lo: END, hi: END, top: null, cuts: false, seenAt: new Map(), scale: 1, classes: null };
    if (t.sparsifier === SPARSIFIER_CODE.magnitude) {
      const count = Math.floor(e.density * numel);
      if (count > 0) f.ranks = [numel - count];
      else f.top = { key: Infinity, need: 0 }; // keeps nothing
      f.cuts = true;
    } else if (t.sparsifier === SPARSIFIER_CODE.breadcrumbs) {
      const { bottom, top } = breadcrumbsWindow(numel, e.density, e.gamma);
      f.ranks = [bottom, numel - top];
      f.cuts = true;
    }
    return f;
  });
  const all = t.experts.map((_, k) => k);
  const cutters = all.filter((k) => facts[k]?.ranks.some((r) => r < numel));

  // The cuts, from two 16-bit histograms of the keys: one pass for the high 16 bits (none
  // for 15-bit keys), one for the low 16 bits of the keys whose high bits hold a cut.
  const his = all.map((k) => (!halfKeys && cutters.includes(k) ? new Float64Array(65536) : null));
  pass(halfKeys ? [] : cutters, (k) => {
    const hi = his[k]!;
    for (let j = 0; j < n; j++) hi[keys[j] >>> 16]++;
  });
  const los = all.map(() => new Map<number, Counts>());
  const wideCounts = numel >= 2 ** 32;
  const newCounts = (): Counts => (wideCounts ? new Float64Array(65536) : new Uint32Array(65536));
  const picks = all.map((k) => (facts[k]?.ranks ?? []).map((r): Pick | null => {
    if (r >= numel) return null;
    let below = 0, h = 0;
    const hi = his[k];
    if (hi) while (below + hi[h] <= r) below += hi[h++];
    let lo = los[k].get(h);
    if (!lo) los[k].set(h, (lo = newCounts()));
    return { r, h, below, lo };
  }));
  // The elements of each cut's key before a row asked for are read from copies of the
  // histograms taken at that row, when they are few enough.
  const histograms = cutters.reduce((sum, k) => sum + los[k].size, 0);
  const rowsAsked = new Set(rows);
  const snapshots = rowsAsked.size * histograms * 65536 * (wideCounts ? 8 : 4) <= snapshotBytes;
  const copiesAt = new Map<number, Map<Counts, Counts>>();
  pass(cutters, (k) => {
    for (const [h, lo] of los[k]) {
      if (halfKeys) for (let j = 0; j < n; j++) lo[keys[j]]++;
      else for (let j = 0; j < n; j++) if (keys[j] >>> 16 === h) lo[keys[j] & 0xffff]++;
    }
  }, snapshots ? (r) => {
    if (!rowsAsked.has(r)) return;
    const copies = new Map<Counts, Counts>();
    for (const k of cutters) for (const lo of los[k].values()) copies.set(lo, lo.slice());
    copiesAt.set(r, copies);
  } : undefined);
  for (const k of cutters) {
    const f = facts[k]!;
    const cuts = picks[k].map((p) => (p ? cutOf(p) : END));
    if (t.sparsifier === SPARSIFIER_CODE.magnitude) {
      const c = cuts[0], count = numel - f.ranks[0];
      const above = numel - (f.ranks[0] - c.w) - c.equal; // #{key > c.key}
      f.top = { key: c.key, need: count - above };
    } else {
      [f.lo, f.hi] = cuts;
    }
    if (halfKeys) f.classes = keyClasses(f);
    if (snapshots) {
      for (const [r, copies] of copiesAt) {
        const seen = picks[k].map((p, i) => (p ? copies.get(p.lo)![cuts[i].key & 0xffff] : 0));
        f.seenAt.set(r, [seen[0], seen[1] ?? 0]);
      }
    }
  }

  /** Keep decisions and probabilities of row r of expert k (its delta in d, keys in `keys`); `seen`: keys of the cuts met so far. */
  const decide = (k: number, r: number, seen: [number, number]) => {
    const e = t.experts[k], f = facts[k]!;
    const i0 = r * n;
    q.fill(0);
    if (t.sparsifier === SPARSIFIER_CODE.magprune) {
      const ranks = stableRanks(keys);
      for (let j = 0; j < n; j++) {
        q[j] = magpruneQ(ranks[j], n, e.density, e.epsilon);
        keep[j] = uniform(k, i0 + j) < q[j] ? 1 : 0;
      }
    } else if (t.sparsifier === SPARSIFIER_CODE.random) {
      for (let j = 0; j < n; j++) {
        q[j] = Math.fround(e.density);
        keep[j] = uniform(k, i0 + j) < q[j] ? 1 : 0;
      }
    } else {
      // The cut keys' elements are counted in index order. Every other key's fate is
      // fixed: with 15-bit keys it is looked up (comparisons of random keys would be
      // mispredicted branches, several times the cost), else computed without branches.
      const top = f.top, table = f.classes;
      const loKey = top ? top.key : f.lo.key, loW = top ? 0 : f.lo.w;
      const hiKey = top ? Infinity : f.hi.key, hiW = f.hi.w, need = top ? top.need : 0;
      let s0 = seen[0], s1 = seen[1];
      for (let j = 0; j < n; j++) {
        const key = keys[j];
        if (table) {
          const c = table[key];
          if (c !== CUT_KEY) {
            keep[j] = c;
            continue;
          }
        } else if (key !== loKey && key !== hiKey) {
          keep[j] = top ? +(key > loKey) : +(key > loKey) & +(key < hiKey);
          continue;
        }
        if (top) keep[j] = key > loKey || (key === loKey && s0 < need) ? 1 : 0;
        else keep[j] = (key > loKey || (key === loKey && s0 >= loW)) && (key < hiKey || (key === hiKey && s1 < hiW)) ? 1 : 0;
        if (key === loKey) s0++;
        if (key === hiKey) s1++;
      }
      seen[0] = s0;
      seen[1] = s1;
    }
  };

  // A last pass over every row of the experts that need one: the norm sums (binary64;
  // row partials in index order, rows in order), and the cuts' keys before each row
  // asked for when they were not read from copies.
  const norm = t.rescale === RESCALE_CODE.l1 || t.rescale === RESCALE_CODE.l2 || t.rescale === RESCALE_CODE.linf;
  const counted = all.filter((k) => facts[k] && (norm || (facts[k]!.cuts && !snapshots)));
  const seen = all.map((): [number, number] => [0, 0]);
  const full = new Float64Array(K), kept = new Float64Array(K);
  pass(counted, (k, r) => {
    const f = facts[k]!;
    if (rowsAsked.has(r)) f.seenAt.set(r, [seen[k][0], seen[k][1]]);
    decide(k, r, seen[k]);
    if (!norm) return;
    let rowFull = 0, rowKept = 0;
    if (t.rescale === RESCALE_CODE.linf) {
      for (let j = 0; j < n; j++) {
        const m = Math.abs(d[j]);
        rowFull = Math.max(rowFull, m);
        if (keep[j]) rowKept = Math.max(rowKept, m);
      }
    } else if (t.rescale === RESCALE_CODE.l2) {
      for (let j = 0; j < n; j++) {
        const m = d[j] * d[j];
        rowFull += m;
        rowKept += keep[j] ? m : 0; // a select, not a branch: keep is random
      }
    } else {
      for (let j = 0; j < n; j++) {
        const m = Math.abs(d[j]);
        rowFull += m;
        rowKept += keep[j] ? m : 0;
      }
    }
    if (t.rescale === RESCALE_CODE.linf) {
      full[k] = Math.max(full[k], rowFull);
      kept[k] = Math.max(kept[k], rowKept);
    } else {
      full[k] += rowFull;
      kept[k] += rowKept;
    }
  });
  if (norm) {
    for (const k of counted) {
      const [sf, sk] = t.rescale === RESCALE_CODE.l2 ? [Math.sqrt(full[k]), Math.sqrt(kept[k])] : [full[k], kept[k]];
      facts[k]!.scale = Math.fround(sf < 1e-7 || sk < 1e-7 ? 1 : sf / sk);
    }
  }

  // The rows asked for.
  const w = t.experts.map((e) => Math.fround(e.weight));
  const fuse = { consensus: t.consensus, normalize: t.normalize, lambda: t.lambda };
  const raws = t.experts.map(() => new Float64Array(n)), sparse = t.experts.map(() => new Float64Array(n));
  const p = new Float64Array(K);
  const out = rows.map((r) => {
    const row = intoOut ? subBytes(t.out, r * n * outSize, (r + 1) * n * outSize) : allocBytes(n * outSize);
    const ov = dataView(row);
    readBase(r, b);
    for (let k = 0; k < K; k++) {
      deltaRow(k, r);
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
