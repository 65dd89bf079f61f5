// The final pass of every delta merge (all methods but linear and slerp): one sweep per
// row reads each input once and writes the output once.
//
// Per row and expert: deltas and their 15-bit keys in one vector loop; for magprune,
// exact stable ranks by counting (histograms over all 2^15 keys that stay zeroed
// between rows, so a row pays only for the 16-key blocks it touches; with AVX-512
// conflict detection, 16 keys a step, and the row's Philox words made in the same
// loop, see keys_avx512.h), then keep probability and rescale by rank, looked up in
// the tensor's table or, where prepare() found the two equal, computed; for
// random, constants; for magnitude and breadcrumbs, the whole-tensor cuts found by the
// pre-passes (cut_rows.cc). Keep, rescale and weight in one vector loop; then the election and fuse over the
// row (one pass for up to four experts) and one rounding store.
//
// The hot function is built three times (AVX-512, AVX2, baseline x86-64) and the
// loader picks the one the CPU supports; every version does the same fp32 operations
// in the same order (no FMA: -ffp-contract=off), so all give the same bytes.
#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "row_io.h"
#if defined(DELLA_AVX512_PATHS)
#include "avx512_intrin.h"
#endif

#include "della/philox.h"
#include "fuse_row.h"
#include "merge_state.h"
#include "keys_avx512.h"

namespace della::detail {
namespace {

// Stable ascending ranks of 15-bit keys by counting. The row is cut into kSegments
// contiguous segments, each counted in its own histogram and walked in an
// interleaved loop: consecutive elements with the same key would otherwise chain
// every increment through memory. The start of key k in segment c is the number of
// smaller keys in the row plus key k's count in earlier segments: one running sum
// over (key, segment) in that order.
constexpr int kSegments = 4;
constexpr uint32_t kKeys = 1u << 15;
constexpr uint32_t kBlockBits = 4;  // keys are tracked in blocks of 16: one vector
constexpr uint32_t kBlocks = kKeys >> kBlockBits;

// Running sum over the touched blocks, scalar.
void segment_starts_scalar(uint32_t* __restrict hist, const uint16_t* blocks, uint32_t m) {
  uint32_t sum = 0;
  for (uint32_t i = 0; i < m; ++i) {
    const uint32_t b = blocks[i];
    for (uint32_t key = b << kBlockBits; key < (b + 1) << kBlockBits; ++key) {
      for (int c = 0; c < kSegments; ++c) {
        const uint32_t count = hist[c * kKeys + key];
        hist[c * kKeys + key] = sum;
        sum += count;
      }
    }
  }
}

#if defined(DELLA_AVX512_PATHS)
// Inclusive prefix sum across the 16 lanes: adds of the vector shifted up by 1, 2, 4
// and 8 lanes.
__attribute__((target("avx512f"))) inline __m512i scan16(__m512i x) {
  const __m512i zero = _mm512_setzero_si512();
  x = _mm512_add_epi32(x, _mm512_alignr_epi32(x, zero, 15));
  x = _mm512_add_epi32(x, _mm512_alignr_epi32(x, zero, 14));
  x = _mm512_add_epi32(x, _mm512_alignr_epi32(x, zero, 12));
  return _mm512_add_epi32(x, _mm512_alignr_epi32(x, zero, 8));
}

// The same running sum, 16 keys at a time: an in-register scan of the per-key totals.
__attribute__((target("avx512f"))) void segment_starts_avx512(uint32_t* __restrict hist, const uint16_t* blocks,
                                                              uint32_t m) {
  static_assert(kSegments == 4 && kBlockBits == 4, "one vector per block and segment");
  const __m512i zero = _mm512_setzero_si512(), last = _mm512_set1_epi32(15);
  __m512i carry = zero;  // the running sum, in every lane
  for (uint32_t i = 0; i < m; ++i) {
    uint32_t* p = hist + (static_cast<uint32_t>(blocks[i]) << kBlockBits);
    const __m512i c0 = _mm512_loadu_si512(p), c1 = _mm512_loadu_si512(p + kKeys);
    const __m512i c2 = _mm512_loadu_si512(p + 2 * kKeys), c3 = _mm512_loadu_si512(p + 3 * kKeys);
    const __m512i c01 = _mm512_add_epi32(c0, c1), c012 = _mm512_add_epi32(c01, c2);
    const __m512i total = _mm512_add_epi32(c012, c3);
    const __m512i x = scan16(total);
    const __m512i start = _mm512_add_epi32(_mm512_sub_epi32(x, total), carry);
    _mm512_storeu_si512(p, start);
    _mm512_storeu_si512(p + kKeys, _mm512_add_epi32(start, c0));
    _mm512_storeu_si512(p + 2 * kKeys, _mm512_add_epi32(start, c01));
    _mm512_storeu_si512(p + 3 * kKeys, _mm512_add_epi32(start, c012));
    carry = _mm512_permutexvar_epi32(last, _mm512_add_epi32(x, carry));
  }
}
// ranks[j] += hc[keys[j]] for j in [j0, j1): the segment's start for each key.
__attribute__((target("avx512f"))) void add_starts_avx512(uint32_t* __restrict ranks, const uint16_t* __restrict keys,
                                                          const uint32_t* __restrict hc, uint64_t j0, uint64_t j1) {
  uint64_t j = j0;
  for (; j + 16 <= j1; j += 16) {
    const __m512i idx = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j)));
    const __m512i start = _mm512_i32gather_epi32(idx, reinterpret_cast<const int*>(hc), 4);
    _mm512_storeu_si512(ranks + j, _mm512_add_epi32(_mm512_loadu_si512(ranks + j), start));
  }
  for (; j < j1; ++j) ranks[j] += hc[keys[j]];
}

