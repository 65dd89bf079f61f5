// BF16 rows with AVX-512, 32 values a step, in functions of their own (inside the big
// row functions the compiler ran short of registers and reloaded pointers in these
// loops). Loads and deltas need AVX-512BW; keys and stores use AVX-512 BF16's
// vcvtne2ps2bf16 (Cooper Lake, Sapphire Rapids, Zen 4 and later) instead of the integer
// rounding of row_io.h: the same bits. The instruction rounds to nearest even whatever
// MXCSR says, like f32_to_bf16, but it reads subnormal inputs as zero and keeps a NaN's
// payload, so a step holding a subnormal or NaN lane is patched from the scalar code
// (rare: a delta or an output is subnormal only below 2^-126). kernel_tests compares
// both over crafted and random values.
#include "row_io.h"

#if defined(DELLA_AVX512_PATHS)
#include "avx512_intrin.h"

namespace della::detail {

#define DELLA_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
#define DELLA_AVX512_BW __attribute__((target("avx512f,avx512bw")))

bool have_avx512_bw() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return yes;
}

bool have_avx512_bf16() {
  static const bool yes = have_avx512_bw() && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return yes;
}

namespace {

// vfpclassps categories: QNaN 0x01, subnormal 0x20, SNaN 0x80.
constexpr int kNanOrSubnormal = 0x01 | 0x20 | 0x80;

// 32 bf16 values from p as fp32 (exact: the pattern shifted up 16 bits), and how many of
// them are Inf or NaN.
DELLA_AVX512_BW inline void load32(const uint8_t* p, __m512& lo, __m512& hi, uint32_t& bad) {
  const __m512i w = _mm512_loadu_si512(p);
  const __m512i exp = _mm512_set1_epi16(0x7f80);
  bad += static_cast<uint32_t>(__builtin_popcount(_mm512_cmpeq_epi16_mask(_mm512_and_si512(w, exp), exp)));
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16));
  hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16));
}

// 32 deltas E - B: E from the bf16 values at src, B from b.
DELLA_AVX512_BW inline void deltas32(const uint8_t* src, const float* b, __m512& lo, __m512& hi, uint32_t& bad) {
  load32(src, lo, hi, bad);
  lo = _mm512_sub_ps(lo, _mm512_loadu_ps(b));
  hi = _mm512_sub_ps(hi, _mm512_loadu_ps(b + 16));
}

// The RNE bf16 patterns of 32 fp32 values (lo: the first 16), and in `odd` the lanes
// the instruction gets wrong (NaN or subnormal), for the caller to patch.
DELLA_AVX512_BF16 inline __m512i round32(__m512 lo, __m512 hi, __mmask32& odd) {
  odd = _mm512_kunpackw(static_cast<__mmask32>(_mm512_fpclass_ps_mask(hi, kNanOrSubnormal)),
                        static_cast<__mmask32>(_mm512_fpclass_ps_mask(lo, kNanOrSubnormal)));
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
}

// The BF16 keys of 32 fp32 values (lo: the first 16) into k16.
DELLA_AVX512_BF16 inline void keys32(uint16_t* k16, __m512 lo, __m512 hi) {
  __mmask32 odd;
  _mm512_storeu_si512(k16, _mm512_and_si512(round32(lo, hi, odd), _mm512_set1_epi16(0x7fff)));
  if (odd == 0) return;
  alignas(64) float d[32];
  _mm512_store_ps(d, lo);
  _mm512_store_ps(d + 16, hi);
  for (uint32_t m = odd; m != 0; m &= m - 1) {
    const int i = __builtin_ctz(m);
    k16[i] = bf16_key(d[i]);
  }
}

}  // namespace

DELLA_AVX512_BW uint64_t bf16_to_f32_row(const uint8_t* __restrict src, uint64_t n, float* __restrict dst) {
  uint32_t bad = 0;  // n is below 2^32 (load_any sends longer loads elsewhere)
  uint64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    __m512 lo, hi;
    load32(src + 2 * j, lo, hi, bad);
    _mm512_storeu_ps(dst + j, lo);
    _mm512_storeu_ps(dst + j + 16, hi);
  }
  for (; j < n; ++j) {
    dst[j] = load_elem<DType::BF16>(src, j);
    bad += !is_finite_f32(dst[j]);
  }
  return bad;
}

DELLA_AVX512_BW uint64_t bf16_deltas_row(const uint8_t* __restrict src, uint64_t n, const float* __restrict b,
                                         float* __restrict d) {
  uint32_t bad = 0;  // one row: n is below 2^32
  uint64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    __m512 lo, hi;
    deltas32(src + 2 * j, b + j, lo, hi, bad);
    _mm512_storeu_ps(d + j, lo);
    _mm512_storeu_ps(d + j + 16, hi);
  }
  for (; j < n; ++j) {
    const float v = load_elem<DType::BF16>(src, j);
    bad += !is_finite_f32(v);
    d[j] = v - b[j];
  }
  return bad;
}

DELLA_AVX512_BF16 void bf16_keys_row(const float* __restrict d, uint64_t n, uint16_t* __restrict k16) {
  uint64_t j = 0;
  for (; j + 32 <= n; j += 32) keys32(k16 + j, _mm512_loadu_ps(d + j), _mm512_loadu_ps(d + j + 16));
  for (; j < n; ++j) k16[j] = bf16_key(d[j]);
}

DELLA_AVX512_BF16 void bf16_delta_keys_row(const uint8_t* __restrict src, uint64_t n, const float* __restrict b,
                                           uint16_t* __restrict k16) {
  uint32_t bad = 0;  // not reported here (the final pass counts them)
  uint64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    __m512 lo, hi;
    deltas32(src + 2 * j, b + j, lo, hi, bad);
    keys32(k16 + j, lo, hi);
  }
  for (; j < n; ++j) k16[j] = bf16_key(load_elem<DType::BF16>(src, j) - b[j]);
}

DELLA_AVX512_BF16 void f32_to_bf16_row(const float* __restrict v, uint64_t n, uint8_t* __restrict dst) {
  uint64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    __mmask32 odd;
    const __m512i h = round32(_mm512_loadu_ps(v + j), _mm512_loadu_ps(v + j + 16), odd);
    _mm512_storeu_si512(dst + 2 * j, h);
    for (uint32_t m = odd; m != 0; m &= m - 1) {
      const uint64_t i = j + static_cast<uint64_t>(__builtin_ctz(m));
      store_raw<uint16_t>(dst, i, f32_to_bf16(v[i]));
    }
  }
  for (; j < n; ++j) store_raw<uint16_t>(dst, j, f32_to_bf16(v[j]));
}

}  // namespace della::detail
#endif
