// F16 rows through the F16C conversion instructions (AVX2 machines and later), eight
// values a step, instead of the integer selects of row_io.h: the same values bit for
// bit. Hardware conversion is exact and rounds to nearest even (imm8 0x08, whatever
// MXCSR says), subnormals included; only NaNs differ (the hardware quiets a signaling
// half, and keeps a float NaN's sign and payload), so NaN lanes are patched to what
// f16_to_f32_select / f32_to_f16_select give. kernel_tests compares both ways.
#include "row_io.h"

#if defined(DELLA_F16C_PATHS)
#include <cpuid.h>
#include <immintrin.h>

namespace della::detail {

#define DELLA_F16C __attribute__((target("avx2,f16c")))

// F16C from CPUID leaf 1 (GCC 10's __builtin_cpu_supports has no "f16c"); "avx2" also
// says that the OS saves the YMM registers.
bool have_f16c() {
  static const bool yes = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __builtin_cpu_supports("avx2") && __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;
  }();
  return yes;
}

DELLA_F16C uint64_t f16_to_f32_row(const uint8_t* __restrict src, uint64_t n, float* __restrict dst) {
  const __m256i exp = _mm256_set1_epi32(0x7c00), man = _mm256_set1_epi32(0x3ff);
  const __m256i sign = _mm256_set1_epi32(0x8000), inf = _mm256_set1_epi32(0x7f800000);
  uint64_t bad = 0, j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * j));
    __m256 v = _mm256_cvtph_ps(h);
    const __m256i w = _mm256_cvtepu16_epi32(h);
    const __m256i special = _mm256_cmpeq_epi32(_mm256_and_si256(w, exp), exp);  // Inf or NaN
    bad += static_cast<uint64_t>(__builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(special))));
    // Inf and NaN as sign | 0x7f800000 | man << 13 (a signaling NaN stays signaling).
    const __m256i patched = _mm256_or_si256(_mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(w, sign), 16), inf),
                                            _mm256_slli_epi32(_mm256_and_si256(w, man), 13));
    v = _mm256_blendv_ps(v, _mm256_castsi256_ps(patched), _mm256_castsi256_ps(special));
    _mm256_storeu_ps(dst + j, v);
  }
  for (; j < n; ++j) {
    uint16_t h;
    std::memcpy(&h, src + 2 * j, 2);
    dst[j] = f16_to_f32_select(h);
    bad += !is_finite_f32(dst[j]);
  }
  return bad;
}

// Eight fp32 values to halves (RNE), NaN as the canonical 0x7e00, packed as eight
// uint16.
DELLA_F16C inline __m128i to_f16x8(__m256 v) {
  const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i x = _mm256_castps_si256(v);
  const __m256i ax = _mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff));
  const __m256i nan = _mm256_cmpgt_epi32(ax, _mm256_set1_epi32(0x7f800000));  // ax < 2^31: signed compare is fine
  // The lanes' NaN flags, packed to 16 bits like h.
  const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(nan), _mm256_extracti128_si256(nan, 1));
  return _mm_blendv_epi8(h, _mm_set1_epi16(0x7e00), nan16);
}

DELLA_F16C void f32_to_f16_row(const float* __restrict v, uint64_t n, uint8_t* __restrict dst) {
  uint64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * j), to_f16x8(_mm256_loadu_ps(v + j)));
  for (; j < n; ++j) {
    const uint16_t h = f32_to_f16_select(v[j]);
    std::memcpy(dst + 2 * j, &h, 2);
  }
}

DELLA_F16C void f16_keys_row(const float* __restrict d, uint64_t n, uint16_t* __restrict k16) {
  const __m128i low15 = _mm_set1_epi16(0x7fff);
  uint64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(k16 + j), _mm_and_si128(to_f16x8(_mm256_loadu_ps(d + j)), low15));
  for (; j < n; ++j) k16[j] = static_cast<uint16_t>(f32_to_f16_select(d[j]) & 0x7fffu);
}

}  // namespace della::detail
#endif