// The inverse-rescale mask by rank (SPEC §4): kept iff x < q[rank], then d * s[rank],
// with tf holding q and s = 1/q interleaved by rank. Returns how many were kept.
__attribute__((target("avx512f"))) uint64_t mask_by_rank_avx512(float* __restrict d, const uint32_t* __restrict words,
                                                                 const uint32_t* __restrict ranks,
                                                                 const float* __restrict tf, uint64_t n) {
  const __m512 two_m24 = _mm512_set1_ps(5.9604644775390625e-08f);
  uint64_t kept = 0, j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i r2 = _mm512_slli_epi32(_mm512_loadu_si512(ranks + j), 1);
    const __m512 q = _mm512_i32gather_ps(r2, tf, 4);
    const __m512 sc = _mm512_i32gather_ps(r2, tf + 1, 4);
    const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(_mm512_loadu_si512(words + j), 8)), two_m24);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, q, _CMP_LT_OQ);
    _mm512_storeu_ps(d + j, _mm512_maskz_mul_ps(keep, _mm512_loadu_ps(d + j), sc));
    kept += static_cast<uint64_t>(__builtin_popcount(keep));
  }
  for (; j < n; ++j) {
    const bool keep = uniform_from_word(words[j]) < tf[2 * ranks[j]];
    d[j] = keep_or_zero(keep, d[j] * tf[2 * ranks[j] + 1]);
    kept += keep;
  }
  return kept;
}

inline bool have_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}

// Replaces the counts of the range's blocks by each key's start (the number of smaller
// keys in the row): an in-register scan per block of 16 and a running carry. The
// block's total is broadcast from its own scan, so the carry chain from block to block
// is one add (it was an add and a permute, whose latency bounded this loop).
DELLA_AVX512_CD inline __m512i scan_block_cd(uint32_t* __restrict p, __m512i carry) {
  const __m512i c = _mm512_loadu_si512(p);
  const __m512i x = scan16(c);
  _mm512_storeu_si512(p, _mm512_add_epi32(_mm512_sub_epi32(x, c), carry));
  return _mm512_add_epi32(carry, _mm512_permutexvar_epi32(_mm512_set1_epi32(15), x));
}

DELLA_AVX512_CD void key_starts_cd(uint32_t* __restrict hist, KeyRange r) {
  __m512i carry = scan_block_cd(hist, _mm512_setzero_si512());
  for (uint32_t b = std::max<uint32_t>(r.lo, 1); b <= r.hi; ++b) carry = scan_block_cd(hist + (b << kBlockBits), carry);
}

void clear_range(uint32_t* hist, KeyRange r) {
  std::memset(hist, 0, sizeof(uint32_t) << kBlockBits);
  const uint32_t lo = std::max<uint32_t>(r.lo, 1);
  if (lo <= r.hi) std::memset(hist + (lo << kBlockBits), 0, (sizeof(uint32_t) << kBlockBits) * (r.hi - lo + 1));
}

