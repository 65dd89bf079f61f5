// CUDA against CPU, bit for bit: random tasks (shapes with rows shorter and longer than
// one block's ranking capacity, 1-D, zero-size, the embedding sub-block; every dtype,
// sparsifier, rescale and consensus; K = 1..6; random seeds, densities and weights;
// ties and non-finite values) run through della::run_batch and through
// della::cuda::Context under several pipeline settings (slabs, streams, both block
// ranking tiers or the segmented sort). GPU outputs are poisoned first. Prints the seed; rerun one
// with `della_cuda_parity SEED [ITERATIONS]`. Exits 77 (ctest: skipped) without a GPU.
// Built against the emulated device (native/test/cuda_emu) it is della_cuda_emu_parity,
// which runs everywhere.
#include <cuda_runtime.h>

#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "../src/kernels/merge_cpu.h"
#include "cuda_merge.h"
#include "della/xxh64.h"

using della::DType;

namespace {

constexpr int kSkip = 77;

struct Case {
  della::MergeTask task;
  std::vector<std::vector<uint8_t>> inputs;  // base (when not linear), experts
  std::vector<uint8_t> cpu_out, gpu_out;
  bool nonfinite = false;
  uint8_t poison = 0;  // the byte the GPU output was filled with before the run
  std::string desc;
  uint64_t order_at = 0;  // norm order cases: the element whose value SPEC's order gives,
  float order_spec = 0;   // and that value
};

uint64_t numel_of(const std::vector<int64_t>& s) {
  uint64_t n = 1;
  for (int64_t d : s) n *= static_cast<uint64_t>(d);
  return n;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    default: return "F64";
  }
}

bool is_nan_at(const std::vector<uint8_t>& b, DType t, uint64_t i) {
  switch (t) {
    case DType::F32: {
      uint32_t u;
      std::memcpy(&u, b.data() + 4 * i, 4);
      return (u & 0x7fffffffu) > 0x7f800000u;
    }
    case DType::F64: {
      uint64_t u;
      std::memcpy(&u, b.data() + 8 * i, 8);
      return (u & 0x7fffffffffffffffull) > 0x7ff0000000000000ull;
    }
    case DType::F16: {
      uint16_t u;
      std::memcpy(&u, b.data() + 2 * i, 2);
      return (u & 0x7fffu) > 0x7c00u;
    }
    default: {
      uint16_t u;
      std::memcpy(&u, b.data() + 2 * i, 2);
      return (u & 0x7fffu) > 0x7f80u;
    }
  }
}

struct Gen {
  std::mt19937_64 rng;
  explicit Gen(uint64_t seed) : rng(seed) {}
  uint64_t u(uint64_t n) { return n == 0 ? 0 : rng() % n; }
  double uni() { return std::uniform_real_distribution<double>(0.0, 1.0)(rng); }
  bool coin(double p = 0.5) { return uni() < p; }
  template <class T>
  T pick(std::initializer_list<T> xs) {
    return *(xs.begin() + u(xs.size()));
  }
};

void store(std::vector<uint8_t>& buf, DType t, uint64_t i, float v) { della::store_f32(buf.data(), t, i, v); }

