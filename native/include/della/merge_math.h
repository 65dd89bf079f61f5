// Per-element merge math of SPEC §4-5, shared by every backend. Each function is one
// step of the SPEC in its exact fp32 operation order; the kernels only arrange loops.
#pragma once
#include <cmath>

#include "della/dtype.h"

namespace della {

enum class Sparsifier : uint8_t { None = 0, Magprune = 1, Random = 2, Magnitude = 3, Breadcrumbs = 4 };
enum class Rescale : uint8_t { None = 0, Inverse = 1, L1 = 2, L2 = 3, Linf = 4 };
enum class Consensus : uint8_t { None = 0, Sum = 1, Count = 2 };

// MAGPRUNE's window: lo = f32(d - eps), span = f32(2 eps), both taken in binary64.
struct MagpruneCoef {
  float lo;
  float span;
};

DELLA_HD MagpruneCoef magprune_coef(double density, double epsilon) {
  return MagpruneCoef{static_cast<float>(density - epsilon), static_cast<float>(2.0 * epsilon)};
}

// Keep probability of the element of stable ascending rank r in a row of n. U is the
// integer type of r and n: a GPU converts 32-bit integers faster than 64-bit ones, and
// both convert a value below 2^32 to the same float.
template <class U>
DELLA_HD float magprune_q_of(U r, U n, MagpruneCoef c) {
  const float u = n >= 2 ? static_cast<float>(r) / static_cast<float>(n - 1) : 0.5f;
  const float t = c.span * u;
  return c.lo + t;
}

DELLA_HD float magprune_q(uint64_t r, uint64_t n, MagpruneCoef c) { return magprune_q_of<uint64_t>(r, n, c); }

// f32(r) / f32(m) for integers 0 <= r <= m < kSmallRatioMax, given fm = f32(m) and
// inv = 1.0f / fm: the reciprocal's product, corrected once by its exact remainder
// (Markstein). It equals the IEEE division for every such r and m (kernel_tests checks
// all 134 M pairs), without the division's range check and slow-path branch on a GPU,
// and with one reciprocal per row instead of one per element.
constexpr uint32_t kSmallRatioMax = 16384;
DELLA_HD float small_ratio(uint32_t r, float fm, float inv) {
  const float fr = static_cast<float>(r);
  const float q0 = fr * inv;
  const float e = fmaf(-q0, fm, fr);
  return fmaf(e, inv, q0);
}

// magprune_q_of for a row of n <= kSmallRatioMax, with fm = f32(n - 1) and inv = 1 / fm:
// the same u, then the same two operations.
DELLA_HD float magprune_q_small(uint32_t r, uint32_t n, float fm, float inv, MagpruneCoef c) {
  const float u = n >= 2 ? small_ratio(r, fm, inv) : 0.5f;
  const float t = c.span * u;
  return c.lo + t;
}

// m / d in IEEE binary32, a zero dividend answered without dividing: CUDA's correctly
// rounded division sends a zero dividend to its slow path (its fast path would lose the
// sign of -0 / d), and a fuse divides zero wherever every expert was dropped, a fifth or
// more of the elements. The sign of 0 / d is the two signs' exclusive or; 0 / 0 and
// 0 / NaN still divide (NaN).
// The dividend goes through an empty asm on the GPU: without it the compiler, seeing the
// quotient unused where zero holds, divided m itself and kept the slow path.
DELLA_HD float divide_zero_fast(float m, float d) {
  const bool zero = (f32_bits(m) << 1) == 0 && d == d && d != 0.0f;
  float num = zero ? 1.0f : m;
#ifdef __CUDA_ARCH__
  asm("mov.b32 %0, %1;" : "=f"(num) : "f"(num));
#endif
  const float q = num / d;
  return zero ? bits_f32((f32_bits(m) ^ f32_bits(d)) & 0x80000000u) : q;
}

// The larger of two norms for the linf rescale, NaN when either is NaN (as
// JavaScript's Math.max and IEEE 754-2019 maximum): a non-finite delta, allowed with
// --allow-nonfinite, makes the norm NaN instead of being skipped.
DELLA_HD double max_or_nan(double a, double b) { return (a > b || a != a) ? a : b; }

// Inverse rescale 1/(1-p) = 1/q: one fp32 division, applied with one multiplication.
DELLA_HD float inverse_scale(float q) { return 1.0f / q; }

struct FuseConfig {
  int k;                 // number of experts
  Consensus consensus;
  bool normalize;
  bool apply_lambda;     // lambda != 1 (compared in binary64)
  float lambda;          // f32(lambda)
};

// Election and fuse of one element: p[k] = f32(w_k) * delta'_k, w[k] = f32(w_k).
// Returns M, the value added to the base.
DELLA_HD float fuse_element(const float* p, const float* w, const FuseConfig& c) {
  float m = 0.0f, d = 0.0f;
  if (c.consensus == Consensus::None) {
    for (int k = 0; k < c.k; ++k) {
      m = m + p[k];
      d = d + w[k];
    }
    const double ad = d < 0.0f ? -static_cast<double>(d) : static_cast<double>(d);
    if (ad < 1e-8) d = 1.0f;
  } else {
    bool positive;
    if (c.consensus == Consensus::Sum) {
      float s = 0.0f;
      for (int k = 0; k < c.k; ++k) s = s + p[k];
      positive = s >= 0.0f;
    } else {
      int s = 0;
      for (int k = 0; k < c.k; ++k) s += (p[k] > 0.0f) - (p[k] < 0.0f);
      positive = s >= 0;
    }
    for (int k = 0; k < c.k; ++k) {
      if (positive ? p[k] > 0.0f : p[k] < 0.0f) {
        m = m + p[k];
        d = d + w[k];
      }
    }
    if (d == 0.0f) d = 1.0f;
  }
  if (c.normalize) m = m / d;
  if (c.apply_lambda) m = m * c.lambda;
  return m;
}

// fuse_element for K experts and the sum (or no) consensus fixed at compile time, as the
// GPU's 16-bit fuse kernel runs it: the same operations in the same order, with no
// per-element tests of K or of the consensus kind, agreement as one compare (a zero or
// a NaN agrees with neither sign), the +0 of a disagreeing expert as a select, and the
// division by divide_zero_fast. kernel_tests compares it with fuse_element.
template <int K, Consensus C>
DELLA_HD float fuse_element_fixed(const float (&p)[K], const float (&w)[K], bool normalize, bool apply_lambda,
                                  float lambda) {
  static_assert(C == Consensus::Sum || C == Consensus::None, "the count consensus takes fuse_element");
  float m = 0.0f, d = 0.0f;
  if constexpr (C == Consensus::None) {
    for (int k = 0; k < K; ++k) {
      m = m + p[k];
      d = d + w[k];
    }
    d = fabsf(d) <= 1e-8f ? 1.0f : d;  // the floats below 1e-8 are those up to f32(1e-8)
  } else {
    float sum = 0.0f;
    for (int k = 0; k < K; ++k) sum = sum + p[k];
    const bool positive = sum >= 0.0f;
    for (int k = 0; k < K; ++k) {
      const bool agree = (positive ? p[k] : -p[k]) > 0.0f;
      m = m + (agree ? p[k] : 0.0f);
      d = d + (agree ? w[k] : 0.0f);
    }
    d = d == 0.0f ? 1.0f : d;
  }
  if (normalize) m = divide_zero_fast(m, d);
  if (apply_lambda) m = m * lambda;
  return m;
}

}  // namespace della