// (q, 1/q) of 16 ranks from the tensor's table: one 64-bit gather per element.
struct KeepScaleGather {
  const KeepScale* table;
  DELLA_AVX512_CD void operator()(__m512i rank, __mmask16 m, __m512& q, __m512& s) const {
    const __m512i zero = _mm512_setzero_si512();
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512i qs0 = _mm512_mask_i32gather_epi64(zero, static_cast<__mmask8>(m), _mm512_castsi512_si256(rank), table, 8);
    const __m512i qs1 = _mm512_mask_i32gather_epi64(zero, static_cast<__mmask8>(m >> 8), _mm512_extracti64x4_epi64(rank, 1), table, 8);
    q = _mm512_castsi512_ps(_mm512_permutex2var_epi32(qs0, even, qs1));
    s = _mm512_castsi512_ps(_mm512_permutex2var_epi32(qs0, odd, qs1));
  }
};

// (q, 1/q) of 16 ranks computed instead of looked up: u = r / (n - 1) as a product with
// one FMA correction, q = lo + span * u as SPEC §4 writes it, and 1/q from the 14-bit
// reciprocal estimate with two FMA Newton steps. About ten vector operations in place
// of two 64-bit gathers (della about 4% faster, bench/RESULTS.md step 44). Not every step is
// correctly rounded for every input, so a tensor uses it only where prepare() found it
// equal to the table at every rank of its rows (magprune_arith_matches).
struct KeepScaleArith {
  MagpruneCoef c;
  float nm1, inv;  // f32(n - 1) and f32(1 / f32(n - 1))
  explicit KeepScaleArith(const MagpruneCoef& coef, uint64_t n)
      : c(coef), nm1(static_cast<float>(n - 1)), inv(1.0f / static_cast<float>(n - 1)) {}
  DELLA_AVX512_CD void operator()(__m512i rank, __mmask16, __m512& q, __m512& s) const {
    const __m512 one = _mm512_set1_ps(1.0f), vn = _mm512_set1_ps(nm1), vinv = _mm512_set1_ps(inv);
    const __m512 r = _mm512_cvtepu32_ps(rank);
    const __m512 u0 = _mm512_mul_ps(r, vinv);
    const __m512 u = _mm512_fmadd_ps(_mm512_fnmadd_ps(u0, vn, r), vinv, u0);
    q = _mm512_add_ps(_mm512_set1_ps(c.lo), _mm512_mul_ps(_mm512_set1_ps(c.span), u));
    const __m512 y0 = _mm512_rcp14_ps(q);
    const __m512 y1 = _mm512_fmadd_ps(y0, _mm512_fnmadd_ps(q, y0, one), y0);
    s = _mm512_fmadd_ps(y1, _mm512_fnmadd_ps(q, y1, one), y1);
  }
};

// One step of mask_by_key_rank_cd: 16 elements from j, lanes m. Full: all 16 lanes, so
// plain loads and stores (the masked ones made the loop about 13% slower); the
// gathers still take m (opaque_all_lanes).
template <bool Full, class KeepScaleOf>
DELLA_AVX512_CD inline __mmask16 key_rank_step(float* __restrict d, const uint32_t* __restrict words,
                                               const uint32_t* __restrict occ, const uint16_t* __restrict keys,
                                               const uint32_t* __restrict starts, const KeepScaleOf& keep_scale,
                                               uint64_t j, __mmask16 m) {
  const __m512 two_m24 = _mm512_set1_ps(5.9604644775390625e-08f);
  const __m512i zero = _mm512_setzero_si512();
  const __m512i k = _mm512_cvtepu16_epi32(Full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j))
                                               : _mm256_maskz_loadu_epi16(m, keys + j));
  const __m512i o = Full ? _mm512_loadu_si512(occ + j) : _mm512_maskz_loadu_epi32(m, occ + j);
  const __m512i rank = _mm512_add_epi32(o, _mm512_mask_i32gather_epi32(zero, m, k, starts, 4));
  __m512 q, sc;
  keep_scale(rank, m, q, sc);
  const __m512i w = Full ? _mm512_loadu_si512(words + j) : _mm512_maskz_loadu_epi32(m, words + j);
  const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 8)), two_m24);
  const __mmask16 keep = Full ? _mm512_cmp_ps_mask(x, q, _CMP_LT_OQ) : _mm512_mask_cmp_ps_mask(m, x, q, _CMP_LT_OQ);
  if constexpr (Full) _mm512_storeu_ps(d + j, _mm512_maskz_mul_ps(keep, _mm512_loadu_ps(d + j), sc));
  else _mm512_mask_storeu_ps(d + j, m, _mm512_maskz_mul_ps(keep, _mm512_maskz_loadu_ps(m, d + j), sc));
  return keep;
}