Case make_case(Gen& g, int index) {
  Case c;
  della::MergeTask& t = c.task;
  // A third of the cases are merges as users run them, which take the fast kernels: one
  // 16-bit dtype, matrices with rows of a multiple of 8, K <= 4, della (mostly), DARE,
  // TIES or breadcrumbs with their usual rescale and consensus. The rest range over everything.
  const bool typical = g.coin(1.0 / 3);
  // Shape: rank 0..3; row lengths around the block ranking capacity (4096) and beyond.
  const int rank = typical ? 2 : static_cast<int>(g.pick({0, 1, 1, 2, 2, 2, 2, 3}));
  // Rows around both block ranking tiers (4096, 16384) and past them (segmented sort).
  const uint64_t n = typical ? g.pick<uint64_t>({8, 64, 512, 1024, 2048, 4096, 4096, 11008, 14336})
                             : g.pick<uint64_t>({0, 1, 2, 3, 5, 8, 63, 64, 100, 777, 1024, 2049, 4095, 4096, 4097, 6000,
                                                 11008, 16384, 16385, 17000});
  uint64_t rows_budget = std::max<uint64_t>(1, 200000 / std::max<uint64_t>(n, 1));
  if (rank == 0) t.shape = {};
  else if (rank == 1) t.shape = {static_cast<int64_t>(g.coin(0.1) ? 0 : std::max<uint64_t>(n, 1) * (1 + g.u(3)))};
  else if (rank == 2) t.shape = {static_cast<int64_t>(g.coin(0.05) ? 0 : 1 + g.u(std::min<uint64_t>(rows_budget, 70))), static_cast<int64_t>(n)};
  else t.shape = {static_cast<int64_t>(1 + g.u(3)), static_cast<int64_t>(1 + g.u(std::max<uint64_t>(1, std::min<uint64_t>(rows_budget / 3, 20)))), static_cast<int64_t>(n)};
  const uint64_t N = numel_of(t.shape);

  const DType dts[] = {DType::F32, DType::F16, DType::BF16, DType::F64};
  t.base_dtype = dts[g.u(4)];
  t.out_dtype = g.coin(0.6) ? t.base_dtype : dts[g.u(4)];
  // Often one 16-bit dtype throughout, the common case, which takes the vector kernels.
  const bool one_half = typical || g.coin(0.35);
  if (one_half) t.base_dtype = t.out_dtype = g.coin() ? DType::BF16 : DType::F16;
  const unsigned K = static_cast<unsigned>(!typical && g.coin(0.1) ? 5 + g.u(2) : 1 + g.u(4));
  t.linear = !typical && g.coin(0.1);
  t.sparsifier = t.linear ? della::Sparsifier::None
                          : static_cast<della::Sparsifier>(typical ? g.pick({1, 1, 1, 2, 3, 4})
                                                                   : g.pick({0, 1, 1, 2, 2, 3, 3, 4, 4}));
  const bool whole = t.sparsifier == della::Sparsifier::Magnitude || t.sparsifier == della::Sparsifier::Breadcrumbs;
  if (t.linear || t.sparsifier == della::Sparsifier::None) t.rescale = della::Rescale::None;
  else if (whole) t.rescale = g.pick({della::Rescale::None, della::Rescale::L1, della::Rescale::L2, della::Rescale::Linf});
  else t.rescale = g.pick({della::Rescale::Inverse, della::Rescale::Inverse, della::Rescale::None, della::Rescale::L1,
                           della::Rescale::L2, della::Rescale::Linf});
  if (typical) t.rescale = whole ? della::Rescale::None : della::Rescale::Inverse;
  t.consensus = typical ? della::Consensus::Sum
                        : g.pick({della::Consensus::None, della::Consensus::Sum, della::Consensus::Sum, della::Consensus::Count});
  t.normalize = g.coin();
  t.lambda = g.coin(0.7) ? 1.0 : 0.25 + 1.5 * g.uni();
  t.tensor_id = static_cast<uint32_t>(g.rng());
  t.digest = g.coin();
  t.seed = g.rng() & ((1ull << 53) - 1);

  // Values: small deltas around a base, sometimes quantized (many equal keys), sometimes
  // equal to the base (zero deltas), a few with large magnitudes, some near F16's limit
  // (merged values that overflow it are stored as infinities and counted).
  const bool quantized = g.coin(0.3);
  const double scale = g.coin(0.08) ? 30000.0 : g.pick({0.02, 1.0, 300.0});
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<float> base_vals(N);
  for (uint64_t i = 0; i < N; ++i) base_vals[i] = static_cast<float>(nd(g.rng) * scale);
  if (!t.linear) {
    c.inputs.emplace_back(N * della::dtype_size(t.base_dtype));
    for (uint64_t i = 0; i < N; ++i) store(c.inputs.back(), t.base_dtype, i, base_vals[i]);
  }
  const bool embed = !typical && rank >= 1 && N > 0 && g.coin(0.15);
  c.nonfinite = g.coin(0.08);
  for (unsigned k = 0; k < K; ++k) {
    della::ExpertInput e;
    e.dtype = one_half || g.coin(0.7) ? t.base_dtype : dts[g.u(4)];
    e.shape = t.shape;
    if (embed)
      for (auto& d : e.shape) d += static_cast<int64_t>(1 + g.u(3));
    e.weight = g.coin(0.4) ? 1.0f : static_cast<float>(g.uni() * 2.0 - 0.6);
    e.density = g.coin(0.15) ? 1.0 : g.pick({0.05, 0.3, 0.5, 0.9}) * (0.5 + 0.5 * g.uni());
    const double room = std::min(e.density, 1.0 - e.density);
    e.epsilon = t.sparsifier == della::Sparsifier::Magprune && e.density < 1.0 ? room * 0.99 * g.uni() : 0.0;
    if (e.density >= 1.0) e.epsilon = 0.0;
    e.gamma = g.pick({0.0, 0.01, 0.1});
    const uint64_t EN = numel_of(e.shape);
    std::vector<uint8_t> buf(EN * della::dtype_size(e.dtype));
    const double spread = scale * g.pick({0.001, 0.05, 0.5});
    for (uint64_t i = 0; i < EN; ++i) {
      double v = nd(g.rng) * spread;
      if (quantized) v = std::round(v / spread * 4.0) * spread / 4.0;
      if (g.coin(0.05)) v = 0.0;
      store(buf, e.dtype, i, static_cast<float>(v + (i < N ? base_vals[i % N] : 0.0)));
    }
    // Rows of the sub-block must see the base's values near them too: for embeddings
    // the row offsets differ, so the deltas are simply wider; that is fine for parity.
    if (c.nonfinite && EN > 0) {
      const float specials[] = {NAN, INFINITY, -INFINITY};
      for (int s = 0; s < 3; ++s) store(buf, e.dtype, g.u(EN), specials[g.u(3)]);
    }
    c.inputs.push_back(std::move(buf));
    t.experts.push_back(e);
  }
  if (c.nonfinite && !t.linear && N > 0) store(c.inputs[0], t.base_dtype, g.u(N), NAN);
  // Wire the pointers.
  size_t at = 0;
  if (!t.linear) t.base = c.inputs[at++].data();
  for (unsigned k = 0; k < K; ++k) t.experts[k].data = c.inputs[at++].data();
  c.cpu_out.assign(N * della::dtype_size(t.out_dtype), 0);
  c.gpu_out.assign(c.cpu_out.size(), 0);

  char buf[512];
  std::string shape = "[";
  for (size_t i = 0; i < t.shape.size(); ++i) shape += (i ? "," : "") + std::to_string(t.shape[i]);
  shape += "]";
  std::snprintf(buf, sizeof buf,
                "case %d%s: shape %s base %s out %s K=%u linear=%d sparsifier=%d rescale=%d consensus=%d normalize=%d "
                "lambda=%g seed=%" PRIu64 " embed=%d nonfinite=%d quantized=%d",
                index, typical ? " (typical)" : "", shape.c_str(), dtype_name(t.base_dtype), dtype_name(t.out_dtype), K, t.linear,
                static_cast<int>(t.sparsifier), static_cast<int>(t.rescale), static_cast<int>(t.consensus), t.normalize,
                t.lambda, t.seed, embed, c.nonfinite, quantized);
  c.desc = buf;
  for (unsigned k = 0; k < K; ++k) {
    std::snprintf(buf, sizeof buf, "\n    expert %u: %s w=%g d=%g eps=%g gamma=%g", k, dtype_name(t.experts[k].dtype),
                  t.experts[k].weight, t.experts[k].density, t.experts[k].epsilon, t.experts[k].gamma);
    c.desc += buf;
  }
  return c;
}

