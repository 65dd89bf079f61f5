#include "merge_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>

#include "della/philox.h"
#include "della/xxh64.h"
#include "fuse_row.h"
#include "keys_avx512.h"
#include "merge_state.h"
#include "row_io.h"
#include "thread_pool.h"

namespace della {

using namespace detail;

namespace {

constexpr uint64_t kCopyChunkBytes = 8u << 20;
constexpr uint64_t kTableMax = 1u << 22;      // longest row whose keep table is precomputed

KeyMode key_mode_for(DType base) {
  return base == DType::F16 ? KeyMode::F16 : (base == DType::BF16 ? KeyMode::BF16 : KeyMode::F32);
}

// ---------------------------------------------------------------- row primitives

// Loads n elements from flat offset `off` of a tensor of dtype t as fp32; returns how
// many are not finite.
uint64_t load_row(const void* p, DType t, uint64_t off, uint64_t n, float* dst) {
  return load_any(t, static_cast<const uint8_t*>(p) + off * dtype_size(t), n, dst);
}

// The Philox uniforms of flat elements [i0, i0 + n) of one expert's stream.
void uniforms_row(uint64_t seed, uint32_t tensor_id, uint32_t expert, uint64_t i0, uint64_t n, float* x,
                  std::vector<uint32_t>& words) {
  if (n == 0) return;
  const PhiloxRun ph = philox_run(seed, tensor_id, expert, i0, n, nullptr);
  words.resize(4 * ph.blocks);
  philox_blocks(ph.g0, ph.blocks, ph.c2, ph.c3, ph.k0, ph.k1, words.data());
  const uint32_t* w = words.data() + (i0 & 3);
  for (uint64_t j = 0; j < n; ++j) x[j] = uniform_from_word(w[j]);
}

void keys_row(const float* d, uint64_t n, KeyMode m, uint32_t* keys) {
  switch (m) {
    case KeyMode::F16:
      for (uint64_t j = 0; j < n; ++j) keys[j] = magnitude_key(d[j], KeyMode::F16);
      break;
    case KeyMode::BF16:
      for (uint64_t j = 0; j < n; ++j) keys[j] = magnitude_key(d[j], KeyMode::BF16);
      break;
    default:
      for (uint64_t j = 0; j < n; ++j) keys[j] = magnitude_key(d[j], KeyMode::F32);
      break;
  }
}

// ---------------------------------------------------------------- whole-tensor cuts

inline bool before(const Cut& c, uint32_t key, uint64_t occ) {
  if (c.all) return true;
  if (c.descending) return key > c.key || (key == c.key && occ < c.take);
  return key < c.key || (key == c.key && occ < c.take);
}

// Finds the bin holding position p (0-based, in the cut's order) of a histogram.
// Returns false when p is at or past the total (everything is before the cut).
bool select_bin(const std::vector<uint64_t>& hist, uint64_t p, bool descending, uint32_t& bin, uint64_t& before_count) {
  uint64_t cum = 0;
  const size_t nb = hist.size();
  for (size_t i = 0; i < nb; ++i) {
    const size_t b = descending ? nb - 1 - i : i;
    if (p < cum + hist[b]) {
      bin = static_cast<uint32_t>(b);
      before_count = cum;
      return true;
    }
    cum += hist[b];
  }
  return false;
}

bool whole_tensor(Sparsifier s) { return s == Sparsifier::Magnitude || s == Sparsifier::Breadcrumbs; }
bool norm_rescale(Rescale r) { return r == Rescale::L1 || r == Rescale::L2 || r == Rescale::Linf; }

// Loads base row r into s.base.
uint64_t base_row(const MergeTask& t, const TaskState& st, uint64_t r, Scratch& s) {
  return load_base_row(t, r, st.g.n, grown(s.base, st.g.n));
}

// Expert k's delta row (n floats) into s.delta; needs s.base. Returns the expert's
// non-finite count for the row.
uint64_t delta_row(const MergeTask& t, const TaskState& st, unsigned k, uint64_t r, Scratch& s) {
  const uint64_t n = st.g.n;
  s.delta.resize(n);
  const ExpertInput& e = t.experts[k];
  const uint64_t bad = load_row(e.data, e.dtype, expert_row_offset(t.shape, e.shape, r, n), n, s.delta.data());
  float* d = s.delta.data();
  const float* b = s.base.data();
  for (uint64_t j = 0; j < n; ++j) d[j] = d[j] - b[j];
  return bad;
}

// Decides which elements of expert k's delta row survive (s.keep) and, for the
// inverse rescale, each survivor's factor (s.fac). Needs s.delta. For the whole-tensor
// cuts, occ holds how many elements with each cut's key came before the row, and is
// advanced past it.
void mask_row(const MergeTask& t, const TaskState& st, unsigned k, uint64_t r, Scratch& s, uint64_t* occ) {
  const uint64_t n = st.g.n, i0 = r * n;
  const ExpertState& es = st.ex[k];
  s.keep.resize(n);
  s.fac.resize(n);
  uint8_t* __restrict keep = s.keep.data();
  float* __restrict fac = s.fac.data();
  if (!es.sparse) {
    std::fill(keep, keep + n, 1);
    std::fill(fac, fac + n, 1.0f);
    return;
  }
  switch (t.sparsifier) {
    case Sparsifier::Magprune: {
      s.keys.resize(n);
      s.ranks.resize(n);
      s.x.resize(n);
      keys_row(s.delta.data(), n, st.mode, s.keys.data());
      stable_ranks(s.keys.data(), n, s, s.ranks.data());
      uniforms_row(t.seed, t.tensor_id, k, i0, n, s.x.data(), s.words);
      const uint32_t* __restrict rk = s.ranks.data();
      const float* __restrict x = s.x.data();
      if (!es.table.empty()) {
        const KeepScale* __restrict tab = es.table.data();
        for (uint64_t j = 0; j < n; ++j) {
          keep[j] = x[j] < tab[rk[j]].q;
          fac[j] = tab[rk[j]].s;
        }
      } else {
        for (uint64_t j = 0; j < n; ++j) {
          const float q = magprune_q(rk[j], n, es.coef);
          keep[j] = x[j] < q;
          fac[j] = inverse_scale(q);
        }
      }
      break;
    }
    case Sparsifier::Random: {
      s.x.resize(n);
      uniforms_row(t.seed, t.tensor_id, k, i0, n, s.x.data(), s.words);
      const float* x = s.x.data();
      for (uint64_t j = 0; j < n; ++j) {
        keep[j] = x[j] < es.q_random;
        fac[j] = es.s_random;
      }
      break;
    }
    case Sparsifier::Magnitude:
    case Sparsifier::Breadcrumbs: {
      s.keys.resize(n);
      keys_row(s.delta.data(), n, st.mode, s.keys.data());
      const uint32_t* key = s.keys.data();
      uint64_t occ_a = occ[0], occ_b = occ[1];
      const bool magnitude = t.sparsifier == Sparsifier::Magnitude;
      for (uint64_t j = 0; j < n; ++j) {
        const bool in_a = before(es.cut_a, key[j], occ_a);
        const bool in_b = before(es.cut_b, key[j], occ_b);
        // magnitude: kept iff its descending rank < k; breadcrumbs: bottom <= rank < N - top.
        keep[j] = magnitude ? in_a : (!in_a && in_b);
        occ_a += key[j] == es.cut_a.key;
        occ_b += key[j] == es.cut_b.key;
        fac[j] = 1.0f;
      }
      occ[0] = occ_a;
      occ[1] = occ_b;
      break;
    }
    default:
      break;
  }
}

// ---------------------------------------------------------------- passes

// Runs fn(row_begin, row_end, worker) over the rows of one tensor.
template <class Fn>
void for_rows(const Geometry& g, unsigned threads, std::vector<Scratch>& scratch, Fn fn) {
  const uint64_t per = rows_per_item(g.n);
  const size_t items = static_cast<size_t>((g.rows + per - 1) / per);
  global_pool().run(items, threads, [&](size_t it, unsigned worker) {
    const uint64_t r0 = it * per;
    fn(r0, std::min(g.rows, r0 + per), scratch[worker]);
  });
}

// Histograms of every expert's keys (optionally only keys whose high half equals
// `hi_filter[k]`, binned by their low half) summed over per-worker copies.
std::vector<std::vector<uint64_t>> key_histograms(const MergeTask& t, const TaskState& st, unsigned threads,
                                                  std::vector<Scratch>& scratch, int level,
                                                  const std::vector<uint32_t>& hi_filter) {
  const size_t K = t.experts.size();
  const size_t bins = level == 2 ? 65536 : 32768;
  std::vector<std::vector<std::vector<uint64_t>>> per_worker(scratch.size(), std::vector<std::vector<uint64_t>>(K));
  for_rows(st.g, threads, scratch, [&](uint64_t r0, uint64_t r1, Scratch& s) {
    auto& hists = per_worker[&s - scratch.data()];
    for (size_t k = 0; k < K; ++k)
      if (hists[k].empty()) hists[k].assign(bins, 0);
    histogram_rows(t, st, r0, r1, s, level, hi_filter, hists);
  });
  std::vector<std::vector<uint64_t>> total(K, std::vector<uint64_t>(bins, 0));
  for (auto& hists : per_worker)
    for (size_t k = 0; k < K; ++k)
      for (size_t b = 0; b < hists[k].size(); ++b) total[k][b] += hists[k][b];
  return total;
}

// Finds, for every sparse expert, the cut at position positions[k] (elements before it).
std::vector<Cut> find_cuts(const MergeTask& t, const TaskState& st, unsigned threads, std::vector<Scratch>& scratch,
                           const std::vector<uint64_t>& positions, bool descending) {
  const size_t K = t.experts.size();
  std::vector<Cut> cuts(K);
  std::vector<uint64_t> remaining(positions);
  std::vector<uint32_t> hi(K, 0);
  auto h1 = key_histograms(t, st, threads, scratch, 1, hi);
  bool need_level2 = false;
  for (size_t k = 0; k < K; ++k) {
    cuts[k].descending = descending;
    if (!st.ex[k].sparse) continue;
    uint32_t bin = 0;
    uint64_t before_count = 0;
    if (!select_bin(h1[k], positions[k], descending, bin, before_count)) {
      cuts[k].all = true;
      continue;
    }
    if (st.mode != KeyMode::F32) {
      cuts[k].key = bin;
      cuts[k].take = positions[k] - before_count;
    } else {
      hi[k] = bin;
      remaining[k] = positions[k] - before_count;
      need_level2 = true;
    }
  }
  if (!need_level2) return cuts;
  auto h2 = key_histograms(t, st, threads, scratch, 2, hi);
  for (size_t k = 0; k < K; ++k) {
    if (!st.ex[k].sparse || cuts[k].all) continue;
    uint32_t bin = 0;
    uint64_t before_count = 0;
    select_bin(h2[k], remaining[k], descending, bin, before_count);  // the bin exists: level 1 said so
    cuts[k].key = (hi[k] << 16) | bin;
    cuts[k].take = remaining[k] - before_count;
  }
  return cuts;
}

// Per row, how many earlier elements (in index order) carry each cut's key. Only the
// rows up to the one where a cut falls need exact counts: every row after it sees at
// least `take` such elements before it, so none of its cut-key elements is before the
// cut. The rows are therefore counted in waves, each expert only until the wave in
// which its cuts have been reached (on average about half the tensor), and the rows
// after get a count above `take` (take + 1, or the exact count if larger).
void occurrence_starts(const MergeTask& t, TaskState& st, unsigned threads, std::vector<Scratch>& scratch) {
  const size_t K = t.experts.size();
  const uint64_t rows = st.g.rows;
  const bool two_cuts = t.sparsifier == Sparsifier::Breadcrumbs;
  std::vector<uint64_t> a(rows * K, 0), b(rows * K, 0), sum_a(K, 0), sum_b(K, 0);
  std::vector<uint64_t> counted(K, 0);  // per expert: rows [0, counted) have exact counts
  std::vector<uint8_t> active(K, 0);
  const uint64_t per = rows_per_item(st.g.n);
  const uint64_t wave = per * std::max(1u, threads) * 4;  // rows: four work items a thread
  for (uint64_t begin = 0; begin < rows;) {
    bool any = false;
    for (size_t k = 0; k < K; ++k) {
      const ExpertState& es = st.ex[k];
      active[k] = es.sparse && ((!es.cut_a.all && sum_a[k] < es.cut_a.take) ||
                                (two_cuts && !es.cut_b.all && sum_b[k] < es.cut_b.take));
      any = any || active[k];
    }
    if (!any) break;
    const uint64_t end = std::min(rows, begin + wave);
    const size_t items = static_cast<size_t>((end - begin + per - 1) / per);
    global_pool().run(items, threads, [&](size_t it, unsigned worker) {
      const uint64_t r0 = begin + it * per;
      cut_key_counts(t, st, r0, std::min(end, r0 + per), scratch[worker], active.data(), a, b);
    });
    for (size_t k = 0; k < K; ++k) {
      if (!active[k]) continue;
      for (uint64_t r = begin; r < end; ++r) {
        sum_a[k] += a[r * K + k];
        sum_b[k] += b[r * K + k];
      }
      counted[k] = end;
    }
    begin = end;
  }
  for (size_t k = 0; k < K; ++k) {
    ExpertState& es = st.ex[k];
    es.occ_a.assign(rows + 1, 0);
    es.occ_b.assign(rows + 1, 0);
    const uint64_t c = counted[k];
    for (uint64_t r = 0; r < c; ++r) {
      es.occ_a[r + 1] = es.occ_a[r] + a[r * K + k];
      es.occ_b[r + 1] = es.occ_b[r] + b[r * K + k];
    }
    const uint64_t past_a = std::max(es.occ_a[c], es.cut_a.take + 1);
    const uint64_t past_b = std::max(es.occ_b[c], es.cut_b.take + 1);
    for (uint64_t r = c + 1; r <= rows; ++r) {
      es.occ_a[r] = past_a;
      es.occ_b[r] = past_b;
    }
  }
}

// ‖δ‖ / ‖δ ⊙ mask‖ per expert, binary64: row partials in index order, rows in order.
void norm_scales(const MergeTask& t, TaskState& st, unsigned threads, std::vector<Scratch>& scratch) {
  // Nothing sparsified (dense experts, or a task without a base, which has no row to
  // read): every scale stays 1.
  if (std::none_of(st.ex.begin(), st.ex.end(), [](const ExpertState& es) { return es.sparse; })) return;
  const size_t K = t.experts.size();
  const uint64_t rows = st.g.rows;
  std::vector<double> full(rows * K, 0.0), kept(rows * K, 0.0);
  for_rows(st.g, threads, scratch, [&](uint64_t r0, uint64_t r1, Scratch& s) {
    std::vector<uint64_t> occ(2 * K, 0);  // per expert: the cut keys' occurrences so far
    for (uint64_t r = r0; r < r1; ++r) {
      base_row(t, st, r, s);
      for (unsigned k = 0; k < K; ++k) {
        const ExpertState& es = st.ex[k];
        if (!es.sparse) continue;
        occ_block_start(st, es, r, &occ[2 * k]);
        delta_row(t, st, k, r, s);
        mask_row(t, st, k, r, s, &occ[2 * k]);
        double f = 0.0, m = 0.0;
        for (uint64_t j = 0; j < st.g.n; ++j) {
          const double v = static_cast<double>(s.delta[j]);
          const double a = t.rescale == Rescale::L2 ? v * v : std::fabs(v);
          if (t.rescale == Rescale::Linf) {
            f = max_or_nan(f, a);
            if (s.keep[j]) m = max_or_nan(m, a);
          } else {
            f = f + a;
            if (s.keep[j]) m = m + a;
          }
        }
        full[r * K + k] = f;
        kept[r * K + k] = m;
      }
    }
  });
  for (unsigned k = 0; k < K; ++k) {
    ExpertState& es = st.ex[k];
    if (!es.sparse) continue;
    double f = 0.0, m = 0.0;
    for (uint64_t r = 0; r < rows; ++r) {
      if (t.rescale == Rescale::Linf) {
        f = max_or_nan(f, full[r * K + k]);
        m = max_or_nan(m, kept[r * K + k]);
      } else {
        f = f + full[r * K + k];
        m = m + kept[r * K + k];
      }
    }
    if (t.rescale == Rescale::L2) {
      f = std::sqrt(f);
      m = std::sqrt(m);
    }
    es.norm_scale = static_cast<float>(f < 1e-7 || m < 1e-7 ? 1.0 : f / m);
  }
}

// Everything a tensor's final pass needs that depends only on the tensor (or on a
// whole-tensor pre-pass): tables by rank, cuts, occurrence starts, norm scales.
TaskState prepare(const MergeTask& t, unsigned threads, std::vector<Scratch>& scratch) {
  TaskState st;
  st.g = geometry(t.shape);
  st.mode = key_mode_for(t.base_dtype);
  const size_t K = t.experts.size();
  st.ex.resize(K);
  for (size_t k = 0; k < K; ++k) {
    ExpertState& es = st.ex[k];
    const ExpertInput& e = t.experts[k];
    es.sparse = !t.linear && t.sparsifier != Sparsifier::None && e.density < 1.0;
    if (!es.sparse) continue;
    if (t.sparsifier == Sparsifier::Magprune) {
      es.coef = magprune_coef(e.density, e.epsilon);
      if (st.g.n <= kTableMax && st.g.n * 8 <= std::max<uint64_t>(st.g.numel, 1u << 16)) {
        es.table.resize(st.g.n);
        for (uint64_t r = 0; r < st.g.n; ++r) {
          const float q = magprune_q(r, st.g.n, es.coef);
          es.table[r] = KeepScale{q, inverse_scale(q)};
        }
        es.arith = magprune_arith_matches(es, st.g.n);
      }
    } else if (t.sparsifier == Sparsifier::Random) {
      es.q_random = static_cast<float>(e.density);
      es.s_random = inverse_scale(es.q_random);
    }
  }
  if (st.g.numel == 0) return st;
  if (whole_tensor(t.sparsifier)) {
    const uint64_t N = st.g.numel;
    std::vector<uint64_t> pa(K, 0), pb(K, 0);
    for (size_t k = 0; k < K; ++k) {
      const ExpertInput& e = t.experts[k];
      const CutPositions c = cut_positions(t.sparsifier, e.density, e.gamma, N);
      pa[k] = c.a;
      pb[k] = c.b;
    }
    if (bracketed_cuts(t, st, threads, scratch, pa, t.sparsifier == Sparsifier::Breadcrumbs ? pb : std::vector<uint64_t>{})) {
      if (norm_rescale(t.rescale)) norm_scales(t, st, threads, scratch);
      return st;
    }
    const bool descending = t.sparsifier == Sparsifier::Magnitude;
    std::vector<Cut> a = find_cuts(t, st, threads, scratch, pa, descending);
    std::vector<Cut> b;
    if (t.sparsifier == Sparsifier::Breadcrumbs) b = find_cuts(t, st, threads, scratch, pb, false);
    for (size_t k = 0; k < K; ++k) {
      st.ex[k].cut_a = a[k];
      st.ex[k].cut_b = b.empty() ? Cut{} : b[k];
    }
    occurrence_starts(t, st, threads, scratch);
  }
  if (norm_rescale(t.rescale)) norm_scales(t, st, threads, scratch);
  return st;
}

// The final pass of a linear task (no base: the linear method and slerp's second
// pass) over rows [r0, r1): merged values straight into the output.
void merge_rows_linear(const MergeTask& t, const TaskState& st, uint64_t r0, uint64_t r1, Scratch& s,
                       MergeStats& local) {
  const uint64_t n = st.g.n;
  const unsigned K = static_cast<unsigned>(t.experts.size());
  FuseConfig fc{static_cast<int>(K), t.consensus, t.normalize, t.lambda != 1.0, static_cast<float>(t.lambda)};
  float w[64];
  for (unsigned k = 0; k < K; ++k) w[k] = t.experts[k].weight;
  s.vals.resize(static_cast<size_t>(K) * n);
  s.delta.resize(n);
  for (uint64_t r = r0; r < r1; ++r) {
    for (unsigned k = 0; k < K; ++k) {
      const ExpertInput& e = t.experts[k];
      float* dst = s.vals.data() + static_cast<size_t>(k) * n;
      local.nonfinite[k + 1] += load_row(e.data, e.dtype, expert_row_offset(t.shape, e.shape, r, n), n, dst);
      local.kept[k] += n;
    }
    fuse_row(s.vals.data(), w, K, n, fc, nullptr, s.x, s.delta.data());
    uint8_t* dst = out_row(t, r, n);
    store_any(t.out_dtype, s.delta.data(), n, dst);
    local.out_nonfinite += count_stored_nonfinite_any(t.out_dtype, dst, n);
  }
}

struct WorkItem {
  uint32_t kind;  // 0 merge, 1 copy
  uint32_t task;
  uint64_t begin, end;  // rows, or bytes for a copy
};

// XXH64 of a task's output, fed its work items' bytes in order as they finish: the
// thread that finishes the next item in order hashes it (and any later ones already
// done) while the rows are still in its cache, instead of a sweep over the whole
// output from memory afterwards. Items finish in about the order they are claimed.
class OrderedDigest {
 public:
  // The task's items are items[first, first + count), rows of row_bytes output bytes;
  // row r is at out + (r - row0) * row_bytes. Feeds `hash`, which a slabbed task
  // carries from one slab to the next.
  OrderedDigest(const uint8_t* out, uint64_t row0, uint64_t row_bytes, const std::vector<WorkItem>& items,
                size_t first, size_t count, Xxh64Stream& hash)
      : out_(out), row0_(row0), row_bytes_(row_bytes), items_(items), first_(first), done_(count, 0), hash_(hash) {}