// Keep and inverse rescale by rank (SPEC §4) with the rank found on the way: rank =
// starts[key] + occurrence, then (q, 1/q) from keep_scale (KeepScaleGather or
// KeepScaleArith). kept iff x < q; then d * (1/q). Returns how many were kept.
template <class KeepScaleOf>
DELLA_AVX512_CD uint64_t mask_by_key_rank_cd(float* __restrict d, const uint32_t* __restrict words,
                                              const uint32_t* __restrict occ, const uint16_t* __restrict keys,
                                              const uint32_t* __restrict starts, const KeepScaleOf& keep_scale,
                                              uint64_t n) {
  uint64_t kept = 0, j = 0;
  for (; j + 16 <= n; j += 16)
    kept += static_cast<uint64_t>(
        __builtin_popcount(key_rank_step<true>(d, words, occ, keys, starts, keep_scale, j, opaque_all_lanes())));
  if (j < n)
    kept += static_cast<uint64_t>(
        __builtin_popcount(key_rank_step<false>(d, words, occ, keys, starts, keep_scale, j, tail_mask(n - j))));
  return kept;
}

// Whether KeepScaleArith gives table[r] bit for bit at every rank r < n.
DELLA_AVX512_CD bool arith_matches_cd(const KeepScale* table, uint64_t n, const MagpruneCoef& c) {
  const KeepScaleArith arith(c, n);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (uint64_t r = 0; r < n; r += 16) {
    __m512 q, s;
    arith(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(r)), lane), tail_mask(n - r), q, s);
    alignas(64) float qa[16], sa[16];
    _mm512_store_ps(qa, q);
    _mm512_store_ps(sa, s);
    for (uint64_t i = 0; i < 16 && r + i < n; ++i)
      if (std::memcmp(&qa[i], &table[r + i].q, 4) != 0 || std::memcmp(&sa[i], &table[r + i].s, 4) != 0) return false;
  }
  return true;
}
#endif

// Counts the keys of a row, kSegments tables of 2^15 counters, and turns the counts
// into each segment's start for each key; occ[j] gets element j's occurrence among the
// equal keys of its segment before it. Returns the touched blocks of 16 keys (into
// `blocks`): only those are nonzero, and clear_blocks() zeroes them again. Scalar code
// in a function of its own: inlined into the big row function it would lose registers
// to it.
__attribute__((noinline)) uint32_t count_keys15(const uint16_t* __restrict keys, uint64_t n,
                                                uint32_t* __restrict hist, uint32_t* __restrict occ,
                                                uint16_t* __restrict blocks) {
  uint8_t touched[kBlocks] = {};  // a local array: its byte stores alias nothing else
  const uint64_t q = n / kSegments;  // segment c is [c q, (c + 1) q); the last also takes the tail
  uint32_t* __restrict h0 = hist;
  uint32_t* __restrict h1 = hist + kKeys;
  uint32_t* __restrict h2 = hist + 2 * kKeys;
  uint32_t* __restrict h3 = hist + 3 * kKeys;
  const uint16_t* k0 = keys;
  const uint16_t* k1 = keys + q;
  const uint16_t* k2 = keys + 2 * q;
  const uint16_t* k3 = keys + 3 * q;
  for (uint64_t j = 0; j < q; ++j) {
    occ[j] = h0[k0[j]]++;
    occ[q + j] = h1[k1[j]]++;
    occ[2 * q + j] = h2[k2[j]]++;
    occ[3 * q + j] = h3[k3[j]]++;
    touched[k0[j] >> kBlockBits] = 1;
    touched[k1[j] >> kBlockBits] = 1;
    touched[k2[j] >> kBlockBits] = 1;
    touched[k3[j] >> kBlockBits] = 1;
  }
  for (uint64_t j = 4 * q; j < n; ++j) {
    occ[j] = h3[keys[j]]++;
    touched[keys[j] >> kBlockBits] = 1;
  }
  const uint32_t m = nonzero_flags(touched, kBlocks, blocks);
#if defined(DELLA_AVX512_PATHS)
  if (have_avx512()) segment_starts_avx512(hist, blocks, m);
  else segment_starts_scalar(hist, blocks, m);
#else
  segment_starts_scalar(hist, blocks, m);
#endif
  return m;
}