// The order of the l1/l2 norm rescale's binary64 sums (SPEC: each row's in index order,
// then the rows in index order). Random inputs cannot see it: the scale is rounded to fp32,
// which hides the last bits of the sums. Here a row's large deltas are followed by eight
// tiny ones, each under half an ulp of the running sum: in SPEC's order every tiny one is
// lost and f32(s) rounds down; summed before the large ones (the row or the rows
// reversed, a tree, each batch of 8 reversed) four or more survive and it rounds up.
// With the tiny deltas in the same row, or one each in 8 rows spread over the tensor (and
// its slabs). TIES' trim keeps only the delta 1.0, so s is the full norm and the merged
// element is f32(s).
// - l1: the large deltas sum exactly to one binary64 ulp below an fp32 rounding midpoint
//   (whose even neighbour is above it); the tiny ones are 2^-54.
// - l2: the squares of the large deltas sum to one ulp above m^2, m = 1 + 2^-24 being the
//   midpoint above 1; the square root rounds to m itself, a tie that f32 breaks to even
//   (1). The tiny deltas are 2^-27 (squares 2^-54): four or more of them make the sum two
//   ulps above m^2, whose root is above m and rounds up.
struct NormOrder {
  della::Rescale rescale;
  const char* name;
  std::vector<double> large;  // in index order; the first is 1.0, the one TIES keeps
  double tiny;                // eight of these
  float spec;                 // the merged element in SPEC's order
  double term(double delta) const { return rescale == della::Rescale::L2 ? delta * delta : delta; }
  float scale(double sum) const { return static_cast<float>(rescale == della::Rescale::L2 ? std::sqrt(sum) : sum); }
};
const NormOrder kNormOrders[] = {
    {della::Rescale::L1, "l1", {1.0, 0.5, 0x1p-23, 0x1p-24 - 0x1p-48, 15 * 0x1p-52}, 0x1p-54, 1.5f + 0x1p-23f},
    {della::Rescale::L2, "l2", {1.0, 0x1p-12, 0x1p-12, 0x1p-24, 0x1p-26}, 0x1p-27, 1.0f},
};

