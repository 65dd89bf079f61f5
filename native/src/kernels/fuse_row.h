// Election and fuse of a row (SPEC §5), shared by the CPU passes. Always inlined, so
// each caller's SIMD build (see rowlocal.cc) vectorizes it for its own instruction set.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "della/merge_math.h"

#if defined(__GNUC__)
#define DELLA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define DELLA_ALWAYS_INLINE inline
#endif

namespace della::detail {

// v where keep, else +0, without a branch (random masks defeat branch prediction):
// the bit pattern of v and-ed with all ones or all zeros.
DELLA_ALWAYS_INLINE float keep_or_zero(bool keep, float v) {
  return bits_f32(f32_bits(v) & (0u - static_cast<uint32_t>(keep)));
}

// Election and fuse of a row, element-wise as fuse_element() but as loops over the
// row that compilers vectorize. Adding +0 for a non-agreeing expert equals skipping
// it: the sums start at +0 and only ever add same-signed values, so they are never -0.
DELLA_ALWAYS_INLINE void fuse_row(const float* __restrict vals, const float* w, unsigned K, uint64_t n, const FuseConfig& c,
              const float* __restrict base, std::vector<float>& tmp, float* __restrict out) {
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
    for (uint64_t j = 0; j < n; ++j) d[j] = d[j] == 0.0f ? 1.0f : d[j];
  }
  if (c.normalize)
    for (uint64_t j = 0; j < n; ++j) m[j] = m[j] / d[j];
  if (c.apply_lambda)
    for (uint64_t j = 0; j < n; ++j) m[j] = m[j] * c.lambda;
  if (base)
    for (uint64_t j = 0; j < n; ++j) m[j] = base[j] + m[j];
}

}  // namespace della::detail