void clear_blocks(uint32_t* __restrict hist, const uint16_t* blocks, uint32_t m) {
  for (uint32_t i = 0; i < m; ++i)
    for (int c = 0; c < kSegments; ++c)
      std::memset(hist + c * kKeys + (static_cast<uint32_t>(blocks[i]) << kBlockBits), 0, sizeof(uint32_t) << kBlockBits);
}

// Philox words of flat elements [i0, i0 + n) of one expert's stream: the row's blocks
// into `words`; returns a pointer to element i0's word.
DELLA_ALWAYS_INLINE const uint32_t* philox_row(uint64_t seed, uint32_t tensor_id, uint32_t expert, uint64_t i0,
                                               uint64_t n, uint32_t* __restrict words) {
  const PhiloxRun ph = philox_run(seed, tensor_id, expert, i0, n, words);
  philox_blocks(ph.g0, ph.blocks, ph.c2, ph.c3, ph.k0, ph.k1, words);
  return words + (i0 & 3);
}

// Where a row stands against one cut (see Cut): every element with the cut's key is
// before the cut (EqualIn), none is (Strict), only the first few in index order are
// (Ordered: the one row where the cut falls among equal keys), or the cut takes all.
enum class Side { All, EqualIn, Strict, Ordered };

struct RowSide {
  Side side;
  uint64_t occ = 0, occ_end = 0;  // Ordered: cut-key elements before the row, and up to its end
};

template <class Key>
DELLA_ALWAYS_INLINE uint64_t count_equal(const Key* __restrict keys, uint64_t n, uint32_t T) {
  uint64_t c = 0;
  for (uint64_t j = 0; j < n; ++j) c += keys[j] == T;
  return c;
}

// The side of a row of block `block` for cut c, with `run` the cut-key elements before
// the row when they matter (it is advanced past the row then). Counting the row's
// equal keys is needed only in the block where the cut falls.
template <class Key>
DELLA_ALWAYS_INLINE RowSide row_side(const Cut& c, const std::vector<uint64_t>& occ, uint64_t block, uint64_t& run,
                                     const Key* keys, uint64_t n) {
  if (c.all) return {Side::All};
  if (occ[block + 1] <= c.take) return {Side::EqualIn};
  if (run >= c.take) return {Side::Strict};
  const uint64_t end = run + count_equal(keys, n, c.key);
  const RowSide rs{end <= c.take ? Side::EqualIn : Side::Ordered, run, end};
  run = end;
  return rs;
}

// Ascending "before the cut" is key < threshold; descending it is key >= threshold.
DELLA_ALWAYS_INLINE uint32_t threshold(const Cut& c, Side side) {
  if (side == Side::All) return c.descending ? 0u : 0xffffffffu;
  const bool equal_in = side == Side::EqualIn;
  return c.descending ? c.key + (equal_in ? 0u : 1u) : c.key + (equal_in ? 1u : 0u);
}

// in[j] = whether element j is before cut c: by threshold, then, in the Ordered row,
// the first equal keys in index order.
template <class Key>
DELLA_ALWAYS_INLINE void cut_side(const Key* __restrict keys, uint64_t n, const Cut& c, RowSide rs,
                                  uint8_t* __restrict in) {
  const uint32_t T = threshold(c, rs.side == Side::Ordered ? Side::Strict : rs.side);
  if (c.descending) for (uint64_t j = 0; j < n; ++j) in[j] = keys[j] >= T;
  else for (uint64_t j = 0; j < n; ++j) in[j] = keys[j] < T;
  if (rs.side != Side::Ordered) return;
  uint64_t occ = rs.occ;
  for (uint64_t j = 0; j < n && occ < c.take; ++j) {
    if (keys[j] != c.key) continue;
    in[j] = 1;
    ++occ;
  }
}

