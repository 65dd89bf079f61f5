// Philox4x32-10 blocks for the CPU passes (SPEC §3): AVX-512 when the CPU has it, 32
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
#pragma GCC diagnostic ignored "-Wuninitialized"
#define DELLA_PHILOX_AVX512 1
#endif

namespace della::detail {
namespace {

#if defined(DELLA_PHILOX_AVX512)
// Philox4x32-10 with AVX-512, 32 consecutive blocks per step: the same words as
// philox4x32_10 (the kernel tests compare them), in the same order. Each block's four
// words live in the low halves of 64-bit lanes (8 blocks a vector, 4 vectors a step),
// so one vpmuludq gives a whole 32x32->64 product: its high half is a shift away and
// its low half is the lane itself. The upper halves of the lanes carry garbage that
// nothing reads: vpmuludq looks at low halves only, and the words are packed from
// the low halves at the end.
constexpr int kVecs = 4;

__attribute__((target("avx512f"))) inline void philox_step_avx512(uint64_t g, uint32_t c2, uint32_t c3, uint32_t k0,
                                                                  uint32_t k1, uint32_t* __restrict o) {
  const __m512i m0 = _mm512_set1_epi64(0xD2511F53u), m1 = _mm512_set1_epi64(0xCD9E8D57u);
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  __m512i x0[kVecs], x1[kVecs], x2[kVecs], x3[kVecs];
  for (int v = 0; v < kVecs; ++v) {
    // The 64-bit block counter g + 8v + lane: its low word, and its high word (which
    // carries where the low word wraps).
    const __m512i ctr = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(g + 8 * v)), lane);
    x0[v] = ctr;
    x1[v] = _mm512_srli_epi64(ctr, 32);
    x2[v] = _mm512_set1_epi64(c2);
    x3[v] = _mm512_set1_epi64(c3);
  }
  uint32_t a0 = k0, a1 = k1;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      a0 += 0x9E3779B9u;
      a1 += 0xBB67AE85u;
    }
    const __m512i ka0 = _mm512_set1_epi64(a0), ka1 = _mm512_set1_epi64(a1);
    for (int v = 0; v < kVecs; ++v) {
      const __m512i p0 = _mm512_mul_epu32(x0[v], m0), p1 = _mm512_mul_epu32(x2[v], m1);
      // 0x96: a ^ b ^ c
      x0[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), x1[v], ka0, 0x96);
      x2[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), x3[v], ka1, 0x96);
      x1[v] = p1;
      x3[v] = p0;
    }
  }
  const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (int v = 0; v < kVecs; ++v) {
    // 64-bit lane i: (w0, w1) and (w2, w3) of block i; then blocks in order, 4 a vector.
    const __m512i w01 = _mm512_mask_blend_epi32(0xAAAA, x0[v], _mm512_slli_epi64(x1[v], 32));
    const __m512i w23 = _mm512_mask_blend_epi32(0xAAAA, x2[v], _mm512_slli_epi64(x3[v], 32));
    const __m512i even = _mm512_unpacklo_epi64(w01, w23), odd = _mm512_unpackhi_epi64(w01, w23);  // blocks 0 2 4 6 | 1 3 5 7
    _mm512_storeu_si512(o + 32 * v, _mm512_permutex2var_epi64(even, first, odd));
    _mm512_storeu_si512(o + 32 * v + 16, _mm512_permutex2var_epi64(even, second, odd));
  }
}

__attribute__((target("avx512f"))) void philox_blocks_avx512(uint64_t g0, uint64_t count, uint32_t c2, uint32_t c3,
                                                             uint32_t k0, uint32_t k1, uint32_t* __restrict out) {
  uint64_t b = 0;
  for (; b + 8 * kVecs <= count; b += 8 * kVecs) philox_step_avx512(g0 + b, c2, c3, k0, k1, out + 4 * b);
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
