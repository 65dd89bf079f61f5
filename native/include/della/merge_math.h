// Per-element merge math of SPEC §4-5, shared by every backend. Each function is one
// step of the SPEC in its exact fp32 operation order; the kernels only arrange loops.
#pragma once
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

}  // namespace della
