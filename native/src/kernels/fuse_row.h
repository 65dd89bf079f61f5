// Election and fuse of a row (SPEC §5), shared by the CPU passes. Always inlined, so
// each caller's SIMD build (see rowlocal.cc) vectorizes it for its own instruction set.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "della/merge_math.h"

#if defined(__GNUC__)
#define DELLA_ALWAYS_INLINE inline __attribute__((always_inline))
// For lambdas inside the SIMD-cloned row functions: an outlined lambda is compiled for
// baseline x86-64, not for its caller's clone (measured 2x slower).
#define DELLA_INLINE_LAMBDA __attribute__((always_inline))
#else
#define DELLA_ALWAYS_INLINE inline
#define DELLA_INLINE_LAMBDA
#endif

namespace della::detail {

// v where keep, else +0, without a branch (random masks defeat branch prediction):
// the bit pattern of v and-ed with all ones or all zeros.
DELLA_ALWAYS_INLINE float keep_or_zero(bool keep, float v) {
  return bits_f32(f32_bits(v) & (0u - static_cast<uint32_t>(keep)));
}

// d where d != 0, else 1, as a bitwise select: GCC 10 turned the plain conditional
// followed by m / d into a branch around the division, which kept the whole fuse loop
// scalar (the release binary is built with GCC 10; GCC 12 vectorized it either way).
DELLA_ALWAYS_INLINE float one_if_zero(float d) {
  const uint32_t zero = 0u - static_cast<uint32_t>(d == 0.0f);
  return bits_f32((f32_bits(d) & ~zero) | (f32_bits(1.0f) & zero));
}

// The same election and fuse in one pass for a fixed number of experts: the K weighted
// deltas stay in registers, so each element costs K + 1 loads and one store instead of
// a sweep over the row per step. The operations and their order are fuse_row's.
template <int K, Consensus C, bool Normalize, bool Lambda, bool Base>
DELLA_ALWAYS_INLINE void fuse_row_fixed_loop(const float* __restrict vals, const float* w, uint64_t n, float lambda,
                                             const float* __restrict base, float* __restrict out) {
  float wk[K];
  for (int k = 0; k < K; ++k) wk[k] = w[k];
  for (uint64_t j = 0; j < n; ++j) {
    float p[K];
    for (int k = 0; k < K; ++k) p[k] = wk[k] * vals[static_cast<size_t>(k) * n + j];
    float m = 0.0f, d = 0.0f;
    if constexpr (C == Consensus::None) {
      for (int k = 0; k < K; ++k) {
        m = m + p[k];
        d = d + wk[k];
      }
      d = std::fabs(d) <= 1e-8f ? 1.0f : d;
    } else {
      float sum = 0.0f;
      for (int k = 0; k < K; ++k) {
        if constexpr (C == Consensus::Sum) sum = sum + p[k];
        else sum = sum + static_cast<float>(static_cast<int>(p[k] > 0.0f) - static_cast<int>(p[k] < 0.0f));
      }
      const bool positive = sum >= 0.0f;
      for (int k = 0; k < K; ++k) {
        const bool agree = (positive & (p[k] > 0.0f)) | (!positive & (p[k] < 0.0f));
        m = m + keep_or_zero(agree, p[k]);
        d = d + keep_or_zero(agree, wk[k]);
      }
      d = one_if_zero(d);
    }
    if constexpr (Normalize) m = m / d;
    if constexpr (Lambda) m = m * lambda;
    if constexpr (Base) out[j] = base[j] + m;
    else out[j] = m;
  }
}

// The test for a base outside the loop: GCC 10 left it inside, and the loop scalar.
template <int K, Consensus C, bool Normalize, bool Lambda>
DELLA_ALWAYS_INLINE void fuse_row_fixed(const float* __restrict vals, const float* w, uint64_t n, float lambda,
                                        const float* __restrict base, float* __restrict out) {
  if (base) fuse_row_fixed_loop<K, C, Normalize, Lambda, true>(vals, w, n, lambda, base, out);
  else fuse_row_fixed_loop<K, C, Normalize, Lambda, false>(vals, w, n, lambda, base, out);
}

template <int K, Consensus C>
DELLA_ALWAYS_INLINE void fuse_row_k(const float* vals, const float* w, uint64_t n, const FuseConfig& c,
                                    const float* base, float* out) {
  if (c.normalize) {
    if (c.apply_lambda) fuse_row_fixed<K, C, true, true>(vals, w, n, c.lambda, base, out);
    else fuse_row_fixed<K, C, true, false>(vals, w, n, c.lambda, base, out);
  } else {
    if (c.apply_lambda) fuse_row_fixed<K, C, false, true>(vals, w, n, c.lambda, base, out);
    else fuse_row_fixed<K, C, false, false>(vals, w, n, c.lambda, base, out);
  }
}

template <int K>
DELLA_ALWAYS_INLINE void fuse_row_c(const float* vals, const float* w, uint64_t n, const FuseConfig& c,
                                    const float* base, float* out) {
  switch (c.consensus) {
    case Consensus::None: fuse_row_k<K, Consensus::None>(vals, w, n, c, base, out); break;
    case Consensus::Sum: fuse_row_k<K, Consensus::Sum>(vals, w, n, c, base, out); break;
    default: fuse_row_k<K, Consensus::Count>(vals, w, n, c, base, out); break;
  }
}

// Election and fuse of a row, element-wise as fuse_element() but as loops over the
// row that compilers vectorize. Adding +0 for a non-agreeing expert equals skipping
// it: the sums start at +0 and only ever add same-signed values, so they are never -0.
DELLA_ALWAYS_INLINE void fuse_row(const float* __restrict vals, const float* w, unsigned K, uint64_t n, const FuseConfig& c,
              const float* __restrict base, std::vector<float>& tmp, float* __restrict out) {
  switch (K) {  // the usual expert counts in one pass each
    case 1: fuse_row_c<1>(vals, w, n, c, base, out); return;
    case 2: fuse_row_c<2>(vals, w, n, c, base, out); return;
    case 3: fuse_row_c<3>(vals, w, n, c, base, out); return;
    case 4: fuse_row_c<4>(vals, w, n, c, base, out); return;
    default: break;
  }
  tmp.resize(2 * n);
  float* __restrict m = out;
  float* __restrict d = tmp.data();
  float* __restrict sum = tmp.data() + n;
  for (uint64_t j = 0; j < n; ++j) m[j] = d[j] = 0.0f;
  if (c.consensus == Consensus::None) {
    for (unsigned k = 0; k < K; ++k) {
      const float* v = vals + static_cast<size_t>(k) * n;
      const float wk = w[k];
      for (uint64_t j = 0; j < n; ++j) {
        m[j] = m[j] + wk * v[j];
        d[j] = d[j] + wk;
      }
    }
    // |d| < 1e-8 in binary64 is |d| <= 1e-8f for floats: 1e-8f is the largest float below 1e-8.
    for (uint64_t j = 0; j < n; ++j) d[j] = std::fabs(d[j]) <= 1e-8f ? 1.0f : d[j];
  } else {
    if (c.consensus == Consensus::Sum) {
      for (uint64_t j = 0; j < n; ++j) sum[j] = 0.0f;
      for (unsigned k = 0; k < K; ++k) {
        const float* v = vals + static_cast<size_t>(k) * n;
        const float wk = w[k];
        for (uint64_t j = 0; j < n; ++j) sum[j] = sum[j] + wk * v[j];
      }
    } else {
      for (uint64_t j = 0; j < n; ++j) sum[j] = 0.0f;
      for (unsigned k = 0; k < K; ++k) {
        const float* v = vals + static_cast<size_t>(k) * n;
        const float wk = w[k];
        for (uint64_t j = 0; j < n; ++j) {
          const float p = wk * v[j];
          sum[j] = sum[j] + static_cast<float>(static_cast<int>(p > 0.0f) - static_cast<int>(p < 0.0f));  // exact
        }
      }
    }
    for (unsigned k = 0; k < K; ++k) {
      const float* v = vals + static_cast<size_t>(k) * n;
      const float wk = w[k];
      for (uint64_t j = 0; j < n; ++j) {
        const float p = wk * v[j];
        const bool positive = sum[j] >= 0.0f;
        const bool agree = (positive & (p > 0.0f)) | (!positive & (p < 0.0f));
        m[j] = m[j] + keep_or_zero(agree, p);
        d[j] = d[j] + keep_or_zero(agree, wk);
      }
    }
    for (uint64_t j = 0; j < n; ++j) d[j] = one_if_zero(d[j]);
  }
  if (c.normalize)
    for (uint64_t j = 0; j < n; ++j) m[j] = m[j] / d[j];
  if (c.apply_lambda)
    for (uint64_t j = 0; j < n; ++j) m[j] = m[j] * c.lambda;
  if (base)
    for (uint64_t j = 0; j < n; ++j) m[j] = base[j] + m[j];
}

}  // namespace della::detail
