// Whole-tensor cuts of TIES and breadcrumbs (SPEC §4) in one pass over the tensor
// instead of two (half-precision keys: full key histograms, then per-row counts of the
// cut keys) or three (fp32 keys: histograms of the keys' high halves, of the low halves
// in the cut's bin, then the per-row counts).
//
// A sample of each expert's keys (kSample elements, one in each of kSample equal
// stretches of the tensor, at hashed offsets) puts each cut inside a narrow key
// bracket [lo, lo + w), with a margin of five standard deviations of the sample's
// rank error. The pass then counts, per work item, the keys below lo (a vector
// compare) and a histogram of the keys inside the bracket (a few per cent of the
// elements, compressed out of the row). The totals give the cut key and its `take`;
// the per-item counts of the cut key give how many come before each work item, which
// is all the final pass needs: it counts equal keys itself in the one item where the
// cut falls. If the totals show a cut outside its bracket (a sample
// that misled) or a bracket would be too wide, nothing is set and the caller runs the
// exact full-histogram path: the sample decides the speed, never the bytes.
//
// fp32 keys are too many and too distinct to count in a bracket: the pass lists the keys
// inside it per work item (a few per cent of the tensor), and the cut is selected among
// them (nth_element); an item whose list outgrows twice what the sample promised gives
// up the bracket.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>

#include "merge_state.h"
#include "thread_pool.h"

