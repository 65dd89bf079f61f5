// Row work of the whole-tensor pre-passes of TIES and breadcrumbs (SPEC §4): key
// histograms, from which the cuts are selected, and per-row counts of the cut keys,
// from which each row learns how many equal keys came before it. Built per SIMD level
// like the delta pass (see delta_pass.cc).
#include <algorithm>
#include <cstring>

#include "merge_state.h"
#include "row_io.h"

namespace della::detail {
namespace {

constexpr uint32_t kBins = 1u << 15;

// The 15-bit level-1 bin of each key: the key itself for half-precision keys, the
// high half of an fp32 key (its sign bit is clear).
DELLA_ALWAYS_INLINE void level1_bins(const uint32_t* __restrict k32, uint64_t n, uint16_t* __restrict out) {
  for (uint64_t j = 0; j < n; ++j) out[j] = static_cast<uint16_t>(k32[j] >> 16);
}

// The keys of expert k's row r: 15-bit keys into k16 (half precision, the deltas not
// stored), or 32-bit keys into k32 (the deltas go through d). Non-finite inputs are
// counted by the final pass.
DELLA_ALWAYS_INLINE void row_keys(const MergeTask& t, const TaskState& st, unsigned k, uint64_t r, const float* base,
                                  float* d, uint16_t* k16, uint32_t* k32) {
  const uint64_t n = st.g.n;
  const DType dt = t.experts[k].dtype;
  const uint8_t* src = expert_row(t, k, r, n);
  if (st.mode == KeyMode::BF16) delta_keys_any<1>(dt, src, n, base, k16);
  else if (st.mode == KeyMode::F16) delta_keys_any<2>(dt, src, n, base, k16);
  else deltas_any<3>(dt, src, n, base, d, k16, k32);
}

// The row buffers of both pre-passes, grown to rows of n.
struct RowBuffers {
  float* base;
  float* d;
  uint16_t* k16;
  uint32_t* k32;
};
RowBuffers row_buffers(Scratch& s, uint64_t n) {
  return {grown(s.base, n), grown(s.delta, n), grown(s.keys16, n), grown(s.keys, n)};
}

// Counts 15-bit bins into four tables, one per quarter of the row, so that runs of
// equal keys do not chain every increment through memory.
__attribute__((noinline)) void count_bins(const uint16_t* __restrict bins, uint64_t n, uint32_t* __restrict tables) {
  const uint64_t q = n / 4;
  uint32_t* __restrict h0 = tables;
  uint32_t* __restrict h1 = tables + kBins;
  uint32_t* __restrict h2 = tables + 2 * kBins;
  uint32_t* __restrict h3 = tables + 3 * kBins;
  for (uint64_t j = 0; j < q; ++j) {
    ++h0[bins[j]];
    ++h1[bins[q + j]];
    ++h2[bins[2 * q + j]];
    ++h3[bins[3 * q + j]];
  }
  for (uint64_t j = 4 * q; j < n; ++j) ++h3[bins[j]];
}

// The nonzero bins of a row lie in [lo, hi] (bin 0, the unchanged parameters, is
// common and kept apart): a vector min/max pass instead of a touched flag stored per
// element.
struct BinRange {
  uint32_t lo = kBins, hi = 0;
};
DELLA_ALWAYS_INLINE void widen(BinRange& r, const uint16_t* __restrict bins, uint64_t n) {
  uint32_t lo = kBins - 1, hi = 0;
  for (uint64_t j = 0; j < n; ++j) {
    const uint32_t b = bins[j];
    lo = std::min(lo, b == 0 ? kBins - 1 : b);
    hi = std::max(hi, b);
  }
  r.lo = std::min(r.lo, lo);
  r.hi = std::max(r.hi, hi);
}

// Adds the four tables' bins 0 and [lo, hi] into `total` and zeroes them again.
void flush_bins(uint32_t* __restrict tables, BinRange r, uint64_t* __restrict total) {
  auto flush = [&](uint32_t i) {
    total[i] += static_cast<uint64_t>(tables[i]) + tables[kBins + i] + tables[2 * kBins + i] + tables[3 * kBins + i];
    tables[i] = tables[kBins + i] = tables[2 * kBins + i] = tables[3 * kBins + i] = 0;
  };
  flush(0);
  for (uint32_t i = std::max<uint32_t>(r.lo, 1); i <= r.hi && i < kBins; ++i) flush(i);
}

DELLA_SIMD_CLONES
void histogram_rows_impl(const MergeTask& t, const TaskState& st, uint64_t r0, uint64_t r1, Scratch& s, int level,
                         const std::vector<uint32_t>& hi_filter, std::vector<std::vector<uint64_t>>& hists) {
  const uint64_t n = st.g.n;
  const unsigned K = static_cast<unsigned>(t.experts.size());
  const auto [base, d, k16, k32] = row_buffers(s, n);
  uint32_t* tables = grown(s.hist15, 4 * kBins);
  for (unsigned k = 0; k < K; ++k) {
    if (!st.ex[k].sparse) continue;
    BinRange range;
    for (uint64_t r = r0; r < r1; ++r) {
      load_base_row(t, r, n, base);
      row_keys(t, st, k, r, base, d, k16, k32);
      if (st.mode == KeyMode::F32) {
        if (level == 1) {
          level1_bins(k32, n, k16);
        } else {
          uint64_t* __restrict h = hists[k].data();
          const uint32_t hi = hi_filter[k];
          for (uint64_t j = 0; j < n; ++j)
            if ((k32[j] >> 16) == hi) ++h[k32[j] & 0xffffu];
          continue;
        }
      }
      widen(range, k16, n);
      count_bins(k16, n, tables);
    }
    // Counts stay below 2^32: a call covers one work item of about 2^16 elements.
    flush_bins(tables, range, hists[k].data());
  }
}

DELLA_SIMD_CLONES
void cut_key_counts_impl(const MergeTask& t, const TaskState& st, uint64_t r0, uint64_t r1, Scratch& s,
                         const uint8_t* active, std::vector<uint64_t>& a_counts, std::vector<uint64_t>& b_counts) {
  const uint64_t n = st.g.n;
  const unsigned K = static_cast<unsigned>(t.experts.size());
  const auto [base, d, k16, k32] = row_buffers(s, n);
  for (uint64_t r = r0; r < r1; ++r) {
    load_base_row(t, r, n, base);
    for (unsigned k = 0; k < K; ++k) {
      const ExpertState& es = st.ex[k];
      if (!active[k]) continue;
      uint64_t a = 0, b = 0;
      const uint32_t ka = es.cut_a.key, kb = es.cut_b.key;
      if (st.mode == KeyMode::F32) {
        row_keys(t, st, k, r, base, d, k16, k32);
        for (uint64_t j = 0; j < n; ++j) {
          a += k32[j] == ka;
          b += k32[j] == kb;
        }
      } else {
        // Half-precision keys: counted in one loop from the inputs, nothing stored.
        const uint8_t* src = expert_row(t, k, r, n);
        const DType dt = t.experts[k].dtype;
        if (st.mode == KeyMode::BF16) count_cut_keys_any<1>(dt, src, n, base, ka, kb, a, b);
        else count_cut_keys_any<2>(dt, src, n, base, ka, kb, a, b);
      }
      a_counts[r * K + k] = a;
      b_counts[r * K + k] = b;
    }
  }
}

}  // namespace

void histogram_rows(const MergeTask& t, const TaskState& st, uint64_t r0, uint64_t r1, Scratch& s, int level,
                    const std::vector<uint32_t>& hi_filter, std::vector<std::vector<uint64_t>>& hists) {
  histogram_rows_impl(t, st, r0, r1, s, level, hi_filter, hists);
}

void cut_key_counts(const MergeTask& t, const TaskState& st, uint64_t r0, uint64_t r1, Scratch& s,
                    const uint8_t* active, std::vector<uint64_t>& a_counts, std::vector<uint64_t>& b_counts) {
  cut_key_counts_impl(t, st, r0, r1, s, active, a_counts, b_counts);
}

}  // namespace della::detail
