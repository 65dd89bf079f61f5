// The CPU kernels alone, without Node: one 4096 x 4096 merge, best of ITERS runs
// (default 9), printed as M parameters/s with an FNV-1a digest of the output bytes and
// expert 0's kept count, so that a change can be timed and checked for identical
// bytes in one step. One thread is timed in thread CPU time (less disturbed by other
// load on a shared machine); more threads in wall time. Built by `npm run test:native`
// as build-ctest/della_kernel_driver.
//   della_kernel_driver [method] [threads] [K] [dtype 0=F32 1=F16 2=BF16 3=F64] [dump-file]
// method: della, della_linear, dare_ties, ties, breadcrumbs_ties, ta (task arithmetic)
// DELLA_DRIVER_DATA=ulp: few-ulp expert deltas (16-bit dtypes), as in bench/e2e.js.
// DELLA_DRIVER_ROWS=R: a tensor of R x 4096 (default 4096 rows).
#include <chrono>
#include <ctime>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <vector>
#include <string>
#include "../../native/src/kernels/merge_cpu.h"
using namespace della;
static uint32_t xs = 1;
static uint32_t rnd() { xs ^= xs << 13; xs ^= xs >> 17; xs ^= xs << 5; return xs; }
int main(int argc, char** argv) {
  const char* method = argc > 1 ? argv[1] : "della";
  unsigned threads = argc > 2 ? atoi(argv[2]) : 1;
  int K = argc > 3 ? atoi(argv[3]) : 3;
  DType dt = argc > 4 ? (DType)atoi(argv[4]) : DType::BF16;
  const char* dump = argc > 5 ? argv[5] : nullptr;
  // DELLA_DRIVER_ROWS: rows of the tensor (default 4096; 32768 puts the inputs far beyond the caches).
  const uint64_t R = getenv("DELLA_DRIVER_ROWS") ? strtoull(getenv("DELLA_DRIVER_ROWS"), nullptr, 10) : 4096, C = 4096, N = R * C;
  unsigned es = dtype_size(dt);
  std::vector<float> basef(N);
  std::vector<std::vector<uint8_t>> bufs(K + 2, std::vector<uint8_t>(N * es));
  for (uint64_t i = 0; i < N; ++i) basef[i] = ((rnd() / 4294967296.0) - 0.5) * 0.04;
  // DELLA_DRIVER_DATA=ulp: experts are the base nudged by a few units in the last place,
  // like fine-tuned BF16 checkpoints (and bench/e2e.js's models): far fewer distinct keys.
  const bool ulp = getenv("DELLA_DRIVER_DATA") && std::string(getenv("DELLA_DRIVER_DATA")) == "ulp";
  for (int b = 0; b <= K; ++b)
    for (uint64_t i = 0; i < N; ++i) {
      float v = b == 0 ? basef[i] : basef[i] + ((rnd() / 4294967296.0) - 0.5) * 0.004;
      if (b > 0 && ulp && es == 2) {
        uint16_t x;
        memcpy(&x, bufs[0].data() + 2 * i, 2);
        x = static_cast<uint16_t>(x + (static_cast<int>(rnd() >> 29) - 4) * b);
        memcpy(bufs[b].data() + 2 * i, &x, 2);
        continue;
      }
      store_f32(bufs[b].data(), dt, i, v);
    }
  MergeTask t;
  t.base = bufs[0].data(); t.base_dtype = dt; t.out = bufs[K + 1].data(); t.out_dtype = dt; t.shape = {(int64_t)R, (int64_t)C};
  t.tensor_id = 12345; t.seed = 7;
  std::string m = method;
  double dens = 0.5, eps = 0.1;
  if (m == "della") { t.sparsifier = Sparsifier::Magprune; t.consensus = Consensus::Sum; t.normalize = true; t.rescale = Rescale::Inverse; }
  else if (m == "della_linear") { t.sparsifier = Sparsifier::Magprune; t.rescale = Rescale::Inverse; }
  else if (m == "dare_ties") { t.sparsifier = Sparsifier::Random; t.consensus = Consensus::Sum; t.rescale = Rescale::Inverse; }
  else if (m == "ties") { t.sparsifier = Sparsifier::Magnitude; t.consensus = Consensus::Sum; t.normalize = true; }
  else if (m == "breadcrumbs_ties") { t.sparsifier = Sparsifier::Breadcrumbs; t.consensus = Consensus::Sum; }
  else if (m == "ta") { dens = 1; }
  for (int k = 0; k < K; ++k) { ExpertInput e; e.data = bufs[k + 1].data(); e.dtype = dt; e.shape = t.shape; e.weight = 1.0f - 0.1f * k; e.density = dens; e.epsilon = eps; e.gamma = 0.01; t.experts.push_back(e); }
  std::vector<MergeStats> st;
  double best = 1e9;
  int iters = getenv("ITERS") ? atoi(getenv("ITERS")) : 9; for (int it = 0; it < iters; ++it) {
    memset(t.out, 0xa5, N * es);
    timespec a0; clock_gettime(threads == 1 ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &a0);
    run_batch({t}, {}, threads, st);
    timespec a1; clock_gettime(threads == 1 ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &a1); double s = (a1.tv_sec - a0.tv_sec) + (a1.tv_nsec - a0.tv_nsec) * 1e-9;
    if (s < best) best = s;
  }
  uint64_t h = 1469598103934665603ull;
  const uint8_t* o = (const uint8_t*)t.out;
  for (uint64_t i = 0; i < N * es; ++i) { h ^= o[i]; h *= 1099511628211ull; }
  printf("%s K=%d dt=%d threads=%u: %.1f M/s  hash=%016llx kept0=%llu\n", method, K, (int)dt, threads, N / best / 1e6, (unsigned long long)h, (unsigned long long)st[0].kept[0]);
  if (dump) { FILE* f = fopen(dump, "wb"); fwrite(t.out, 1, N * es, f); fclose(f); }
}
