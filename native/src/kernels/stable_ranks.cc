// Stable ascending ranks of one row's 32-bit keys: the general ranking that magprune
// uses where the fused pass's 15-bit counting does not apply (fp32 keys, SPEC §4). The
// rank of an element is the number of elements with a smaller key, plus the number
// with an equal key and a smaller index.
//
// Narrow key ranges are counted directly; wide ones (fp32 keys span up to 2^31) are
// sorted by LSD radix (see wide_ranks).
#include <algorithm>
#include <cstdint>

#include "merge_state.h"

namespace della::detail {
namespace {

// Keys in [lo, lo + 2^width), width 16 to 32: LSD radix over those width bits, in as few
// passes of at most 11 bits as cover them (a 2^11 histogram stays in L1). One read of
// the keys fills every pass's histogram; each element travels as one 64-bit item, its
// key above its index; a pass whose digit is the same for every key is skipped. The
// pass count (two or three) is a template argument, so that the histogram loop unrolls.
template <unsigned passes>
void wide_ranks(const uint32_t* __restrict keys, uint64_t n, uint32_t lo, unsigned width, Scratch& s,
                uint32_t* __restrict ranks) {
  const unsigned bits = (width + passes - 1) / passes;
  const uint32_t radix = 1u << bits, mask = radix - 1;
  s.hist.assign(passes * radix, 0);
  uint32_t* __restrict h = s.hist.data();
  s.items.resize(n);
  s.items_tmp.resize(n);
  uint64_t* __restrict a = s.items.data();
  uint64_t* __restrict b = s.items_tmp.data();
  for (uint64_t j = 0; j < n; ++j) {
    const uint32_t key = keys[j] - lo;
    a[j] = static_cast<uint64_t>(key) << 32 | j;
    for (unsigned p = 0; p < passes; ++p) ++h[p * radix + ((key >> (p * bits)) & mask)];
  }
  for (unsigned p = 0; p < passes; ++p) {
    uint32_t* __restrict hp = h + p * radix;
    const unsigned shift = 32 + p * bits;
    if (hp[(a[0] >> shift) & mask] == n) continue;  // one digit for all: order unchanged
    uint32_t sum = 0;
    for (uint32_t d = 0; d < radix; ++d) {
      const uint32_t c = hp[d];
      hp[d] = sum;
      sum += c;
    }
    for (uint64_t j = 0; j < n; ++j) b[hp[(a[j] >> shift) & mask]++] = a[j];
    std::swap(a, b);
  }
  for (uint64_t p = 0; p < n; ++p) ranks[static_cast<uint32_t>(a[p])] = static_cast<uint32_t>(p);
}

}  // namespace

void stable_ranks(const uint32_t* __restrict keys, uint64_t n, Scratch& s, uint32_t* __restrict ranks) {
  if (n == 0) return;
  uint32_t lo = keys[0], hi = keys[0];
  for (uint64_t j = 1; j < n; ++j) {
    lo = std::min(lo, keys[j]);
    hi = std::max(hi, keys[j]);
  }
  const uint64_t range = static_cast<uint64_t>(hi) - lo + 1;
  if (range > 32768 && range > 4 * n + 256) {
    const unsigned width = 32 - static_cast<unsigned>(__builtin_clz(hi - lo));  // 16 to 32
    if (width <= 22) wide_ranks<2>(keys, n, lo, width, s, ranks);
    else wide_ranks<3>(keys, n, lo, width, s, ranks);
    return;
  }
  // Every half-precision key range: count the keys themselves.
  s.hist.assign(range, 0);
  uint32_t* __restrict h = s.hist.data();
  for (uint64_t j = 0; j < n; ++j) ++h[keys[j] - lo];
  uint32_t sum = 0;
  for (uint64_t b = 0; b < range; ++b) {
    const uint32_t c = h[b];
    h[b] = sum;
    sum += c;
  }
  for (uint64_t j = 0; j < n; ++j) ranks[j] = h[keys[j] - lo]++;
}

}  // namespace della::detail
