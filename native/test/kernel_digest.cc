// Prints a digest (FNV-1a of the output bytes, kept and non-finite counts) of many
// random merges: every sparsifier, rescale and consensus, every dtype, odd row
// lengths, long rows, 1-D tensors, embedding sub-blocks, K = 1..4, 1 and 3 threads.
// ctest runs it in the dispatching build and in builds fixed to AVX2 and to baseline
// x86-64 (DELLA_FIXED_SIMD) and requires the same digests: every SIMD path must give
// the same bytes. Usage: della_kernel_digest [count] [seed]
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../src/kernels/merge_cpu.h"

using namespace della;

int main(int argc, char** argv) {
  const int count = argc > 1 ? std::atoi(argv[1]) : 300;
  const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 20261127;
  std::mt19937_64 rng(seed);
  auto uni = [&](double a, double b) { return std::uniform_real_distribution<double>(a, b)(rng); };
  auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<uint64_t>(n)); };
  const Sparsifier sps[] = {Sparsifier::None, Sparsifier::Magprune, Sparsifier::Random, Sparsifier::Magnitude,
                            Sparsifier::Breadcrumbs};
  const DType dts[] = {DType::F32, DType::F16, DType::BF16, DType::F64};
  for (int c = 0; c < count; ++c) {
    MergeTask t;
    t.sparsifier = sps[pick(5)];
    const bool whole = t.sparsifier == Sparsifier::Magnitude || t.sparsifier == Sparsifier::Breadcrumbs;
    const int r = pick(5);
    t.rescale = r == 0 ? Rescale::None : (r == 1 && !whole ? Rescale::Inverse : static_cast<Rescale>(1 + pick(4)));
    if (whole && t.rescale == Rescale::Inverse) t.rescale = Rescale::L1;
    t.consensus = static_cast<Consensus>(pick(3));
    t.normalize = pick(2);
    t.lambda = pick(3) == 0 ? uni(0.5, 1.5) : 1.0;
    t.seed = rng() & ((1ull << 53) - 1);
    t.tensor_id = static_cast<uint32_t>(rng());
    t.base_dtype = dts[pick(4)];
    t.out_dtype = pick(3) == 0 ? dts[pick(4)] : t.base_dtype;
    // Shapes: mostly 2-D with odd or long rows; some 1-D and 3-D.
    const int shape_kind = pick(6);
    if (shape_kind == 0) t.shape = {static_cast<int64_t>(1 + pick(5000))};
    else if (shape_kind == 1) t.shape = {static_cast<int64_t>(1 + pick(3)), static_cast<int64_t>(1 + pick(4)), static_cast<int64_t>(1 + pick(700))};
    else if (shape_kind == 2) t.shape = {static_cast<int64_t>(1 + pick(4)), static_cast<int64_t>(20000 + pick(50000))};
    else t.shape = {static_cast<int64_t>(1 + pick(40)), static_cast<int64_t>(1 + pick(3000))};
    uint64_t numel = 1;
    for (int64_t d : t.shape) numel *= static_cast<uint64_t>(d);
    const bool embed = t.shape.size() == 2 && pick(5) == 0;
    const int K = 1 + pick(4);
    const double scale = pick(2) ? 0.02 : 1.0;
    std::normal_distribution<double> nd(0.0, scale);
    std::vector<float> basev(numel);
    // Some tensors hold exact zeros, so that experts can differ from the base by
    // subnormal amounts: keys in the lowest block, beside key 0.
    const bool zeros = pick(4) == 0;
    for (auto& v : basev) v = zeros && pick(8) == 0 ? 0.0f : static_cast<float>(nd(rng));
    std::vector<std::vector<uint8_t>> bufs;
    bufs.emplace_back(numel * dtype_size(t.base_dtype));
    for (uint64_t i = 0; i < numel; ++i) store_f32(bufs[0].data(), t.base_dtype, i, basev[i]);
    std::vector<std::vector<int64_t>> eshapes;
    for (int k = 0; k < K; ++k) {
      ExpertInput e;
      e.dtype = pick(4) == 0 ? dts[pick(4)] : t.base_dtype;
      e.shape = t.shape;
      if (embed && k == 0) e.shape = {t.shape[0] + 3, t.shape[1] + 2};
      uint64_t en = 1;
      for (int64_t d : e.shape) en *= static_cast<uint64_t>(d);
      std::vector<uint8_t> buf(en * dtype_size(e.dtype));
      const double spread = uni(0.0005, 0.01) * (scale > 0.5 ? 50 : 1);
      // Styles: normal deltas; or few-ulp nudges of the base's bits, as fine-tuned 16-bit
      // checkpoints have (few distinct keys, long runs of equal ones), with subnormal
      // deltas where the base is zero.
      const bool ulp = dtype_size(e.dtype) == 2 && pick(3) == 0;
      for (uint64_t i = 0; i < en; ++i) {
        // Expert = base (same position) + a small delta; quantized deltas repeat keys.
        uint64_t bi = i;
        if (e.shape != t.shape) {
          const uint64_t row = i / static_cast<uint64_t>(e.shape[1]), col = i % static_cast<uint64_t>(e.shape[1]);
          bi = row < static_cast<uint64_t>(t.shape[0]) && col < static_cast<uint64_t>(t.shape[1])
                   ? row * static_cast<uint64_t>(t.shape[1]) + col
                   : 0;
        }
        if (ulp) {
          store_f32(buf.data(), e.dtype, i, basev[bi]);
          uint16_t x;
          std::memcpy(&x, buf.data() + 2 * i, 2);
          // Within the magnitude bits, so that the sign stays and a zero base gets
          // subnormal neighbours; never into Inf or NaN (inputs are finite).
          const int mag = (x & 0x7fff) + static_cast<int>(pick(9)) - 4;
          const uint16_t y = static_cast<uint16_t>((x & 0x8000) | (mag < 0 ? -mag : mag));
          const uint16_t exp_mask = e.dtype == DType::BF16 ? 0x7f80 : 0x7c00;
          if ((y & exp_mask) != exp_mask) std::memcpy(buf.data() + 2 * i, &y, 2);
          continue;
        }
        const double delta = pick(10) == 0 ? 0.0 : std::normal_distribution<double>(0.0, spread)(rng);
        store_f32(buf.data(), e.dtype, i, static_cast<float>(basev[bi] + delta));
      }
      bufs.push_back(std::move(buf));
      e.weight = static_cast<float>(pick(4) == 0 ? uni(-1.0, 2.0) : 1.0);
      e.density = pick(5) == 0 ? 1.0 : uni(0.2, 0.9);
      e.epsilon = t.sparsifier == Sparsifier::Magprune ? uni(0.0, std::min(e.density, 1.0 - e.density) * 0.99) : 0.0;
      e.gamma = uni(0.0, 0.1);
      t.experts.push_back(e);
    }
    t.base = bufs[0].data();
    for (int k = 0; k < K; ++k) t.experts[k].data = bufs[k + 1].data();
    std::vector<uint8_t> out(numel * dtype_size(t.out_dtype));
    t.out = out.data();
    for (unsigned threads : {1u, 3u}) {
      std::fill(out.begin(), out.end(), 0xa5);  // poison: unwritten bytes change the digest
      std::vector<MergeStats> stats;
      run_batch({t}, {}, threads, stats);
      uint64_t h = 1469598103934665603ull;
      for (uint8_t b : out) h = (h ^ b) * 1099511628211ull;
      std::printf("task %d threads %u: %016llx", c, threads, static_cast<unsigned long long>(h));
      for (uint64_t v : stats[0].kept) std::printf(" %llu", static_cast<unsigned long long>(v));
      for (uint64_t v : stats[0].nonfinite) std::printf(" %llu", static_cast<unsigned long long>(v));
      std::printf("\n");
    }
  }
  return 0;
}
