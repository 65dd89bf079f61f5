// Row work of the whole-tensor pre-passes of TIES and breadcrumbs (SPEC §4): key
// histograms, from which the cuts are selected, and per-row counts of the cut keys,
// from which each row learns how many equal keys came before it. Built per SIMD level
// like the delta pass (see delta_pass.cc).
#include <algorithm>
#include <cstring>

#include "merge_state.h"
#include "row_io.h"
#if defined(DELLA_AVX512_PATHS)
#include <immintrin.h>
#endif

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
  if (st.mode == KeyMode::BF16) delta_keys_any<1>(dt, src, n, base, k16, d);
  else if (st.mode == KeyMode::F16) delta_keys_any<2>(dt, src, n, base, k16, d);
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

// The keys of a row inside a bracket [lo, lo + w), as key - lo, into list (room for n +
// 32); adds the keys below lo to `below`. Returns how many went to the list.
DELLA_ALWAYS_INLINE uint32_t bracket_keys_scalar(const uint16_t* __restrict keys, uint64_t n, uint32_t lo, uint32_t w,
                                                 uint16_t* __restrict list, uint64_t& below) {
  uint32_t m = 0;
  uint64_t bl = 0;
  for (uint64_t j = 0; j < n; ++j) {
    const uint32_t rel = static_cast<uint32_t>(keys[j]) - lo;  // wraps above w for keys below lo
    list[m] = static_cast<uint16_t>(rel);
    m += rel < w;
    bl += keys[j] < lo;
  }
  below += bl;
  return m;
}

#if defined(DELLA_AVX512_PATHS)
#define DELLA_AVX512_VBMI2 __attribute__((target("avx512f,avx512bw,avx512vbmi2")))
inline bool have_avx512_vbmi2() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vbmi2");
  return yes;
}

// The same, 32 keys a step: two compares, a compress of the keys inside (most rows put
// a few per cent there) and a store at the list's end.
DELLA_AVX512_VBMI2 uint32_t bracket_keys_avx512(const uint16_t* __restrict keys, uint64_t n, uint32_t lo, uint32_t w,
                                                uint16_t* __restrict list, uint64_t& below) {
  const __m512i vlo = _mm512_set1_epi16(static_cast<short>(lo)), vw = _mm512_set1_epi16(static_cast<short>(w));
  uint32_t m = 0;
  uint64_t bl = 0;
  for (uint64_t j = 0; j < n; j += 32) {
    const uint64_t left = n - j;
    const __mmask32 tm = left >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << left) - 1u);
    const __m512i k = _mm512_maskz_loadu_epi16(tm, keys + j);
    const __m512i rel = _mm512_sub_epi16(k, vlo);
    const __mmask32 in = _mm512_mask_cmplt_epu16_mask(tm, rel, vw);
    bl += static_cast<uint64_t>(__builtin_popcount(_mm512_mask_cmplt_epu16_mask(tm, k, vlo)));
    _mm512_storeu_si512(list + m, _mm512_maskz_compress_epi16(in, rel));
    m += static_cast<uint32_t>(__builtin_popcount(in));
  }
  below += bl;
  return m;
}
#endif

// Adds list[0..m) (values below w) into eight tables of w counters, element j into
// table j mod 8: a run of equal keys (common: few-ulp deltas share a handful of keys)
// then chains an increment through memory only every eighth element.
__attribute__((noinline)) void count_list(const uint16_t* __restrict list, uint32_t m, uint32_t* __restrict tables,
                                          uint32_t w) {
  uint32_t j = 0;
  for (; j + 8 <= m; j += 8)
    for (uint32_t c = 0; c < 8; ++c) ++tables[c * w + list[j + c]];
  for (; j < m; ++j) ++tables[list[j]];
}