// Keeps (and scales) the deltas with lo <= key < hi: both cuts of a row in one vector
// loop when neither falls among the row's equal keys. Returns how many were kept.
template <class Key>
DELLA_ALWAYS_INLINE uint64_t keep_between(float* __restrict d, const Key* __restrict keys, uint64_t n, uint32_t lo,
                                          uint32_t hi, bool scaled, float sc) {
  uint32_t kept = 0;  // one row: below 2^32
  if (scaled) {
    for (uint64_t j = 0; j < n; ++j) {
      const uint32_t key = keys[j];
      const bool keep = (key >= lo) & (key < hi);
      d[j] = keep_or_zero(keep, d[j] * sc);
      kept += keep;
    }
  } else {
    for (uint64_t j = 0; j < n; ++j) {
      const uint32_t key = keys[j];
      const bool keep = (key >= lo) & (key < hi);
      d[j] = keep_or_zero(keep, d[j]);
      kept += keep;
    }
  }
  return kept;
}

// Magnitude keeps what is before its cut; breadcrumbs what is past cut a and before
// b. run holds both cuts' running occurrences for this expert.
template <class Key>
DELLA_ALWAYS_INLINE uint64_t cut_row(float* __restrict d, const Key* keys, uint64_t n, const ExpertState& es,
                                     uint64_t block, uint64_t* run, Sparsifier sp, bool scaled, float sc,
                                     uint8_t* __restrict keep, uint8_t* __restrict in_b) {
  const bool magnitude = sp == Sparsifier::Magnitude;
  const RowSide a = row_side(es.cut_a, es.occ_a, block, run[0], keys, n);
  const RowSide b = magnitude ? RowSide{Side::All} : row_side(es.cut_b, es.occ_b, block, run[1], keys, n);
  if (a.side != Side::Ordered && b.side != Side::Ordered) {
    if (magnitude) return keep_between(d, keys, n, threshold(es.cut_a, a.side), 0xffffffffu, scaled, sc);
    return keep_between(d, keys, n, threshold(es.cut_a, a.side), threshold(es.cut_b, b.side), scaled, sc);
  }
  cut_side(keys, n, es.cut_a, a, keep);
  if (!magnitude) {
    cut_side(keys, n, es.cut_b, b, in_b);
    for (uint64_t j = 0; j < n; ++j) keep[j] = static_cast<uint8_t>((keep[j] ^ 1u) & in_b[j]);
  }
  uint32_t kept = 0;
  for (uint64_t j = 0; j < n; ++j) {
    d[j] = keep_or_zero(keep[j], scaled ? d[j] * sc : d[j]);
    kept += keep[j];
  }
  return kept;
}