namespace della::detail {
namespace {

constexpr uint64_t kSample = 1u << 14;
constexpr uint32_t kMaxWidth = 4096;              // keys in a bracket
constexpr uint64_t kMaxItemCounts = 4u << 20;     // all brackets: work items x width (16 MiB)

// DELLA_CUT_BRACKET=off takes the full-histogram path; =miss shifts every bracket past
// its cut, and =overfull gives fp32 brackets no room for their lists, so that the
// fallback runs (for tests).
int bracket_mode() {
  const char* v = std::getenv("DELLA_CUT_BRACKET");
  if (v == nullptr) return 0;
  if (std::strcmp(v, "off") == 0) return 1;
  if (std::strcmp(v, "miss") == 0) return 2;
  if (std::strcmp(v, "overfull") == 0) return 3;
  return 0;
}

// The sorted sample positions that bound a bracket: the cut's expected place in a
// sample of S keys, minus and plus five standard deviations of its rank error (and 16).
// lo_at below 0 or hi_at at S or above: the bracket runs to that end of the key range.
struct SamplePlaces {
  double lo_at, hi_at;
};
SamplePlaces sample_places(uint64_t S, uint64_t N, uint64_t before, bool descending) {
  // The cut element's ascending position: the key there is the cut key.
  const uint64_t a = descending ? N - 1 - before : before;
  const double f = (static_cast<double>(a) + 0.5) / static_cast<double>(N);
  const double center = f * static_cast<double>(S);
  const double margin = 5.0 * std::sqrt(static_cast<double>(S) * f * (1.0 - f)) + 16.0;
  return {std::floor(center - margin), std::ceil(center + margin)};
}

// The bracket of a cut with `before` elements before it in its order, from the
// cumulative counts of the expert's sample keys (cum[key] = sample keys <= key);
// false when it would be too wide.
bool choose_bracket(const std::vector<uint32_t>& cum, uint64_t S, uint64_t N, uint64_t before, bool descending,
                    BracketCounts& b) {
  const auto [lo_at, hi_at] = sample_places(S, N, before, descending);
  // The sample's key at sorted position p: the first key with more than p at or below.
  auto key_at = [&](uint64_t p) {
    return static_cast<uint32_t>(std::upper_bound(cum.begin(), cum.end(), static_cast<uint32_t>(p)) - cum.begin());
  };
  // Past either end of the sample, the bracket runs to the end of the key range.
  const uint32_t lo = lo_at < 0 ? 0u : key_at(static_cast<uint64_t>(lo_at));
  const uint32_t hi = hi_at >= static_cast<double>(S) ? 0x7fffu : key_at(static_cast<uint64_t>(hi_at));
  b.lo = lo;
  b.w = hi - lo + 1;
  return b.w <= kMaxWidth;
}

// The cut from a bracket's totals, and the cut key's occurrences before each work
// item; false when the cut is not inside the bracket.
bool cut_from_counts(const BracketCounts& b, uint64_t N, uint64_t before, bool descending, uint64_t items, Cut& cut,
                     std::vector<uint64_t>& occ) {
  uint64_t below = 0;
  for (uint64_t it = 0; it < items; ++it) below += b.below[it];
  std::vector<uint64_t> sum(b.w, 0);
  for (uint64_t it = 0; it < items; ++it)
    for (uint32_t v = 0; v < b.w; ++v) sum[v] += b.hist[it * b.w + v];
  uint64_t inside = 0;
  for (uint64_t c : sum) inside += c;
  if (below + inside > N) return false;  // cannot happen; guards the subtraction below
  uint64_t cum = descending ? N - below - inside : below;  // elements before the bracket, in the cut's order
  if (before < cum || before >= cum + inside) return false;
  uint32_t v = 0;
  for (uint32_t i = 0; i < b.w; ++i) {
    v = descending ? b.w - 1 - i : i;
    if (before < cum + sum[v]) break;
    cum += sum[v];
  }
  cut.key = b.lo + v;
  cut.take = before - cum;
  cut.descending = descending;
  cut.all = false;
  occ.assign(items + 1, 0);
  for (uint64_t it = 0; it < items; ++it) occ[it + 1] = occ[it] + b.hist[it * b.w + v];
  return true;
}

// Every sparse expert's cuts (cuts[2k + c], c = 0: a, 1: b) and their occurrences per
// block of `per` rows.
void set_cuts(TaskState& st, uint64_t per, bool two, std::vector<Cut>& cuts, std::vector<std::vector<uint64_t>>& occ) {
  st.occ_rows = per;
  for (size_t k = 0; k < st.ex.size(); ++k) {
    ExpertState& es = st.ex[k];
    if (!es.sparse) continue;
    es.cut_a = cuts[2 * k];
    es.occ_a = std::move(occ[2 * k]);
    if (two) {
      es.cut_b = cuts[2 * k + 1];
      es.occ_b = std::move(occ[2 * k + 1]);
    }
  }
}

// The fp32-key bracket of a cut from the expert's sorted sample: the sample keys at
// sample_places. Returns the share of the sample inside [lo, hi], ties at either end
// included.
double choose_bracket32(const std::vector<uint32_t>& sorted, uint64_t N, uint64_t before, bool descending,
                        BracketList& b) {
  const uint64_t S = sorted.size();
  const auto [lo_at, hi_at] = sample_places(S, N, before, descending);
  b.lo = lo_at < 0 ? 0u : sorted[static_cast<uint64_t>(lo_at)];
  b.hi = hi_at >= static_cast<double>(S) ? 0xffffffffu : sorted[static_cast<uint64_t>(hi_at)];
  const auto first = std::lower_bound(sorted.begin(), sorted.end(), b.lo);
  const auto last = std::upper_bound(sorted.begin(), sorted.end(), b.hi);
  return static_cast<double>(last - first) / static_cast<double>(S);
}

// The cut from an fp32 bracket's lists: the key at the cut's place among the keys
// inside (a selection over a few per cent of the tensor), its `take`, and the cut
// key's occurrences before each work item; false when the cut is not inside.
bool cut_from_lists(BracketList& b, uint64_t N, uint64_t before, bool descending, uint64_t items, Cut& cut,
                    std::vector<uint64_t>& occ, std::vector<uint32_t>& all) {
  uint64_t below = 0, inside = 0;
  for (uint64_t it = 0; it < items; ++it) {
    if (b.overfull[it]) return false;
    below += b.below[it];
    inside += b.inside[it].size();
  }
  if (below + inside > N) return false;  // cannot happen; guards the subtraction below
  const uint64_t cum = descending ? N - below - inside : below;  // elements before the bracket, in the cut's order
  if (before < cum || before >= cum + inside) return false;
  all.clear();
  for (uint64_t it = 0; it < items; ++it) all.insert(all.end(), b.inside[it].begin(), b.inside[it].end());
  const uint64_t p = before - cum;  // the cut element's place among the keys inside, in the cut's order
  if (descending) std::nth_element(all.begin(), all.begin() + p, all.end(), std::greater<uint32_t>());
  else std::nth_element(all.begin(), all.begin() + p, all.end());
  const uint32_t key = all[p];
  uint64_t strict = 0;  // keys inside that come before the cut key in the cut's order
  for (uint32_t x : all) strict += descending ? x > key : x < key;
  cut.key = key;
  cut.take = p - strict;
  cut.descending = descending;
  cut.all = false;
  occ.assign(items + 1, 0);
  for (uint64_t it = 0; it < items; ++it)
    occ[it + 1] = occ[it] + static_cast<uint64_t>(std::count(b.inside[it].begin(), b.inside[it].end(), key));
  return true;
}

// What the fp32 brackets may list, all cuts together, as the sample expects it: at most
// half the tensor, and at most 128 MiB of keys (an item's list may reach twice its
// expectation before the bracket is given up). Past either, the full histograms run:
// slower, but their memory does not grow with the tensor.
constexpr double kMaxListShare = 0.5;
constexpr double kMaxListBytes = 128.0 * (1u << 20);

// What both kinds of bracket share: per sparse expert, its sample prepared once, then
// per cut a bracket chosen on it (or the cut marked `all`); one pass over the work
// items, last first (the final pass starts at the first rows, which this pass then read
// last, so that a tensor's leading rows may still be in the last-level cache); then the
// cuts from what the pass gathered. Any step may give up (false): nothing is set then.
template <class Bracket, class Prepare, class Choose, class Rows, class Select>
bool run_brackets(const MergeTask& t, TaskState& st, unsigned threads, std::vector<Scratch>& scratch,
                  const std::vector<uint64_t>& positions_a, const std::vector<uint64_t>& positions_b, Prepare prepare,
                  Choose choose, Rows rows, Select select) {
  const size_t K = t.experts.size();
  const uint64_t N = st.g.numel, per = rows_per_item(st.g.n);
  const uint64_t items = (st.g.rows + per - 1) / per;
  const bool two = !positions_b.empty();
  const bool descending = t.sparsifier == Sparsifier::Magnitude;
  std::vector<Bracket> brackets(2 * K);
  std::vector<uint8_t> all(2 * K, 0);
  bool any = false;
  std::vector<std::vector<uint32_t>> samples = sample_keys(t, st, std::min(kSample, N));
  for (size_t k = 0; k < K; ++k) {
    if (!st.ex[k].sparse) continue;
    prepare(samples[k]);
    for (unsigned c = 0; c < (two ? 2u : 1u); ++c) {
      const uint64_t before = c == 0 ? positions_a[k] : positions_b[k];
      if (before >= N) {  // everything is before the cut
        all[2 * k + c] = 1;
        continue;
      }
      if (!choose(samples[k], before, descending, items, per, brackets[2 * k + c])) return false;
      any = true;
    }
  }
  if (any)
    global_pool().run(static_cast<size_t>(items), threads, [&](size_t i, unsigned worker) {
      const size_t it = items - 1 - i;
      const uint64_t r0 = it * per;
      rows(t, st, it, r0, std::min(st.g.rows, r0 + per), scratch[worker], brackets);
    });
  std::vector<Cut> cuts(2 * K);
  std::vector<std::vector<uint64_t>> occ(2 * K);
  for (size_t k = 0; k < K; ++k) {
    if (!st.ex[k].sparse) continue;
    for (unsigned c = 0; c < (two ? 2u : 1u); ++c) {
      const size_t i = 2 * k + c;
      cuts[i].descending = descending;
      if (all[i]) {
        cuts[i].all = true;
        occ[i].assign(items + 1, 0);
      } else if (!select(brackets[i], c == 0 ? positions_a[k] : positions_b[k], descending, items, cuts[i], occ[i])) {
        return false;
      }
    }
  }
  set_cuts(st, per, two, cuts, occ);
  return true;
}

}  // namespace

bool bracketed_cuts(const MergeTask& t, TaskState& st, unsigned threads, std::vector<Scratch>& scratch,
                    const std::vector<uint64_t>& positions_a, const std::vector<uint64_t>& positions_b) {
  const int mode = bracket_mode();
  if (mode == 1) return false;
  const uint64_t N = st.g.numel;
  if (st.mode == KeyMode::F32) {
    double share = 0;  // all brackets' expected share of the tensor
    return run_brackets<BracketList>(
        t, st, threads, scratch, positions_a, positions_b,
        [](std::vector<uint32_t>& sample) { std::sort(sample.begin(), sample.end()); },
        [&](const std::vector<uint32_t>& sorted, uint64_t before, bool descending, uint64_t items, uint64_t per,
            BracketList& b) {
          const double f = choose_bracket32(sorted, N, before, descending, b);
          share += f;
          if (share > kMaxListShare || share * static_cast<double>(N) * sizeof(uint32_t) > kMaxListBytes) return false;
          if (mode == 2) {  // past the cut
            const uint32_t w = b.hi - b.lo;
            if (b.hi < 0xffffffffu - w) {
              b.lo = b.hi + 1;
              b.hi = b.lo + w;
            } else if (b.lo > w) {
              b.hi = b.lo - 1;
              b.lo = b.hi - w;
            }
          }
          // Twice the expected keys of an item, and a row more: a list past that means
          // the sample misled.
          b.cap = mode == 3 ? 0 : static_cast<uint64_t>(2.0 * f * static_cast<double>(per * st.g.n)) + st.g.n + 4096;
          b.active = true;
          b.below.assign(items, 0);
          b.inside.assign(items, {});
          b.overfull.assign(items, 0);
          return true;
        },
        bracket_rows32,
        [&](BracketList& b, uint64_t before, bool descending, uint64_t items, Cut& cut, std::vector<uint64_t>& occ) {
          return cut_from_lists(b, N, before, descending, items, cut, occ, scratch[0].bracket_keys);
        });
  }
  std::vector<uint32_t> cum(0x8000);  // the expert's sample: keys at or below each key
  uint64_t counts = 0;                 // per-item counters of all brackets
  return run_brackets<BracketCounts>(
      t, st, threads, scratch, positions_a, positions_b,
      [&](const std::vector<uint32_t>& sample) {
        std::fill(cum.begin(), cum.end(), 0u);
        for (uint32_t key : sample) ++cum[key];
        for (size_t i = 1; i < cum.size(); ++i) cum[i] += cum[i - 1];
      },
      [&](const std::vector<uint32_t>& sample, uint64_t before, bool descending, uint64_t items, uint64_t,
          BracketCounts& b) {
        if (!choose_bracket(cum, sample.size(), N, before, descending, b)) return false;
        counts += items * b.w;
        if (counts > kMaxItemCounts) return false;
        if (mode == 2) b.lo = b.lo + 2 * b.w <= 0x8000u ? b.lo + b.w : (b.lo >= b.w ? b.lo - b.w : b.lo);  // past the cut
        b.below.assign(items, 0);
        b.hist.assign(items * b.w, 0);
        return true;
      },
      bracket_rows,
      [&](BracketCounts& b, uint64_t before, bool descending, uint64_t items, Cut& cut, std::vector<uint64_t>& occ) {
        return cut_from_counts(b, N, before, descending, items, cut, occ);
      });
}

}  // namespace della::detail