DELLA_SIMD_CLONES
void bracket_rows_impl(const MergeTask& t, const TaskState& st, uint64_t item, uint64_t r0, uint64_t r1, Scratch& s,
                       std::vector<BracketCounts>& brackets) {
  const uint64_t n = st.g.n;
  const unsigned K = static_cast<unsigned>(t.experts.size());
  float* base = grown(s.base, n);
  uint16_t* k16 = grown(s.keys16, n);
  uint16_t* list = grown(s.bracket_list, n + 32);
  float* tmp = grown(s.delta, n);
  // Each active bracket's eight tables, side by side; zero between work items.
  std::vector<size_t> at(brackets.size(), 0);
  size_t total = 0;
  for (size_t i = 0; i < brackets.size(); ++i) {
    at[i] = total;
    total += 8 * static_cast<size_t>(brackets[i].w);
  }
  if (s.bracket_tables.size() < total) s.bracket_tables.assign(total, 0);
  uint32_t* tables = s.bracket_tables.data();
  std::vector<uint64_t> below(brackets.size(), 0);
#if defined(DELLA_AVX512_PATHS)
  const bool vbmi2 = have_avx512_vbmi2();
#endif
  for (uint64_t r = r0; r < r1; ++r) {
    // Each input's next row is fetched while this one is read (see with_next_row).
    const bool more = r + 1 < r1;
    load_base_row(t, r, n, base, more);
    for (unsigned k = 0; k < K; ++k) {
      if (brackets[2 * k].w == 0 && brackets[2 * k + 1].w == 0) continue;
      const uint8_t* src = expert_row(t, k, r, n);
      const DType dt = t.experts[k].dtype;
      const uint64_t esz = dtype_size(dt);
      with_next_row(more ? expert_row(t, k, r + 1, n) : nullptr, esz, n, [&](uint64_t j0, uint64_t j1) DELLA_INLINE_LAMBDA {
        if (st.mode == KeyMode::BF16) delta_keys_any<1>(dt, src + j0 * esz, j1 - j0, base + j0, k16 + j0, tmp + j0);
        else delta_keys_any<2>(dt, src + j0 * esz, j1 - j0, base + j0, k16 + j0, tmp + j0);
      });
      for (unsigned c = 0; c < 2; ++c) {
        const size_t i = 2 * k + c;
        const BracketCounts& b = brackets[i];
        if (b.w == 0) continue;
#if defined(DELLA_AVX512_PATHS)
        const uint32_t m = vbmi2 ? bracket_keys_avx512(k16, n, b.lo, b.w, list, below[i])
                                 : bracket_keys_scalar(k16, n, b.lo, b.w, list, below[i]);
#else
        const uint32_t m = bracket_keys_scalar(k16, n, b.lo, b.w, list, below[i]);
#endif
        count_list(list, m, tables + at[i], b.w);
      }
    }
  }
  // The item's counts (below 2^32: an item is one row or about 2^16 elements).
  for (size_t i = 0; i < brackets.size(); ++i) {
    BracketCounts& b = brackets[i];
    if (b.w == 0) continue;
    uint32_t* tab = tables + at[i];
    uint32_t* out = b.hist.data() + item * b.w;
    for (uint32_t v = 0; v < b.w; ++v) {
      uint32_t sum = 0;
      for (uint32_t c = 0; c < 8; ++c) {
        sum += tab[c * b.w + v];
        tab[c * b.w + v] = 0;
      }
      out[v] = sum;
    }
    b.below[item] = below[i];
  }
}

DELLA_SIMD_CLONES
void bracket_rows32_impl(const MergeTask& t, const TaskState& st, uint64_t item, uint64_t r0, uint64_t r1, Scratch& s,
                         std::vector<BracketList>& brackets) {
  const uint64_t n = st.g.n;
  const unsigned K = static_cast<unsigned>(t.experts.size());
  const auto [base, d, k16, k32] = row_buffers(s, n);
  uint32_t* __restrict in_row = grown(s.ranks, n);  // a row's keys inside a bracket
  for (uint64_t r = r0; r < r1; ++r) {
    load_base_row(t, r, n, base, r + 1 < r1);
    for (unsigned k = 0; k < K; ++k) {
      if (!brackets[2 * k].active && !brackets[2 * k + 1].active) continue;
      row_keys(t, st, k, r, base, d, k16, k32);
      for (unsigned c = 0; c < 2; ++c) {
        BracketList& b = brackets[2 * k + c];
        if (!b.active || b.overfull[item]) continue;
        const uint32_t lo = b.lo, w = b.hi - b.lo;
        uint64_t below = 0, in = 0;
        for (uint64_t j = 0; j < n; ++j) {
          const uint32_t key = k32[j];
          in_row[in] = key;
          in += key - lo <= w;  // wraps above w for keys below lo
          below += key < lo;
        }
        b.below[item] += below;
        std::vector<uint32_t>& list = b.inside[item];
        if (list.size() + in > b.cap) {  // a sample that misled: stop collecting, give up the bracket
          b.overfull[item] = 1;
          std::vector<uint32_t>().swap(list);
          continue;
        }
        list.insert(list.end(), in_row, in_row + in);
      }
    }
  }
}

