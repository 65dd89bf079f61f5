// Philox4x32-10 blocks for the CPU passes (SPEC §3): AVX-512 when the CPU has it, 16
// blocks per step, else a loop the compiler vectorizes for AVX2 or plain x86-64. All
// give philox4x32_10's words exactly (kernel_tests compares them).
#include <cstring>

#include "della/philox.h"
#include "merge_state.h"
#include "row_io.h"

#if defined(DELLA_AVX512_PATHS)
#include <immintrin.h>
// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_epi32).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define DELLA_PHILOX_AVX512 1
#endif

namespace della::detail {
namespace {

#if defined(DELLA_PHILOX_AVX512)
// 4x4 transposes of 32-bit words within each 128-bit lane of four vectors.
__attribute__((target("avx512f"))) inline void transpose4(__m512i& a, __m512i& b, __m512i& c, __m512i& d) {
  const __m512i t0 = _mm512_unpacklo_epi32(a, b), t1 = _mm512_unpackhi_epi32(a, b);
  const __m512i t2 = _mm512_unpacklo_epi32(c, d), t3 = _mm512_unpackhi_epi32(c, d);
  a = _mm512_unpacklo_epi64(t0, t2);
  b = _mm512_unpackhi_epi64(t0, t2);
  c = _mm512_unpacklo_epi64(t1, t3);
  d = _mm512_unpackhi_epi64(t1, t3);
}

// The high and low halves of the 32x32->64 products m * c in each 32-bit lane:
// vpmuludq multiplies the even lanes, so the odd ones are shifted down first.
__attribute__((target("avx512f"))) inline void mul_hi_lo(__m512i c, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(c, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// Philox4x32-10 on 16 consecutive blocks at a time with AVX-512: the same words as
// philox4x32_10 (the kernel tests compare them), in the same order.
__attribute__((target("avx512f"))) void philox_blocks_avx512(uint64_t g0, uint64_t count, uint32_t c2, uint32_t c3,
                                                             uint32_t k0, uint32_t k1, uint32_t* __restrict out) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i m0 = _mm512_set1_epi64(0xD2511F53u), m1 = _mm512_set1_epi64(0xCD9E8D57u);
  uint64_t b = 0;
  for (; b + 16 <= count; b += 16) {
    const uint64_t g = g0 + b;
    // Counter low words g + lane; the high word carries where g + lane wraps 2^32.
    const __m512i lo = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g))), lane);
    const __mmask16 wrapped = _mm512_cmplt_epu32_mask(lo, _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g))));
    __m512i x0 = lo;
    __m512i x1 = _mm512_mask_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32))), wrapped,
                                       _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32))),
                                       _mm512_set1_epi32(1));
    __m512i x2 = _mm512_set1_epi32(static_cast<int>(c2)), x3 = _mm512_set1_epi32(static_cast<int>(c3));
    uint32_t a0 = k0, a1 = k1;
    for (int round = 0; round < 10; ++round) {
      if (round > 0) {
        a0 += 0x9E3779B9u;
        a1 += 0xBB67AE85u;
      }
      __m512i hi0, lo0, hi1, lo1;
      mul_hi_lo(x0, m0, hi0, lo0);
      mul_hi_lo(x2, m1, hi1, lo1);
      // 0x96: a ^ b ^ c
      const __m512i n0 = _mm512_ternarylogic_epi32(hi1, x1, _mm512_set1_epi32(static_cast<int>(a0)), 0x96);
      const __m512i n2 = _mm512_ternarylogic_epi32(hi0, x3, _mm512_set1_epi32(static_cast<int>(a1)), 0x96);
      x0 = n0;
      x1 = lo1;
      x2 = n2;
      x3 = lo0;
    }
    // Lane i of x0..x3 is block i's words 0..3: transpose to block order. After the
    // in-lane transposes, vector v holds blocks 4q + v's words in its 128-bit lane q.
    transpose4(x0, x1, x2, x3);
    const __m512i v01lo = _mm512_shuffle_i32x4(x0, x1, 0x44), v01hi = _mm512_shuffle_i32x4(x0, x1, 0xEE);
    const __m512i v23lo = _mm512_shuffle_i32x4(x2, x3, 0x44), v23hi = _mm512_shuffle_i32x4(x2, x3, 0xEE);
    uint32_t* o = out + 4 * b;
    _mm512_storeu_si512(o + 0, _mm512_shuffle_i32x4(v01lo, v23lo, 0x88));   // blocks 0..3
    _mm512_storeu_si512(o + 16, _mm512_shuffle_i32x4(v01lo, v23lo, 0xDD));  // blocks 4..7
    _mm512_storeu_si512(o + 32, _mm512_shuffle_i32x4(v01hi, v23hi, 0x88));  // blocks 8..11
    _mm512_storeu_si512(o + 48, _mm512_shuffle_i32x4(v01hi, v23hi, 0xDD));  // blocks 12..15
  }
  for (; b < count; ++b) {
    const uint64_t g = g0 + b;
    const Philox4 w = philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), c2, c3, k0, k1);
    std::memcpy(out + 4 * b, w.v, sizeof w.v);
  }
}

#endif


DELLA_SIMD_CLONES
void philox_blocks_portable(uint64_t g0, uint64_t count, uint32_t tensor_id, uint32_t expert, uint32_t k0, uint32_t k1,
                            uint32_t* __restrict out) {
  for (uint64_t b = 0; b < count; ++b) {
    const uint64_t g = g0 + b;
    const Philox4 w = philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), tensor_id, expert, k0, k1);
    out[4 * b + 0] = w.v[0];
    out[4 * b + 1] = w.v[1];
    out[4 * b + 2] = w.v[2];
    out[4 * b + 3] = w.v[3];
  }
}

}  // namespace

void philox_blocks(uint64_t g0, uint64_t count, uint32_t tensor_id, uint32_t expert, uint32_t k0, uint32_t k1,
                   uint32_t* out) {
#if defined(DELLA_PHILOX_AVX512)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) {
    philox_blocks_avx512(g0, count, tensor_id, expert, k0, k1, out);
    return;
  }
#endif
  philox_blocks_portable(g0, count, tensor_id, expert, k0, k1, out);
}

}  // namespace della::detail