// Whether the other orders named above round the other way (else the cases check nothing).
bool norm_order_is_sharp(const NormOrder& o) {
  std::vector<double> row;
  for (double d : o.large) row.push_back(o.term(d));
  row.insert(row.end(), 8, o.term(o.tiny));
  auto seq = [](const std::vector<double>& xs) { double s = 0; for (double x : xs) s += x; return s; };
  std::vector<double> reversed(row.rbegin(), row.rend()), batches;
  for (size_t i = 0; i < row.size(); i += 8)
    for (size_t j = std::min(row.size(), i + 8); j > i; --j) batches.push_back(row[j - 1]);
  std::vector<double> tree = row;
  while (tree.size() > 1) {
    std::vector<double> next;
    for (size_t i = 0; i < tree.size(); i += 2) next.push_back(i + 1 < tree.size() ? tree[i] + tree[i + 1] : tree[i]);
    tree = next;
  }
  return o.scale(seq(row)) == o.spec && o.scale(seq(reversed)) != o.spec && o.scale(seq(batches)) != o.spec &&
         o.scale(tree[0]) != o.spec;
}

Case norm_order_case(int index, const NormOrder& o, bool across_rows) {
  Case c;
  della::MergeTask& t = c.task;
  const uint64_t rows = across_rows ? 4096 : 3, n = 16, N = rows * n;
  t.shape = {static_cast<int64_t>(rows), static_cast<int64_t>(n)};
  t.base_dtype = t.out_dtype = DType::F32;
  t.sparsifier = della::Sparsifier::Magnitude;
  t.rescale = o.rescale;
  t.consensus = della::Consensus::Sum;
  t.tensor_id = 7 + index;
  t.seed = 1;
  t.digest = true;
  c.inputs.emplace_back(N * 4, 0);  // base: zeros, so the deltas are the expert's values
  std::vector<float> ex(N, 0.0f);
  const uint64_t row0 = across_rows ? 0 : 1;
  for (size_t i = 0; i < o.large.size(); ++i) ex[row0 * n + i] = static_cast<float>(o.large[i]);
  for (uint64_t j = 0; j < 8; ++j) {
    const uint64_t at = across_rows ? (1 + j * (rows - 1) / 8) * n + j : row0 * n + o.large.size() + j;
    ex[at] = static_cast<float>(o.tiny);
  }
  c.inputs.emplace_back(N * 4);
  std::memcpy(c.inputs.back().data(), ex.data(), N * 4);
  della::ExpertInput e;
  e.dtype = DType::F32;
  e.shape = t.shape;
  e.density = 1.5 / static_cast<double>(N);  // TIES keeps floor(d * N) = 1: the delta 1.0
  t.experts.push_back(e);
  t.base = c.inputs[0].data();
  t.experts[0].data = c.inputs[1].data();
  c.cpu_out.assign(N * 4, 0);
  c.gpu_out.assign(N * 4, 0);
  c.order_at = row0 * n;
  c.order_spec = o.spec;
  c.desc = "norm order case " + std::to_string(index) + ": " + o.name +
           (across_rows ? ", tiny deltas in 8 rows of [4096, 16]" : ", tiny deltas in one row of [3, 16]");
  return c;
}

