// AVX-512 counting of 15-bit keys with conflict detection, for the magprune ranks
// (delta_pass.cc). For CPUs with AVX-512 CD and VPOPCNTDQ (Ice Lake and later); the
// caller keeps its portable path for the others. (For the plain histograms of the TIES
// pre-pass the same counting measured slower than cut_rows.cc's four scalar tables.)
#pragma once
#include <cstdint>

#include "merge_state.h"
#include "philox_avx512.h"
#include "row_io.h"

#if defined(DELLA_AVX512_PATHS)
#include <immintrin.h>

namespace della::detail {
namespace keys15 {
constexpr uint32_t kKeys = 1u << 15;
constexpr uint32_t kBlockBits = 4;  // keys are tracked in blocks of 16: one vector
}  // namespace keys15

#define DELLA_AVX512_CD __attribute__((target("avx512f,avx512cd,avx512vpopcntdq,avx512bw,avx512vl")))
inline bool have_avx512_cd() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
                          __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
}

// All 16 lanes, as a mask the compiler cannot see is constant. A gather given an
// all-lanes constant mask lets GCC drop its zeroed source and gather into a register
// still holding the previous step's result, which chains each step to the one before
// (measured twice as slow); the empty asm hides the constant.
DELLA_AVX512_CD inline __mmask16 opaque_all_lanes() {
  __mmask16 all = 0xffff;
#if defined(__GNUC__)
  __asm__("" : "+Yk"(all));
#endif
  return all;
}

DELLA_AVX512_CD inline __mmask16 tail_mask(uint64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
}

// The 16-key blocks a row's keys occupy: block 0 (key 0, the unchanged parameters, is
// common) and blocks [lo, hi], which hold every nonzero key (lo > hi: none). Tracking
// the range costs two vector ops per step, where marking touched blocks cost a store
// per element.
struct KeyRange {
  uint32_t lo, hi;
};


// Counts keys[0..n) into hist (2^15 counters, zero on entry) and writes each element's
// occurrence among the equal keys before it into occ. Per step of 16: vpconflictd
// marks the equal keys in lower lanes (their number is the lane's occurrence within
// the step), a gather reads the counts so far, and a scatter writes them back; for a
// repeated key the highest lane, holding the largest count, is written last.
//
// The same loop makes the row's Philox blocks, 32 every eight steps: the counting waits
// on gathers, scatters and the microcoded vpconflictd, Philox on vector multiplies, and
// in one loop the core overlaps the two (2-5% faster della than the two loops one after
// the other; one vector of 8 blocks every two steps gained nothing).
// Input rows the next deltas will read, fetched into the caches a line per counting step:
// the loop waits on its gathers and scatters anyway, and the next deltas loop had waited
// on those rows' first loads (a fifth of its time) because the hardware prefetchers
// stop at each 4 KiB page of the mapped input.
struct RowPrefetch {
  const char* a = nullptr;
  const char* b = nullptr;
  uint64_t a_lines = 0, b_lines = 0;
};

// One counting step of 16 keys from j (lanes m). Full: all 16 lanes, so plain loads and
// stores and no mask arithmetic; the gather and scatter still take m (opaque_all_lanes).
template <bool Full>
DELLA_AVX512_CD inline void count_step(const uint16_t* __restrict keys, uint64_t j, __mmask16 m, uint32_t* __restrict hist,
                                       uint32_t* __restrict occ, __m512i& lo, __m512i& hi) {
  const __m512i one = _mm512_set1_epi32(1), zero = _mm512_setzero_si512();
  const __m512i k = _mm512_cvtepu16_epi32(Full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j))
                                               : _mm256_maskz_loadu_epi16(m, keys + j));
  const __m512i within = _mm512_popcnt_epi32(_mm512_conflict_epi32(k));
  const __m512i o = _mm512_add_epi32(_mm512_mask_i32gather_epi32(zero, m, k, hist, 4), within);
  if constexpr (Full) _mm512_storeu_si512(occ + j, o);
  else _mm512_mask_storeu_epi32(occ + j, m, o);
  _mm512_mask_i32scatter_epi32(hist, m, k, _mm512_add_epi32(o, one), 4);
  lo = _mm512_mask_min_epu32(lo, Full ? _mm512_test_epi32_mask(k, k) : _mm512_mask_test_epi32_mask(m, k, k), lo, k);
  hi = Full ? _mm512_max_epu32(hi, k) : _mm512_mask_max_epu32(hi, m, hi, k);
}

DELLA_AVX512_CD inline KeyRange count_keys15_cd(const uint16_t* __restrict keys, uint64_t n, uint32_t* __restrict hist,
                                                uint32_t* __restrict occ, const PhiloxRun& ph, const RowPrefetch& pf) {
  constexpr int kVecs = 4;                      // Philox vectors of 8 blocks a turn
  constexpr uint64_t kTurn = 2 * 16 * kVecs;    // elements counted a turn: 8 steps for 32 blocks
  __m512i lo = _mm512_set1_epi32(static_cast<int>(keys15::kKeys - 1)), hi = _mm512_setzero_si512();
  uint64_t b = 0;  // Philox blocks made
  uint64_t j = 0, step = 0;
  for (; j + 16 <= n; j += 16, ++step) {
    if (step < pf.a_lines) _mm_prefetch(pf.a + 64 * step, _MM_HINT_T0);
    if (step < pf.b_lines) _mm_prefetch(pf.b + 64 * step, _MM_HINT_T0);
    if (j % kTurn == 0 && b + 8 * kVecs <= ph.blocks) {
      philox_vectors_avx512<kVecs>(ph.g0 + b, ph.c2, ph.c3, ph.k0, ph.k1, ph.words + 4 * b);
      b += 8 * kVecs;
    }
    count_step<true>(keys, j, opaque_all_lanes(), hist, occ, lo, hi);
  }
  if (j < n) count_step<false>(keys, j, tail_mask(n - j), hist, occ, lo, hi);  // Philox's rest is made below
  if (b < ph.blocks) philox_blocks(ph.g0 + b, ph.blocks - b, ph.c2, ph.c3, ph.k0, ph.k1, ph.words + 4 * b);
  return {_mm512_reduce_min_epu32(lo) >> keys15::kBlockBits, _mm512_reduce_max_epu32(hi) >> keys15::kBlockBits};
}

}  // namespace della::detail
#endif