// Values of a tensor of dtype dt at flat positions pos[0..m) as fp32: one tight loop a
// dtype, so that the cache misses of the scattered loads overlap.
void gather_values(DType dt, const uint8_t* p, const uint64_t* pos, uint64_t m, float* out) {
  switch (dt) {
    case DType::F32: for (uint64_t s = 0; s < m; ++s) out[s] = load_elem<DType::F32>(p, pos[s]); break;
    case DType::F16: for (uint64_t s = 0; s < m; ++s) out[s] = load_elem<DType::F16>(p, pos[s]); break;
    case DType::BF16: for (uint64_t s = 0; s < m; ++s) out[s] = load_elem<DType::BF16>(p, pos[s]); break;
    default: for (uint64_t s = 0; s < m; ++s) out[s] = load_elem<DType::F64>(p, pos[s]); break;
  }
}

}  // namespace

std::vector<std::vector<uint32_t>> sample_keys(const MergeTask& t, const TaskState& st, uint64_t count) {
  const uint64_t N = st.g.numel, n = st.g.n;
  const size_t K = t.experts.size();
  const uint64_t step = N / count;  // count <= N
  std::vector<uint64_t> pos(count), epos(count);
  // One position in each stretch of `step` elements, at a hashed offset: evenly spaced
  // positions would see only a few columns when step divides the row length (a 4096 x
  // 4096 tensor: columns 512, 1536, 2560 and 3584), and columns of a weight matrix can
  // differ in scale.
  for (uint64_t s = 0; s < count; ++s) pos[s] = s * step + ((s + 1) * 0x9E3779B97F4A7C15ull >> 32) % step;
  std::vector<float> b(count), v(count);
  gather_values(t.base_dtype, static_cast<const uint8_t*>(t.base), pos.data(), count, b.data());
  std::vector<std::vector<uint32_t>> keys(K);
  for (size_t k = 0; k < K; ++k) {
    if (!st.ex[k].sparse) continue;
    const ExpertInput& e = t.experts[k];
    const uint64_t* at = pos.data();
    if (e.shape != t.shape) {  // an embedding's leading sub-block
      for (uint64_t s = 0; s < count; ++s) epos[s] = expert_row_offset(t.shape, e.shape, pos[s] / n, n) + pos[s] % n;
      at = epos.data();
    }
    gather_values(e.dtype, static_cast<const uint8_t*>(e.data), at, count, v.data());
    keys[k].resize(count);
    for (uint64_t s = 0; s < count; ++s) {
      const float d = v[s] - b[s];
      keys[k][s] = magnitude_key(d, st.mode);
    }
  }
  return keys;
}

void bracket_rows(const MergeTask& t, const TaskState& st, uint64_t item, uint64_t r0, uint64_t r1, Scratch& s,
                  std::vector<BracketCounts>& brackets) {
  bracket_rows_impl(t, st, item, r0, r1, s, brackets);
}

void bracket_rows32(const MergeTask& t, const TaskState& st, uint64_t item, uint64_t r0, uint64_t r1, Scratch& s,
                    std::vector<BracketList>& brackets) {
  bracket_rows32_impl(t, st, item, r0, r1, s, brackets);
}

void histogram_rows(const MergeTask& t, const TaskState& st, uint64_t r0, uint64_t r1, Scratch& s, int level,
                    const std::vector<uint32_t>& hi_filter, std::vector<std::vector<uint64_t>>& hists) {
  histogram_rows_impl(t, st, r0, r1, s, level, hi_filter, hists);
}

void cut_key_counts(const MergeTask& t, const TaskState& st, uint64_t r0, uint64_t r1, Scratch& s,
                    const uint8_t* active, std::vector<uint64_t>& a_counts, std::vector<uint64_t>& b_counts) {
  cut_key_counts_impl(t, st, r0, r1, s, active, a_counts, b_counts);
}

}  // namespace della::detail