DELLA_SIMD_CLONES
void delta_rows(const MergeTask& t, const TaskState& st, uint64_t r0, uint64_t r1, Scratch& s, MergeStats& local) {
  const uint64_t n = st.g.n;
  const unsigned K = static_cast<unsigned>(t.experts.size());
  const FuseConfig fc{static_cast<int>(K), t.consensus, t.normalize, t.lambda != 1.0, static_cast<float>(t.lambda)};
  float w[64];
  for (unsigned k = 0; k < K; ++k) w[k] = t.experts[k].weight;
  const int keys = st.mode == KeyMode::BF16 ? 1 : (st.mode == KeyMode::F16 ? 2 : 3);

  float* base = grown(s.base, n);
  float* vals = grown(s.vals, static_cast<size_t>(K) * n);
  float* out = grown(s.delta, n);
  uint16_t* k16 = grown(s.keys16, n);
  uint32_t* k32 = grown(s.keys, n);
  uint32_t* ranks = grown(s.ranks, n);
  KeepScale* ks = grown(s.ks, n);
  uint32_t* words = grown(s.words, n + 8);
  uint32_t* hist = grown(s.hist15, kSegments * kKeys);
  uint16_t* blocks = grown(s.blocks, kBlocks);
  // Whole-tensor cuts: per expert, the cut keys' occurrences before the current row
  // (both cuts). Rows of a block are walked in order from the block's start.
  if (r0 % st.occ_rows != 0) throw std::logic_error("a work item does not start on an occurrence block");
  uint64_t occ_run[128] = {};
  // Whether expert k's ranks are counted by count_keys15_cd (the path below), which also
  // fetches the next input rows; other inputs' next rows are fetched while this row's
  // are read (with_next_row).
  auto counted_cd = [&](unsigned k) {
#if defined(DELLA_AVX512_PATHS)
    return st.ex[k].sparse && t.sparsifier == Sparsifier::Magprune && keys != 3 && !st.ex[k].table.empty() &&
           t.rescale == Rescale::Inverse && have_avx512_cd();
#else
    (void)k;
    return false;
#endif
  };

  for (uint64_t r = r0; r < r1; ++r) {
    const uint64_t i0 = r * n;
    const bool more = r + 1 < r1;
    local.nonfinite[0] += load_base_row(t, r, n, base, more && !counted_cd(K - 1));
    for (unsigned k = 0; k < K; ++k) {
      const ExpertInput& e = t.experts[k];
      const ExpertState& es = st.ex[k];
      const uint8_t* src = expert_row(t, k, r, n);
      float* __restrict d = vals + static_cast<size_t>(k) * n;
      const bool ranked = es.sparse && t.sparsifier == Sparsifier::Magprune;
      const bool cut = es.sparse && (t.sparsifier == Sparsifier::Magnitude || t.sparsifier == Sparsifier::Breadcrumbs);
      const uint64_t esz = dtype_size(e.dtype);
      const bool fetched = counted_cd(k == 0 ? K - 1 : k - 1);
      uint64_t bad = 0;
      with_next_row(more && !fetched ? expert_row(t, k, r + 1, n) : nullptr, esz, n, [&](uint64_t j0, uint64_t j1) DELLA_INLINE_LAMBDA {
        const uint8_t* p = src + j0 * esz;
        const uint64_t m = j1 - j0;
        if (!ranked && !cut) bad += deltas_any<0>(e.dtype, p, m, base + j0, d + j0, k16 + j0, k32 + j0);
        else if (keys == 1) bad += deltas_any<1>(e.dtype, p, m, base + j0, d + j0, k16 + j0, k32 + j0);
        else if (keys == 2) bad += deltas_any<2>(e.dtype, p, m, base + j0, d + j0, k16 + j0, k32 + j0);
        else bad += deltas_any<3>(e.dtype, p, m, base + j0, d + j0, k16 + j0, k32 + j0);
      });
      local.nonfinite[k + 1] += bad;
      if (!es.sparse) {
        local.kept[k] += n;
        continue;
      }

      if (cut) {
        // Whole-tensor cuts: a mask, then no rescale or a norm rescale.
        uint8_t* keep = grown(s.keep, n);
        uint8_t* in_b = grown(s.keep_b, n);
        const uint64_t block = r / st.occ_rows;
        uint64_t* run = occ_run + 2 * k;
        occ_block_start(st, es, r, run);
        const bool scaled = t.rescale != Rescale::None;
        if (keys == 3) local.kept[k] += cut_row(d, k32, n, es, block, run, t.sparsifier, scaled, es.norm_scale, keep, in_b);
        else local.kept[k] += cut_row(d, k16, n, es, block, run, t.sparsifier, scaled, es.norm_scale, keep, in_b);
        continue;
      }

      // Keep probability and rescale per element: by rank from the tensor's table
      // (tf: q and 1/q interleaved), or computed from the rank, or constants.
      const bool per_element = ranked;
      const float* tf = ranked && !es.table.empty() ? &es.table[0].q : nullptr;
#if defined(DELLA_AVX512_PATHS)
      if (counted_cd(k)) {
        // The row's Philox words are made inside the counting loop (see count_keys15_cd),
        // and the next inputs fetched: the next expert's row, or after the last expert
        // the next row's base and first expert.
        RowPrefetch pf;
        if (k + 1 < K) {
          pf.a = reinterpret_cast<const char*>(expert_row(t, k + 1, r, n));
          pf.a_lines = (n * dtype_size(t.experts[k + 1].dtype) + 63) / 64;
        } else if (r + 1 < r1) {
          pf.a = static_cast<const char*>(t.base) + (r + 1) * n * dtype_size(t.base_dtype);
          pf.a_lines = (n * dtype_size(t.base_dtype) + 63) / 64;
          pf.b = reinterpret_cast<const char*>(expert_row(t, 0, r + 1, n));
          pf.b_lines = (n * dtype_size(t.experts[0].dtype) + 63) / 64;
        }
        const KeyRange kr = count_keys15_cd(k16, n, hist, ranks, philox_run(t.seed, t.tensor_id, k, i0, n, words), pf);
        key_starts_cd(hist, kr);
        const uint32_t* x = words + (i0 & 3);
        if (es.arith) local.kept[k] += mask_by_key_rank_cd(d, x, ranks, k16, hist, KeepScaleArith(es.coef, n), n);
        else local.kept[k] += mask_by_key_rank_cd(d, x, ranks, k16, hist, KeepScaleGather{&es.table[0]}, n);
        clear_range(hist, kr);
        continue;
      }
#endif
      if (ranked) {
        if (keys != 3) {
          // ranks[] holds each element's occurrence among equal keys of its segment;
          // adding the segment's start for its key gives the stable rank.
          const uint32_t m = count_keys15(k16, n, hist, ranks, blocks);
          const uint64_t seg = n / kSegments;
          for (int c = 0; c < kSegments; ++c) {
            const uint64_t j0 = c * seg, j1 = c == kSegments - 1 ? n : j0 + seg;
            const uint32_t* __restrict hc = hist + c * kKeys;
#if defined(DELLA_AVX512_PATHS)
            if (have_avx512()) {
              add_starts_avx512(ranks, k16, hc, j0, j1);
              continue;
            }
#endif
            for (uint64_t j = j0; j < j1; ++j) ranks[j] += hc[k16[j]];
          }
          clear_blocks(hist, blocks, m);
        } else {
          stable_ranks(k32, n, s, ranks);
        }
        if (!tf) {
          for (uint64_t j = 0; j < n; ++j) {
            const float q = magprune_q(ranks[j], n, es.coef);
            ks[j] = KeepScale{q, inverse_scale(q)};
          }
        }
      }

      const uint32_t* x = philox_row(t.seed, t.tensor_id, k, i0, n, words);
      const float q_const = es.q_random, s_const = es.s_random;
      uint32_t kept = 0;  // one row: below 2^32
      if (t.rescale == Rescale::Inverse) {
        if (tf) {
#if defined(DELLA_AVX512_PATHS)
          if (have_avx512()) {
            local.kept[k] += mask_by_rank_avx512(d, x, ranks, tf, n);
            continue;
          }
#endif
          for (uint64_t j = 0; j < n; ++j) {
            const bool keep = uniform_from_word(x[j]) < tf[2 * ranks[j]];
            d[j] = keep_or_zero(keep, d[j] * tf[2 * ranks[j] + 1]);
            kept += keep;
          }
        } else if (per_element) {
          for (uint64_t j = 0; j < n; ++j) {
            const bool keep = uniform_from_word(x[j]) < ks[j].q;
            d[j] = keep_or_zero(keep, d[j] * ks[j].s);
            kept += keep;
          }
        } else {
          for (uint64_t j = 0; j < n; ++j) {
            const bool keep = uniform_from_word(x[j]) < q_const;
            d[j] = keep_or_zero(keep, d[j] * s_const);
            kept += keep;
          }
        }
      } else {
        // No rescale, or a norm rescale (its scale comes from a pre-pass; 1 for none).
        const bool scaled = t.rescale != Rescale::None;
        const float sc = es.norm_scale;
        for (uint64_t j = 0; j < n; ++j) {
          const float q = tf ? tf[2 * ranks[j]] : (per_element ? ks[j].q : q_const);
          const bool keep = uniform_from_word(x[j]) < q;
          d[j] = keep_or_zero(keep, scaled ? d[j] * sc : d[j]);
          kept += keep;
        }
      }
      local.kept[k] += kept;
    }
    fuse_row(vals, w, K, n, fc, base, s.x, out);
    uint8_t* dst = out_row(t, r, n);
    store_any(t.out_dtype, out, n, dst);
    local.out_nonfinite += count_stored_nonfinite_any(t.out_dtype, dst, n);
  }
}

}  // namespace


bool magprune_arith_matches(const ExpertState& es, uint64_t n) {
#if defined(DELLA_AVX512_PATHS)
  if (n < 2 || n >= (1u << 24) || es.table.size() != n || !have_avx512_cd()) return false;
  return arith_matches_cd(es.table.data(), n, es.coef);
#else
  (void)es;
  (void)n;
  return false;
#endif
}

void merge_rows_delta(const MergeTask& t, const TaskState& st, uint64_t r0, uint64_t r1, Scratch& s,
                      MergeStats& local) {
  delta_rows(t, st, r0, r1, s, local);
}

}  // namespace della::detail