// Compares one case's GPU result with the CPU's; NaN matches any NaN (payloads of NaN
// produced by arithmetic are not specified, on either side).
bool same(const Case& c, const della::MergeStats& a, const della::MergeStats& b, const char* config) {
  const DType t = c.task.out_dtype;
  const unsigned es = della::dtype_size(t);
  const uint64_t N = c.cpu_out.size() / es;
  // On a mismatch: how many elements differ, how many still hold the poison, and the
  // first few, with their row, so that one failing run says where to look.
  const uint64_t cols = c.task.shape.empty() ? 1 : std::max<int64_t>(1, c.task.shape.back());
  uint64_t differ = 0, poisoned = 0;
  std::string first;
  for (uint64_t i = 0; i < N; ++i) {
    if (std::memcmp(c.cpu_out.data() + i * es, c.gpu_out.data() + i * es, es) == 0) continue;
    if (is_nan_at(c.cpu_out, t, i) && is_nan_at(c.gpu_out, t, i)) continue;
    ++differ;
    bool all_poison = true;
    for (unsigned b = 0; b < es; ++b) all_poison = all_poison && c.gpu_out[i * es + b] == c.poison;
    poisoned += all_poison;
    if (differ <= 6) {
      const float cv = della::load_f32(c.cpu_out.data(), t, i), gv = della::load_f32(c.gpu_out.data(), t, i);
      char line[160];
      std::snprintf(line, sizeof line, "\n  element %" PRIu64 " (row %" PRIu64 ", col %" PRIu64 "): cpu %.9g gpu %.9g%s", i,
                    i / cols, i % cols, cv, gv, all_poison ? " (poison: never written)" : "");
      first += line;
    }
  }
  if (differ) {
    std::fprintf(stderr, "MISMATCH [%s] %s\n  %" PRIu64 " of %" PRIu64 " elements differ, %" PRIu64 " of them unwritten%s\n",
                 config, c.desc.c_str(), differ, N, poisoned, first.c_str());
    return false;
  }
  // The digest the plugin streams over the slabs it copies out, against its own output.
  if (c.task.digest) {
    const uint64_t want = della::xxh64(c.gpu_out.data(), c.gpu_out.size());
    if (!b.has_digest || b.digest != want) {
      std::fprintf(stderr, "DIGEST MISMATCH [%s] %s\n  has_digest %d, gpu %016" PRIx64 ", xxh64 of its output %016" PRIx64 "\n",
                   config, c.desc.c_str(), b.has_digest, b.digest, want);
      return false;
    }
  }
  if (a.nonfinite != b.nonfinite || a.kept != b.kept || a.numel != b.numel || a.out_nonfinite != b.out_nonfinite) {
    std::fprintf(stderr, "STATS MISMATCH [%s] %s\n  numel cpu %" PRIu64 " gpu %" PRIu64 ", out_nonfinite cpu %" PRIu64
                 " gpu %" PRIu64 "\n", config, c.desc.c_str(), a.numel, b.numel, a.out_nonfinite, b.out_nonfinite);
    for (size_t k = 0; k < a.nonfinite.size() && k < b.nonfinite.size(); ++k)
      std::fprintf(stderr, "  nonfinite[%zu] cpu %" PRIu64 " gpu %" PRIu64 "\n", k, a.nonfinite[k], b.nonfinite[k]);
    for (size_t k = 0; k < a.kept.size() && k < b.kept.size(); ++k)
      std::fprintf(stderr, "  kept[%zu] cpu %" PRIu64 " gpu %" PRIu64 "\n", k, a.kept[k], b.kept[k]);
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    std::printf("SKIP: no CUDA device (%s)\n", e != cudaSuccess ? cudaGetErrorString(e) : "the driver reports none");
    return kSkip;
  }
  // SEED "random" (or none): from the clock.
  uint64_t seed = argc > 1 && std::strcmp(argv[1], "random") != 0
                      ? std::strtoull(argv[1], nullptr, 10)
                      : static_cast<uint64_t>(std::chrono::high_resolution_clock::now().time_since_epoch().count());
  const int iterations = argc > 2 ? std::atoi(argv[2]) : 160;
  // "optin": the kernels not on by default instead of the four settings, in a process of
  // their own (scripts/gpu-check.sh), so that a fault there cannot stop the others' check.
  const bool optin = argc > 3 && !std::strcmp(argv[3], "optin");
  std::printf("cuda_parity: seed %" PRIu64 " (rerun: della_cuda_parity %" PRIu64 " %d%s)\n", seed, seed, iterations,
              optin ? " optin" : "");
  std::fflush(stdout);

  struct Config {
    const char* name;
    della::cuda::Options o;
  };
  std::vector<Config> configs(4);
  configs[0].name = "default";
  configs[0].o.memory_budget = 1536ull << 20;
  configs[1].name = "segmented ranks, tiny slabs, 1 stream, grids of 2 blocks";
  configs[1].o.memory_budget = 512ull << 20;
  configs[1].o.streams = 1;
  configs[1].o.block_sort_max = 0;
  configs[1].o.pinned_bytes = 96 << 10;
  configs[1].o.max_slab_elements = 20000;
  configs[1].o.max_grid_blocks = 2;
  configs[2].name = "small slabs, 2 streams, one ranking tier, 512 x 8 ranks by cub's sort, grids of 3 blocks, "
                    "pinned buffers on huge pages, inputs copied from where they are (registered)";
  configs[2].o.block_sort_max = 4096;
  configs[2].o.memory_budget = 512ull << 20;
  configs[2].o.streams = 2;
  configs[2].o.pinned_bytes = 1 << 20;
  configs[2].o.max_slab_elements = 1 << 16;
  configs[2].o.max_grid_blocks = 3;  // the grid-stride kernels' threads take several rounds
  configs[2].o.pinned_huge = true;   // registered in place, regrown as slabs need more
  configs[2].o.register_inputs = true;  // no staging copy: slabs of two streams read the same registered pages
  configs[2].o.fast_paths = della::cuda::kFastFuse | della::cuda::kFastRank;  // 512 x 8, cub's sort
  // The fallback for devices without 128 KiB of shared memory per block, and the generic
  // kernels in place of the 16-bit ones.
  configs[3].name = "global histograms, generic kernels, multi-pass slabs by the pinned buffer";
  configs[3].o.memory_budget = 512ull << 20;
  configs[3].o.shared_hist = false;
  configs[3].o.resident_passes = false;  // multi-pass tasks staged once per pass, as before
  configs[3].o.fast_paths = 0;
  configs[3].o.max_slab_elements = 1 << 17;
  if (optin) {  // the kernels not on by default (Options::fast_paths bits beyond the default ones)
    configs.assign(2, Config{});
    configs[0].name = "default with della rows fused";
    configs[0].o.memory_budget = 1536ull << 20;
    configs[0].o.fast_paths = della::cuda::Options{}.fast_paths | della::cuda::kFusedRow;
    configs[1].name = "della rows fused, small slabs, 2 streams";
    configs[1].o.memory_budget = 512ull << 20;
    configs[1].o.streams = 2;
    configs[1].o.max_slab_elements = 1 << 16;
    configs[1].o.max_grid_blocks = 5;
    configs[1].o.fast_paths = della::cuda::Options{}.fast_paths | della::cuda::kFusedRow;
  }
  std::vector<std::unique_ptr<della::cuda::Context>> ctx;
  try {
    for (const Config& c : configs) ctx.emplace_back(new della::cuda::Context(c.o));
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "cannot open the device: %s\n", ex.what());
    return 1;
  }
  std::printf("device: %s\n", ctx[0]->info().name);

  Gen g(seed);
  int failures = 0, cases = 0, overflowed = 0;
  const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  for (const NormOrder& o : kNormOrders)
    if (!norm_order_is_sharp(o)) {
      std::fprintf(stderr, "the %s norm order cases do not tell SPEC's order of the norm sums from others\n", o.name);
      ++failures;
    }
  for (int it = -1; it < iterations && failures < 5; ++it) {
    // First the norm order cases (in one row and across rows); then random batches of
    // 1..4 tasks, as the addon sends them.
    std::vector<Case> batch;
    if (it < 0) {
      for (const NormOrder& o : kNormOrders)
        for (const bool across : {false, true}) batch.push_back(norm_order_case(cases++, o, across));
    } else {
      const int tasks = 1 + static_cast<int>(g.u(4));
      for (int i = 0; i < tasks; ++i) batch.push_back(make_case(g, cases++));
    }
    std::vector<della::MergeTask> cpu_tasks, gpu_tasks;
    for (Case& c : batch) {
      c.task.out = c.cpu_out.data();
      cpu_tasks.push_back(c.task);
      c.task.out = c.gpu_out.data();
      gpu_tasks.push_back(c.task);
    }
    std::vector<della::MergeStats> cpu_stats;
    try {
      della::run_batch(cpu_tasks, {}, threads, cpu_stats);
    } catch (const std::exception& ex) {
      std::fprintf(stderr, "CPU refused iteration %d: %s\n  %s\n", it, ex.what(), batch[0].desc.c_str());
      ++failures;
      continue;
    }
    for (const della::MergeStats& st : cpu_stats) overflowed += st.out_nonfinite > 0;
    if (it < 0)  // the CPU in SPEC's order: the merged element is f32(s) rounded down
      for (const Case& c : batch) {
        float got;
        std::memcpy(&got, c.cpu_out.data() + 4 * c.order_at, 4);
        if (got != c.order_spec) {
          std::fprintf(stderr, "CPU: %s: merged %.9g, SPEC's order gives %.9g\n", c.desc.c_str(), got, c.order_spec);
          ++failures;
        }
      }
    for (size_t ci = 0; ci < configs.size(); ++ci) {
      for (Case& c : batch) {  // poison: a different byte per config
        c.poison = static_cast<uint8_t>(0xA5 ^ static_cast<int>(ci * 0x3c));
        std::memset(c.gpu_out.data(), c.poison, c.gpu_out.size());
        c.task.out = c.gpu_out.data();
      }
      std::vector<della::MergeStats> gpu_stats;
      try {
        ctx[ci]->run(gpu_tasks, gpu_stats, threads);
      } catch (const std::exception& ex) {
        std::fprintf(stderr, "GPU FAILED [%s] iteration %d: %s\n", configs[ci].name, it, ex.what());
        for (const Case& c : batch) std::fprintf(stderr, "  %s\n", c.desc.c_str());
        ++failures;
        if (!ctx[ci]->healthy()) return 1;
        continue;
      }
      for (size_t i = 0; i < batch.size(); ++i)
        if (!same(batch[i], cpu_stats[i], gpu_stats[i], configs[ci].name)) ++failures;
    }
    if (it >= 0 && (it + 1) % 20 == 0) {
      std::printf("  %d iterations, %d tasks, %d failures\n", it + 1, cases, failures);
      std::fflush(stdout);
    }
  }
  if (failures) {
    std::printf("cuda_parity: FAILED (%d) with seed %" PRIu64 "\n", failures, seed);
    return 1;
  }
  std::printf("cuda_parity: %d tasks x %zu pipeline settings bit-identical to the CPU, %d with non-finite outputs "
              "(seed %" PRIu64 ")\n", cases, configs.size(), overflowed, seed);
  return 0;
}
