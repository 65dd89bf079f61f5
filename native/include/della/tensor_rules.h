// Host-side rules of SPEC §2 and §4 that every backend applies before its kernels: a
// tensor's rows, where an expert's row starts (the embedding sub-block rule) and where
// whole-tensor cuts fall.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "della/merge_math.h"

namespace della {

// A tensor as rows (SPEC §2): the last dimension is the row; a 1-D tensor is one row.
struct Geometry {
  uint64_t numel = 1;
  uint64_t n = 1;  // row length
  uint64_t rows = 0;
};

inline Geometry geometry(const std::vector<int64_t>& shape) {
  Geometry g;
  for (int64_t d : shape) g.numel *= static_cast<uint64_t>(d);
  g.n = shape.size() >= 2 ? static_cast<uint64_t>(shape.back()) : g.numel;
  g.rows = g.n == 0 ? 0 : g.numel / g.n;
  return g;
}

// Offset of base row r's first element inside an expert that may be larger in every
// dimension (the embedding sub-block rule of SPEC §2).
inline uint64_t expert_row_offset(const std::vector<int64_t>& base, const std::vector<int64_t>& ex, uint64_t r,
                                  uint64_t n) {
  if (base == ex) return r * n;
  if (base.size() <= 1) return 0;
  uint64_t offset = 0, stride = static_cast<uint64_t>(ex.back());
  for (size_t d = base.size() - 1; d-- > 0;) {
    const uint64_t bd = static_cast<uint64_t>(base[d]);
    offset += (r % bd) * stride;
    r /= bd;
    stride *= static_cast<uint64_t>(ex[d]);
  }
  return offset;
}

// Where a whole-tensor sparsifier cuts a tensor of N elements (SPEC §4), as counts of
// elements before each cut in the cut's order: magnitude keeps the first `a` in
// descending order; breadcrumbs keeps ascending ranks in [a, b).
struct CutPositions {
  uint64_t a = 0;
  uint64_t b = 0;
};

inline CutPositions cut_positions(Sparsifier s, double density, double gamma, uint64_t N) {
  const uint64_t target = static_cast<uint64_t>(std::floor(density * static_cast<double>(N)));
  if (s == Sparsifier::Magnitude) return CutPositions{target, 0};
  int64_t top = static_cast<int64_t>(std::floor(gamma * static_cast<double>(N)));
  int64_t bottom = static_cast<int64_t>(N) - static_cast<int64_t>(target) - top;
  if (bottom < 0) {
    top += bottom;
    bottom = 0;
  }
  return CutPositions{static_cast<uint64_t>(bottom), N - static_cast<uint64_t>(top)};
}

}  // namespace della
