#include "merge_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>

#include "della/philox.h"
#include "thread_pool.h"

namespace della {
namespace {

constexpr uint64_t kRowChunkElements = 1u << 16;  // work item size for many short rows
constexpr uint64_t kCopyChunkBytes = 8u << 20;

struct Geometry {
  uint64_t numel = 1;
  uint64_t n = 1;     // row length
  uint64_t rows = 0;
};

Geometry geometry(const std::vector<int64_t>& shape) {
  Geometry g;
  for (int64_t d : shape) g.numel *= static_cast<uint64_t>(d);
  g.n = shape.size() >= 2 ? static_cast<uint64_t>(shape.back()) : g.numel;
  g.rows = g.n == 0 ? 0 : g.numel / g.n;
  return g;
}

KeyMode key_mode_for(DType base) {
  return base == DType::F16 ? KeyMode::F16 : (base == DType::BF16 ? KeyMode::BF16 : KeyMode::F32);
}

// Offset of base row r's first element inside an expert that may be larger in every
// dimension (the embedding sub-block rule of SPEC §2).
uint64_t expert_row_offset(const std::vector<int64_t>& base, const std::vector<int64_t>& ex, uint64_t r,
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

struct Scratch {
  std::vector<float> base, delta;
  std::vector<uint32_t> keys, ranks, hist;
  std::vector<uint64_t> sorted;
};

thread_local Scratch tls_scratch;

// Stable ascending ranks of keys[0..n): counting over the row's key range when it is
// small, else a sort of (key, index) pairs.
void stable_ranks(const uint32_t* keys, uint64_t n, bool half_keys, Scratch& s, uint32_t* ranks) {
  uint32_t lo = keys[0], hi = keys[0];
  for (uint64_t j = 1; j < n; ++j) {
    lo = std::min(lo, keys[j]);
    hi = std::max(hi, keys[j]);
  }
  const uint64_t range = static_cast<uint64_t>(hi) - lo + 1;
  if (half_keys && range <= 4 * n + 256) {
    s.hist.assign(range, 0);
    for (uint64_t j = 0; j < n; ++j) ++s.hist[keys[j] - lo];
    uint32_t sum = 0;
    for (uint64_t b = 0; b < range; ++b) {
      const uint32_t c = s.hist[b];
      s.hist[b] = sum;
      sum += c;
    }
    for (uint64_t j = 0; j < n; ++j) ranks[j] = s.hist[keys[j] - lo]++;
    return;
  }
  s.sorted.resize(n);
  for (uint64_t j = 0; j < n; ++j) s.sorted[j] = (static_cast<uint64_t>(keys[j]) << 32) | j;
  std::sort(s.sorted.begin(), s.sorted.end());
  for (uint64_t p = 0; p < n; ++p) ranks[static_cast<uint32_t>(s.sorted[p])] = static_cast<uint32_t>(p);
}

// Walks the Philox stream of one expert along consecutive flat indices.
struct RowRng {
  uint64_t seed;
  uint32_t tensor_id, expert;
  uint64_t block = ~0ull;
  Philox4 words{};
  float at(uint64_t i) {
    const uint64_t g = i >> 2;
    if (g != block) {
      block = g;
      words = philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), tensor_id, expert,
                            static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    }
    return uniform_from_word(words.v[i & 3]);
  }
};

// Sparsifies one expert's delta row in place; returns how many elements were kept.
uint64_t sparsify_row(const MergeTask& t, unsigned k, float* delta, uint64_t i0, uint64_t n, Scratch& s) {
  const ExpertInput& e = t.experts[k];
  if (t.sparsifier == Sparsifier::None || e.density >= 1.0) return n;
  RowRng rng{t.seed, t.tensor_id, k};
  uint64_t kept = 0;
  if (t.sparsifier == Sparsifier::Random) {
    const float q = static_cast<float>(e.density);
    const float scale = inverse_scale(q);
    const bool inv = t.rescale == Rescale::Inverse;
    for (uint64_t j = 0; j < n; ++j) {
      const bool keep = rng.at(i0 + j) < q;
      kept += keep;
      delta[j] = keep ? (inv ? delta[j] * scale : delta[j]) : 0.0f;
    }
    return kept;
  }
  // Magprune.
  const KeyMode mode = key_mode_for(t.base_dtype);
  s.keys.resize(n);
  s.ranks.resize(n);
  for (uint64_t j = 0; j < n; ++j) s.keys[j] = magnitude_key(delta[j], mode);
  stable_ranks(s.keys.data(), n, mode != KeyMode::F32, s, s.ranks.data());
  const MagpruneCoef c = magprune_coef(e.density, e.epsilon);
  const bool inv = t.rescale == Rescale::Inverse;
  for (uint64_t j = 0; j < n; ++j) {
    const float q = magprune_q(s.ranks[j], n, c);
    const bool keep = rng.at(i0 + j) < q;
    kept += keep;
    delta[j] = keep ? (inv ? delta[j] * inverse_scale(q) : delta[j]) : 0.0f;
  }
  return kept;
}

void merge_rows(const MergeTask& t, uint64_t row_begin, uint64_t row_end, MergeStats& local) {
  Scratch& s = tls_scratch;
  const Geometry g = geometry(t.shape);
  const uint64_t n = g.n;
  const unsigned K = static_cast<unsigned>(t.experts.size());
  s.base.resize(n);
  s.delta.resize(static_cast<size_t>(K) * n);
  FuseConfig fc{static_cast<int>(K), t.consensus, t.normalize, t.lambda != 1.0, static_cast<float>(t.lambda)};
  float w[64], p[64];
  for (unsigned k = 0; k < K; ++k) w[k] = t.experts[k].weight;

  for (uint64_t r = row_begin; r < row_end; ++r) {
    const uint64_t i0 = r * n;
    float* b = s.base.data();
    for (uint64_t j = 0; j < n; ++j) {
      b[j] = load_f32(t.base, t.base_dtype, i0 + j);
      local.nonfinite[0] += !is_finite_f32(b[j]);
    }
    for (unsigned k = 0; k < K; ++k) {
      const ExpertInput& e = t.experts[k];
      const uint64_t off = expert_row_offset(t.shape, e.shape, r, n);
      float* d = s.delta.data() + static_cast<size_t>(k) * n;
      uint64_t bad = 0;
      for (uint64_t j = 0; j < n; ++j) {
        const float x = load_f32(e.data, e.dtype, off + j);
        bad += !is_finite_f32(x);
        d[j] = x - b[j];
      }
      local.nonfinite[k + 1] += bad;
      local.kept[k] += sparsify_row(t, k, d, i0, n, s);
    }
    for (uint64_t j = 0; j < n; ++j) {
      for (unsigned k = 0; k < K; ++k) p[k] = w[k] * s.delta[static_cast<size_t>(k) * n + j];
      const float m = fuse_element(p, w, fc);
      store_f32(t.out, t.out_dtype, i0 + j, b[j] + m);
    }
  }
}

struct WorkItem {
  uint32_t kind;  // 0 merge, 1 copy
  uint32_t task;
  uint64_t begin, end;  // rows, or bytes for a copy
};

}  // namespace

void validate_task(const MergeTask& t) {
  if (t.experts.empty()) throw std::invalid_argument("a merge needs at least one expert");
  if (t.experts.size() > 64) throw std::invalid_argument("at most 64 experts per merge");
  for (int64_t d : t.shape)
    if (d < 0) throw std::invalid_argument("negative dimension in shape");
  const Geometry g = geometry(t.shape);
  if (g.n > 0xffffffffull) throw std::invalid_argument("rows longer than 2^32 - 1 elements are not supported");
  for (const ExpertInput& e : t.experts) {
    if (e.shape.size() != t.shape.size()) throw std::invalid_argument("expert rank differs from the base's");
    for (size_t d = 0; d < t.shape.size(); ++d)
      if (e.shape[d] < t.shape[d]) throw std::invalid_argument("expert shape smaller than the base's");
    if (e.shape != t.shape && e.shape.size() <= 1 && t.shape.empty())
      throw std::invalid_argument("scalar shapes must match");
  }
}

void run_batch(const std::vector<MergeTask>& merges, const std::vector<CopyTask>& copies, unsigned threads,
               std::vector<MergeStats>& stats) {
  stats.assign(merges.size(), MergeStats{});
  std::vector<WorkItem> items;
  for (size_t t = 0; t < merges.size(); ++t) {
    validate_task(merges[t]);
    const Geometry g = geometry(merges[t].shape);
    const size_t K = merges[t].experts.size();
    stats[t].nonfinite.assign(K + 1, 0);
    stats[t].kept.assign(K, 0);
    stats[t].numel = g.numel;
    const uint64_t rows_per_item = std::max<uint64_t>(1, kRowChunkElements / std::max<uint64_t>(1, g.n));
    for (uint64_t r = 0; r < g.rows; r += rows_per_item)
      items.push_back({0, static_cast<uint32_t>(t), r, std::min(g.rows, r + rows_per_item)});
  }
  for (size_t c = 0; c < copies.size(); ++c)
    for (uint64_t b = 0; b < copies[c].bytes; b += kCopyChunkBytes)
      items.push_back({1, static_cast<uint32_t>(c), b, std::min(copies[c].bytes, b + kCopyChunkBytes)});

  // Per-item statistics are summed afterwards, so the totals are thread-independent.
  std::vector<MergeStats> item_stats(items.size());
  global_pool().run(items.size(), threads, [&](size_t idx, unsigned) {
    const WorkItem& it = items[idx];
    if (it.kind == 1) {
      const CopyTask& c = copies[it.task];
      std::memcpy(static_cast<char*>(c.dst) + it.begin, static_cast<const char*>(c.src) + it.begin,
                  it.end - it.begin);
      return;
    }
    const MergeTask& t = merges[it.task];
    MergeStats& local = item_stats[idx];
    local.nonfinite.assign(t.experts.size() + 1, 0);
    local.kept.assign(t.experts.size(), 0);
    merge_rows(t, it.begin, it.end, local);
  });
  for (size_t idx = 0; idx < items.size(); ++idx) {
    if (items[idx].kind != 0) continue;
    MergeStats& dst = stats[items[idx].task];
    const MergeStats& src = item_stats[idx];
    for (size_t k = 0; k < src.nonfinite.size(); ++k) dst.nonfinite[k] += src.nonfinite[k];
    for (size_t k = 0; k < src.kept.size(); ++k) dst.kept[k] += src.kept[k];
  }
}

}  // namespace della