  void finished(size_t idx) {
    std::unique_lock<std::mutex> lock(m_);
    done_[idx - first_] = 1;
    if (busy_) return;  // the thread hashing now takes this item when it gets to it
    busy_ = true;
    while (next_ < done_.size() && done_[next_]) {
      const WorkItem& it = items_[first_ + next_];
      lock.unlock();
      hash_.update(out_ + (it.begin - row0_) * row_bytes_, (it.end - it.begin) * row_bytes_);
      lock.lock();
      ++next_;
    }
    busy_ = false;
  }

  // After every item has finished.
  uint64_t digest() const { return hash_.digest(); }

 private:
  const uint8_t* out_;
  uint64_t row0_;
  uint64_t row_bytes_;
  const std::vector<WorkItem>& items_;
  size_t first_;
  std::mutex m_;
  std::vector<uint8_t> done_;
  size_t next_ = 0;
  bool busy_ = false;
  Xxh64Stream& hash_;
};

// Adds one work item's statistics to its task's.
void add_stats(MergeStats& dst, const MergeStats& src) {
  for (size_t k = 0; k < src.nonfinite.size(); ++k) dst.nonfinite[k] += src.nonfinite[k];
  for (size_t k = 0; k < src.kept.size(); ++k) dst.kept[k] += src.kept[k];
  dst.out_nonfinite += src.out_nonfinite;
}

// The final pass of one work item of a merge task.
void merge_item(const MergeTask& t, const TaskState& st, const WorkItem& it, Scratch& s, MergeStats& local) {
  local.nonfinite.assign(t.experts.size() + 1, 0);
  local.kept.assign(t.experts.size(), 0);
  if (t.linear) merge_rows_linear(t, st, it.begin, it.end, s, local);
  else merge_rows_delta(t, st, it.begin, it.end, s, local);
}

// A task whose output goes to its sink: the final pass slab by slab, each slab's work
// items spread over the threads as run_batch spreads a whole tensor's. The items are
// the ones an unslabbed pass makes (slabs hold whole items), and the statistics and
// the digest are sums and a stream over them in row order, so the results equal an
// unslabbed run's.
void run_slabs(const MergeTask& t, const TaskState& st, unsigned threads, std::vector<Scratch>& scratch,
               MergeStats& stats) {
  const Geometry& g = st.g;
  const uint64_t per = rows_per_item(g.n);
  const uint64_t room = t.sink->slab_rows();
  const uint64_t slab = room >= g.rows ? g.rows : room / per * per;
  if (slab == 0 && g.rows > 0)
    throw std::invalid_argument("an output slab holds " + std::to_string(room) + " rows: fewer than the tensor's " +
                                std::to_string(g.rows) + " and than a work item's " + std::to_string(per));
  const uint64_t row_bytes = g.n * dtype_size(t.out_dtype);
  Xxh64Stream hash;
  MergeTask part = t;
  std::vector<WorkItem> items;
  std::vector<MergeStats> item_stats;
  for (uint64_t r0 = 0; r0 < g.rows; r0 += slab) {
    const uint64_t r1 = std::min(g.rows, r0 + slab);
    part.out = t.sink->room(r0, r1 - r0);
    part.out_row0 = r0;
    items.clear();
    for (uint64_t r = r0; r < r1; r += per) items.push_back({0, 0, r, std::min(r1, r + per)});
    std::unique_ptr<OrderedDigest> digest;
    if (t.digest)
      digest = std::make_unique<OrderedDigest>(static_cast<const uint8_t*>(part.out), r0, row_bytes, items, 0,
                                               items.size(), hash);
    item_stats.assign(items.size(), MergeStats{});
    global_pool().run(items.size(), threads, [&](size_t idx, unsigned worker) {
      merge_item(part, st, items[idx], scratch[worker], item_stats[idx]);
      if (digest) digest->finished(idx);
    });
    for (const MergeStats& s : item_stats) add_stats(stats, s);
    t.sink->put(r0, r1 - r0, static_cast<uint8_t*>(part.out));
  }
  t.sink->finish();
  if (t.digest) {
    stats.has_digest = true;
    stats.digest = hash.digest();
  }
}

}  // namespace

void validate_task(const MergeTask& t) {
  if (t.experts.empty()) throw std::invalid_argument("a merge needs at least one expert");
  if (t.experts.size() > 64) throw std::invalid_argument("at most 64 experts per merge");
  for (int64_t d : t.shape)
    if (d < 0) throw std::invalid_argument("negative dimension in shape");
  const Geometry g = geometry(t.shape);
  // (an empty tensor has no rows to rank, whatever its last dimension)
  if (g.numel > 0 && g.n > 0xffffffffull) throw std::invalid_argument("rows longer than 2^32 - 1 elements are not supported");
  if (t.rescale == Rescale::Inverse && whole_tensor(t.sparsifier))
    throw std::invalid_argument("the inverse rescale needs a keep probability: use it with magprune or random");
  if (t.linear && t.sparsifier != Sparsifier::None)
    throw std::invalid_argument("a merge without a base cannot sparsify deltas");
  for (const ExpertInput& e : t.experts) {
    // (recipes allow (0, 1] and [0, 1); NaN would read as dense, and a negative or
    // infinite cut is undefined in cut_positions' integer casts)
    if (!(e.density >= 0.0)) throw std::invalid_argument("density must be a number >= 0");
    if (t.sparsifier == Sparsifier::Breadcrumbs && !(e.gamma >= 0.0 && e.gamma <= 1.0))
      throw std::invalid_argument("gamma must be a number from 0 to 1");
    if (e.shape.size() != t.shape.size()) throw std::invalid_argument("expert rank differs from the base's");
    for (size_t d = 0; d < t.shape.size(); ++d)
      if (e.shape[d] < t.shape[d]) throw std::invalid_argument("expert shape smaller than the base's");
  }
}

void run_batch(const std::vector<MergeTask>& merges, const std::vector<CopyTask>& copies, unsigned threads,
               std::vector<MergeStats>& stats) {
  threads = std::max(1u, threads);
  std::vector<Scratch> scratch(threads);
  stats.assign(merges.size(), MergeStats{});
  std::vector<TaskState> states;
  states.reserve(merges.size());
  std::vector<WorkItem> items;
  std::vector<std::unique_ptr<OrderedDigest>> digests(merges.size());
  std::vector<Xxh64Stream> hashes(merges.size());
  for (size_t t = 0; t < merges.size(); ++t) {
    validate_task(merges[t]);
    states.push_back(prepare(merges[t], threads, scratch));
    const Geometry& g = states.back().g;
    const size_t K = merges[t].experts.size();
    stats[t].nonfinite.assign(K + 1, 0);
    stats[t].kept.assign(K, 0);
    stats[t].numel = g.numel;
    if (merges[t].sink) continue;  // merged slab by slab below
    const uint64_t per = rows_per_item(g.n);
    const uint64_t first = items.size();
    for (uint64_t r = 0; r < g.rows; r += per) items.push_back({0, static_cast<uint32_t>(t), r, std::min(g.rows, r + per)});
    if (merges[t].digest)
      digests[t] = std::make_unique<OrderedDigest>(static_cast<const uint8_t*>(merges[t].out), 0,
                                                   g.n * dtype_size(merges[t].out_dtype), items, first,
                                                   items.size() - first, hashes[t]);
  }
  for (size_t c = 0; c < copies.size(); ++c)
    for (uint64_t b = 0; b < copies[c].bytes; b += kCopyChunkBytes)
      items.push_back({1, static_cast<uint32_t>(c), b, std::min(copies[c].bytes, b + kCopyChunkBytes)});

  // Per-item statistics are summed afterwards, so the totals are thread-independent.
  std::vector<MergeStats> item_stats(items.size());
  global_pool().run(items.size(), threads, [&](size_t idx, unsigned worker) {
    const WorkItem& it = items[idx];
    if (it.kind == 1) {
      const CopyTask& c = copies[it.task];
      std::memcpy(static_cast<char*>(c.dst) + it.begin, static_cast<const char*>(c.src) + it.begin, it.end - it.begin);
      return;
    }
    merge_item(merges[it.task], states[it.task], it, scratch[worker], item_stats[idx]);
    if (digests[it.task]) digests[it.task]->finished(idx);
  });
  for (size_t t = 0; t < merges.size(); ++t) {
    if (!digests[t]) continue;
    stats[t].has_digest = true;
    stats[t].digest = digests[t]->digest();
  }
  for (size_t idx = 0; idx < items.size(); ++idx)
    if (items[idx].kind == 0) add_stats(stats[items[idx].task], item_stats[idx]);
  for (size_t t = 0; t < merges.size(); ++t)
    if (merges[t].sink) run_slabs(merges[t], states[t], threads, scratch, stats[t]);
}

void run_dots(const std::vector<DotTask>& tasks, unsigned threads, std::vector<DotStats>& stats) {
  threads = std::max(1u, threads);
  std::vector<Scratch> scratch(threads);
  stats.assign(tasks.size(), DotStats{});
  for (size_t i = 0; i < tasks.size(); ++i) {
    const DotTask& t = tasks[i];
    for (int64_t d : t.shape)
      if (d < 0) throw std::invalid_argument("negative dimension in shape");
    const Geometry g = geometry(t.shape);
    std::vector<double> dot(g.rows), aa(g.rows), bb(g.rows);
    std::vector<uint64_t> bad_a(g.rows), bad_b(g.rows);
    for_rows(g, threads, scratch, [&](uint64_t r0, uint64_t r1, Scratch& s) {
      s.base.resize(g.n);
      s.delta.resize(g.n);
      for (uint64_t r = r0; r < r1; ++r) {
        bad_a[r] = load_row(t.a, t.a_dtype, r * g.n, g.n, s.base.data());
        bad_b[r] = load_row(t.b, t.b_dtype, r * g.n, g.n, s.delta.data());
        double d = 0.0, x = 0.0, y = 0.0;
        for (uint64_t j = 0; j < g.n; ++j) {
          const double a = s.base[j], b = s.delta[j];
          d = d + a * b;
          x = x + a * a;
          y = y + b * b;
        }
        dot[r] = d;
        aa[r] = x;
        bb[r] = y;
      }
    });
    DotStats& st = stats[i];
    for (uint64_t r = 0; r < g.rows; ++r) {
      st.dot = st.dot + dot[r];
      st.aa = st.aa + aa[r];
      st.bb = st.bb + bb[r];
      st.nonfinite_a += bad_a[r];
      st.nonfinite_b += bad_b[r];
    }
  }
}

std::vector<std::string> cpu_kernel_paths() {
  std::vector<std::string> paths;
#if defined(DELLA_HAS_SIMD_CLONES)
  // The order target_clones picks in (DELLA_SIMD_CLONES).
  __builtin_cpu_init();
  if (__builtin_cpu_supports(DELLA_SIMD_CLONE_HIGH)) paths.push_back(DELLA_SIMD_CLONE_HIGH " (AVX-512) row functions");
  else if (__builtin_cpu_supports(DELLA_SIMD_CLONE_MID)) paths.push_back(DELLA_SIMD_CLONE_MID " (AVX2) row functions");
  else paths.push_back("baseline x86-64 row functions");
#else
  paths.push_back("row functions built for this build's own flags (no run-time dispatch)");
#endif
#if defined(DELLA_AVX512_PATHS)
  if (detail::have_avx512_cd()) paths.push_back("AVX-512 CD magprune ranks");
  if (detail::have_avx512_bf16()) paths.push_back("AVX-512 BF16 conversions");
#endif
#if defined(DELLA_F16C_PATHS)
  if (detail::have_f16c()) paths.push_back("F16C conversions");
#endif
  return paths;
}

}  // namespace della
