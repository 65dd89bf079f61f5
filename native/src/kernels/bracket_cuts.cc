// Whole-tensor cuts of TIES and breadcrumbs (SPEC §4) for half-precision keys, in one
// counting pass instead of two: full key histograms (a scalar increment per element)
// and then per-row counts of the cut keys.
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
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "merge_state.h"
#include "thread_pool.h"

namespace della::detail {
namespace {

constexpr uint64_t kSample = 1u << 14;
constexpr uint32_t kMaxWidth = 4096;              // keys in a bracket
constexpr uint64_t kMaxItemCounts = 4u << 20;     // all brackets: work items x width (16 MiB)

// DELLA_CUT_BRACKET=off takes the full-histogram path; =miss shifts every bracket past
// its cut, so that the fallback runs (for tests).
int bracket_mode() {
  const char* v = std::getenv("DELLA_CUT_BRACKET");
  if (v == nullptr) return 0;
  if (std::strcmp(v, "off") == 0) return 1;
  if (std::strcmp(v, "miss") == 0) return 2;
  return 0;
}

// The bracket of a cut with `before` elements before it in its order, from the
// cumulative counts of the expert's sample keys (cum[key] = sample keys <= key);
// false when it would be too wide.
bool choose_bracket(const std::vector<uint32_t>& cum, uint64_t S, uint64_t N, uint64_t before, bool descending,
                    BracketCounts& b) {
  // The cut element's ascending position: the key there is the cut key.
  const uint64_t a = descending ? N - 1 - before : before;
  const double f = (static_cast<double>(a) + 0.5) / static_cast<double>(N);
  const double center = f * static_cast<double>(S);
  const double margin = 5.0 * std::sqrt(static_cast<double>(S) * f * (1.0 - f)) + 16.0;
  const double lo_at = std::floor(center - margin), hi_at = std::ceil(center + margin);
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

}  // namespace

bool bracketed_cuts(const MergeTask& t, TaskState& st, unsigned threads, std::vector<Scratch>& scratch,
                    const std::vector<uint64_t>& positions_a, const std::vector<uint64_t>& positions_b) {
  const int mode = bracket_mode();
  if (mode == 1 || st.mode == KeyMode::F32) return false;
  const size_t K = t.experts.size();
  const uint64_t N = st.g.numel, per = rows_per_item(st.g.n);
  const uint64_t items = (st.g.rows + per - 1) / per;
  const bool two = !positions_b.empty();
  const bool descending = t.sparsifier == Sparsifier::Magnitude;
  std::vector<BracketCounts> brackets(2 * K);
  std::vector<uint8_t> all(2 * K, 0);
  bool any = false;
  uint64_t counts = 0;  // per-item counters of all brackets
  const uint64_t S = std::min(kSample, N);
  const std::vector<std::vector<uint16_t>> samples = sample_keys(t, st, S);
  std::vector<uint32_t> cum(0x8000);
  for (size_t k = 0; k < K; ++k) {
    if (!st.ex[k].sparse) continue;
    std::fill(cum.begin(), cum.end(), 0u);
    for (uint16_t key : samples[k]) ++cum[key];
    for (size_t i = 1; i < cum.size(); ++i) cum[i] += cum[i - 1];
    for (unsigned c = 0; c < (two ? 2u : 1u); ++c) {
      const uint64_t before = c == 0 ? positions_a[k] : positions_b[k];
      if (before >= N) {  // everything is before the cut
        all[2 * k + c] = 1;
        continue;
      }
      BracketCounts& b = brackets[2 * k + c];
      if (!choose_bracket(cum, S, N, before, descending, b)) return false;
      counts += items * b.w;
      if (counts > kMaxItemCounts) return false;
      if (mode == 2) b.lo = b.lo + 2 * b.w <= 0x8000u ? b.lo + b.w : (b.lo >= b.w ? b.lo - b.w : b.lo);  // past the cut
      b.below.assign(items, 0);
      b.hist.assign(items * b.w, 0);
      any = true;
    }
  }
  if (any)
    // Last item first: the final pass starts at the first rows, which this pass then
    // read last, so that a tensor's leading rows may still be in the last-level cache.
    global_pool().run(static_cast<size_t>(items), threads, [&](size_t i, unsigned worker) {
      const size_t it = items - 1 - i;
      const uint64_t r0 = it * per;
      bracket_rows(t, st, it, r0, std::min(st.g.rows, r0 + per), scratch[worker], brackets);
    });
  std::vector<Cut> cuts(2 * K);
  std::vector<std::vector<uint64_t>> occ(2 * K);
  for (size_t k = 0; k < K; ++k) {
    if (!st.ex[k].sparse) continue;
    for (unsigned c = 0; c < (two ? 2u : 1u); ++c) {
      const size_t i = 2 * k + c;
      const uint64_t before = c == 0 ? positions_a[k] : positions_b[k];
      cuts[i].descending = descending;
      if (all[i]) {
        cuts[i].all = true;
        occ[i].assign(items + 1, 0);
      } else if (!cut_from_counts(brackets[i], N, before, descending, items, cuts[i], occ[i])) {
        return false;
      }
    }
  }
  st.occ_rows = per;
  for (size_t k = 0; k < K; ++k) {
    ExpertState& es = st.ex[k];
    if (!es.sparse) continue;
    es.cut_a = cuts[2 * k];
    es.occ_a = std::move(occ[2 * k]);
    if (two) {
      es.cut_b = cuts[2 * k + 1];
      es.occ_b = std::move(occ[2 * k + 1]);
    }
  }
  return true;
}

}  // namespace della::detail
