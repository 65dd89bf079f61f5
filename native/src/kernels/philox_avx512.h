// Philox4x32-10 with AVX-512 (SPEC §3), V x 8 consecutive blocks a call: the words of
// philox4x32_10, in the same order (kernel_tests compares them). Shared by the block
// generator (philox_cpu.cc) and the magprune pass, which interleaves it with its key
// counting (delta_pass.cc).
//
// Each block's four words live in the low halves of 64-bit lanes (8 blocks a vector),
// so one vpmuludq gives a whole 32x32->64 product: its high half is a shift away and
// its low half is the lane itself. The upper halves of the lanes carry garbage that
// nothing reads: vpmuludq looks at low halves only, and the words are packed from the
// low halves at the end.
#pragma once
#include <cstdint>

#include "row_io.h"

#if defined(DELLA_AVX512_PATHS)
#include "avx512_intrin.h"

namespace della::detail {

// Blocks g .. g + 8V - 1 of the stream (c2, c3) under key (k0, k1): 32V words into o.
template <int V>
__attribute__((target("avx512f"))) inline void philox_vectors_avx512(uint64_t g, uint32_t c2, uint32_t c3,
                                                                     uint32_t k0, uint32_t k1, uint32_t* __restrict o) {
  const __m512i m0 = _mm512_set1_epi64(0xD2511F53u), m1 = _mm512_set1_epi64(0xCD9E8D57u);
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  __m512i x0[V], x1[V], x2[V], x3[V];
  for (int v = 0; v < V; ++v) {
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
    for (int v = 0; v < V; ++v) {
      const __m512i p0 = _mm512_mul_epu32(x0[v], m0), p1 = _mm512_mul_epu32(x2[v], m1);
      // 0x96: a ^ b ^ c
      x0[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), x1[v], ka0, 0x96);
      x2[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), x3[v], ka1, 0x96);
      x1[v] = p1;
      x3[v] = p0;
    }
  }
  const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (int v = 0; v < V; ++v) {
    // 64-bit lane i: (w0, w1) and (w2, w3) of block i; then blocks in order, 4 a vector.
    const __m512i w01 = _mm512_mask_blend_epi32(0xAAAA, x0[v], _mm512_slli_epi64(x1[v], 32));
    const __m512i w23 = _mm512_mask_blend_epi32(0xAAAA, x2[v], _mm512_slli_epi64(x3[v], 32));
    const __m512i even = _mm512_unpacklo_epi64(w01, w23), odd = _mm512_unpackhi_epi64(w01, w23);  // blocks 0 2 4 6 | 1 3 5 7
    _mm512_storeu_si512(o + 32 * v, _mm512_permutex2var_epi64(even, first, odd));
    _mm512_storeu_si512(o + 32 * v + 16, _mm512_permutex2var_epi64(even, second, odd));
  }
}

}  // namespace della::detail
#endif
