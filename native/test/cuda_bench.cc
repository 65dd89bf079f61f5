// Kernel throughput of the CUDA backend beside the memory ceiling measured in the same
// run: della, dare_ties, ties and task_arithmetic with K = 3 BF16 experts on R x C
// tensors whose inputs are already on the device (kernels only), a device-to-device
// cudaMemcpy of the same bytes, pinned host-to-device bandwidth, and the whole pipeline
// (pageable host memory in and out, as the addon's memory maps). Every kernel result is
// also checked bit for bit against della::run_batch. Prints a table; --json FILE writes
// the numbers.
//   della_cuda_bench [--json FILE] [--sizes 4096x4096,14336x4096] [--reps N] [--methods della,ties,...]
//                    [--exclude della/fused-row,...] [--no-register-probe]
#include <cuda_runtime.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../src/kernels/merge_cpu.h"
#include "cuda_merge.h"

namespace {

#define CK(x)                                                                                      \
  do {                                                                                             \
    cudaError_t e_ = (x);                                                                          \
    if (e_ != cudaSuccess) {                                                                       \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));      \
      std::exit(1);                                                                                \
    }                                                                                              \
  } while (0)

struct Method {
  const char* name;
  della::Sparsifier sp;
  della::Rescale rs;
  della::Consensus cons;
  bool normalize;
  bool shared_hist = true;  // della::cuda::Options of the variant timed
  bool variant = false;     // not the default options: timed as kernels only
  unsigned fast_paths = della::cuda::Options{}.fast_paths;
};

constexpr unsigned kAllFast = della::cuda::Options{}.fast_paths;

// The methods, and beside ties the fallback kept for devices with less shared memory
// (global-atomic histograms; same bytes, timed in the same run).
const Method kMethods[] = {
    {"della", della::Sparsifier::Magprune, della::Rescale::Inverse, della::Consensus::Sum, true},
    {"dare_ties", della::Sparsifier::Random, della::Rescale::Inverse, della::Consensus::Sum, false},
    {"ties", della::Sparsifier::Magnitude, della::Rescale::None, della::Consensus::Sum, true},
    {"ties/global-hist", della::Sparsifier::Magnitude, della::Rescale::None, della::Consensus::Sum, true, false, true},
    {"task_arithmetic", della::Sparsifier::None, della::Rescale::None, della::Consensus::None, false},
    // Breadcrumbs (gamma 0.01) with the l2 rescale: the norm pass, then the final pass;
    // /prev sums the norms an element at a time (without kNormLoads).
    {"breadcrumbs_l2", della::Sparsifier::Breadcrumbs, della::Rescale::L2, della::Consensus::Sum, false},
    {"breadcrumbs_l2/prev", della::Sparsifier::Breadcrumbs, della::Rescale::L2, della::Consensus::Sum, false, true, true,
     kAllFast & ~della::cuda::kNormLoads},
    // The generic kernels (Options::fast_paths = 0), della with only the fuse's, and della
    // without each of the ranking kernel's default choices in turn.
    {"della/generic", della::Sparsifier::Magprune, della::Rescale::Inverse, della::Consensus::Sum, true, true, true, 0},
    {"della/fast-fuse", della::Sparsifier::Magprune, della::Rescale::Inverse, della::Consensus::Sum, true, true, true,
     della::cuda::kFastFuse},
    {"della/cub-sort", della::Sparsifier::Magprune, della::Rescale::Inverse, della::Consensus::Sum, true, true, true,
     kAllFast & ~della::cuda::kRankDirect},
    {"della/512x8", della::Sparsifier::Magprune, della::Rescale::Inverse, della::Consensus::Sum, true, true, true,
     kAllFast & ~della::cuda::kRank256},
    {"della/1024x16", della::Sparsifier::Magprune, della::Rescale::Inverse, della::Consensus::Sum, true, true, true,
     kAllFast & ~della::cuda::kTier2Wide},
    // The kernels of 2026-11-27 (before kFuseFixed, kRankLean and kCutFused), and without
    // each of the first two.
    {"della/prev", della::Sparsifier::Magprune, della::Rescale::Inverse, della::Consensus::Sum, true, true, true,
     kAllFast & ~(della::cuda::kFuseFixed | della::cuda::kRankLean)},
    {"della/plain-fuse", della::Sparsifier::Magprune, della::Rescale::Inverse, della::Consensus::Sum, true, true, true,
     kAllFast & ~della::cuda::kFuseFixed},
    {"della/plain-rank", della::Sparsifier::Magprune, della::Rescale::Inverse, della::Consensus::Sum, true, true, true,
     kAllFast & ~della::cuda::kRankLean},
    {"dare_ties/prev", della::Sparsifier::Random, della::Rescale::Inverse, della::Consensus::Sum, false, true, true,
     kAllFast & ~della::cuda::kFuseFixed},
    {"ties/prev", della::Sparsifier::Magnitude, della::Rescale::None, della::Consensus::Sum, true, true, true,
     kAllFast & ~della::cuda::kFuseFixed},
    // Ties with the fixed fuse but its cut decided by the occurrence scan and a sparsify
    // kernel, as before kCutFused.
    {"ties/scan", della::Sparsifier::Magnitude, della::Rescale::None, della::Consensus::Sum, true, true, true,
     kAllFast & ~della::cuda::kCutFused},
    {"task_arithmetic/prev", della::Sparsifier::None, della::Rescale::None, della::Consensus::None, false, true, true,
     kAllFast & ~della::cuda::kFuseFixed},
    {"dare_ties/generic", della::Sparsifier::Random, della::Rescale::Inverse, della::Consensus::Sum, false, true, true, 0},
    {"ties/generic", della::Sparsifier::Magnitude, della::Rescale::None, della::Consensus::Sum, true, true, true, 0},
    {"task_arithmetic/generic", della::Sparsifier::None, della::Rescale::None, della::Consensus::None, false, true, true,
     0},
    // Not on by default: della's final pass in one kernel for rows up to 4096 (kFusedRow).
    // gpu-check.sh times it in a run of its own, so that a fault in it costs no other row.
    {"della/fused-row", della::Sparsifier::Magprune, della::Rescale::Inverse, della::Consensus::Sum, true, true, true,
     kAllFast | della::cuda::kFusedRow},
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Times fn() (enqueued on `s`) with events: warm-up, then the median of `reps`.
template <class Fn>
double time_ms(cudaStream_t s, int reps, Fn fn) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  fn();
  fn();
  CK(cudaStreamSynchronize(s));
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(a, s));
    fn();
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float t = 0;
    CK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  return median(ms);
}

// Pinning memory the host already holds instead of staging through a pinned buffer: the
// cost of cudaHostRegister on 1 GiB of a page-cached file mapped read-only (as a merge
// maps its inputs) and on 1 GiB of touched anonymous memory, and the device's read rate
// from each. It tells whether a merge could copy straight from its input maps. A refusal
// by the driver is reported, not an error. Returns the JSON object.
std::string register_probe(cudaStream_t s) {
  const size_t bytes = 1ull << 30;
  void* d = nullptr;
  CK(cudaMalloc(&d, bytes));
  auto ms_since = [](std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  };
  // One source: register it, time copies from it, unregister. ms values < 0: refused.
  auto probe = [&](void* h, unsigned flags, const char* what, double& reg_ms, double& gbs, double& unreg_ms) {
    reg_ms = gbs = unreg_ms = -1;
    const auto r0 = std::chrono::steady_clock::now();
    const cudaError_t e = cudaHostRegister(h, bytes, flags);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      std::printf("pinned in place, %s: cudaHostRegister refused: %s\n", what, cudaGetErrorString(e));
      return;
    }
    reg_ms = ms_since(r0);
    gbs = bytes / time_ms(s, 5, [&] { CK(cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, s)); }) / 1e6;
    const auto u0 = std::chrono::steady_clock::now();
    CK(cudaHostUnregister(h));
    unreg_ms = ms_since(u0);
    std::printf("pinned in place, %s: cudaHostRegister of 1 GiB %.1f ms, host-to-device %.1f GB/s, unregister %.1f ms\n",
                what, reg_ms, gbs, unreg_ms);
  };
  double file_reg = -1, file_gbs = -1, file_unreg = -1, anon_reg = -1, anon_gbs = -1, anon_unreg = -1;
  const char* dir = std::getenv("TMPDIR");
  std::string path = std::string(dir && *dir ? dir : "/tmp") + "/della_register_probe_XXXXXX";
  const int fd = mkstemp(path.data());
  if (fd >= 0) {
    unlink(path.c_str());
    std::vector<char> chunk(8 << 20, 1);
    size_t written = 0;
    while (written < bytes) {
      const ssize_t w = write(fd, chunk.data(), chunk.size());
      if (w <= 0) break;
      written += static_cast<size_t>(w);
    }
    void* map = written >= bytes ? mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
    if (map != MAP_FAILED) {
      probe(map, cudaHostRegisterReadOnly, "page-cached file, read-only map", file_reg, file_gbs, file_unreg);
      munmap(map, bytes);
    } else {
      std::printf("pinned in place: could not write and map a 1 GiB file in %s\n", dir && *dir ? dir : "/tmp");
    }
    close(fd);
  }
  {
    std::vector<char> anon(bytes, 1);
    probe(anon.data(), cudaHostRegisterDefault, "touched anonymous memory", anon_reg, anon_gbs, anon_unreg);
  }
  // The same on 2 MiB pages, where the kernel gives them (transparent huge pages, asked
  // for with madvise): if pinning costs per page, 512 times fewer pages could make the
  // pinned staging buffers' allocation (cudaMallocHost, 0.45-0.58 s a GiB on the H100
  // machine) nearly free.
  double huge_reg = -1, huge_gbs = -1, huge_unreg = -1;
  std::string thp = "?";
  if (FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r")) {
    char line[128] = {0};
    if (std::fgets(line, sizeof line, f)) thp = std::string(line, std::strcspn(line, "\n"));
    std::fclose(f);
  }
  const size_t huge_page = 2ull << 20;
  void* raw = mmap(nullptr, bytes + huge_page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw != MAP_FAILED) {
    char* h = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw) + huge_page - 1) & ~(huge_page - 1));
    const int advised = madvise(h, bytes, MADV_HUGEPAGE);
    std::memset(h, 1, bytes);
    const std::string what = "touched anonymous memory, MADV_HUGEPAGE (" + std::string(advised == 0 ? "advised" : "refused") +
                             "; transparent huge pages: " + thp + ")";
    probe(h, cudaHostRegisterDefault, what.c_str(), huge_reg, huge_gbs, huge_unreg);
    munmap(raw, bytes + huge_page);
  }
  CK(cudaFree(d));
  char json[768];
  std::snprintf(json, sizeof json,
                "{\"bytes\": %zu, \"file_register_ms\": %.1f, \"file_h2d_GBps\": %.2f, \"file_unregister_ms\": %.1f, "
                "\"anon_register_ms\": %.1f, \"anon_h2d_GBps\": %.2f, \"anon_unregister_ms\": %.1f, "
                "\"anon_huge_register_ms\": %.1f, \"anon_huge_h2d_GBps\": %.2f, \"anon_huge_unregister_ms\": %.1f}",
                bytes, file_reg, file_gbs, file_unreg, anon_reg, anon_gbs, anon_unreg, huge_reg, huge_gbs, huge_unreg);
  return json;
}

}  // namespace

int main(int argc, char** argv) {
  std::string json, sizes = "4096x4096,14336x4096", methods, exclude;
  bool probe_register = true;
  int reps = 10;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
    else if (!std::strcmp(argv[i], "--sizes") && i + 1 < argc) sizes = argv[++i];
    else if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--methods") && i + 1 < argc) methods = "," + std::string(argv[++i]) + ",";
    else if (!std::strcmp(argv[i], "--exclude") && i + 1 < argc) exclude = "," + std::string(argv[++i]) + ",";
    else if (!std::strcmp(argv[i], "--no-register-probe")) probe_register = false;
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("SKIP: no CUDA device\n");
    return 77;
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  CK(cudaSetDevice(0));
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  const unsigned threads = std::max(1u, std::thread::hardware_concurrency());

  bool first_row = true, all_equal = true;
  std::printf("device %s; K=3 BF16 experts, BF16 base and output; median of %d runs\n", prop.name, reps);
  std::printf("%-23s %-11s %10s %10s %12s %12s %10s  %s\n", "method", "shape", "ms", "GB/s", "Gparams/s",
              "memcpy GB/s", "of memcpy", "equal to CPU");

  // Pinned host-to-device bandwidth, the ceiling of an end-to-end GPU merge.
  double h2d_gbs = 0;
  {
    const size_t bytes = 1ull << 30;
    void *h = nullptr, *d = nullptr;
    const auto a0 = std::chrono::steady_clock::now();
    CK(cudaMallocHost(&h, bytes));
    const double alloc_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a0).count();
    CK(cudaMalloc(&d, bytes));
    std::memset(h, 1, bytes);
    const double ms = time_ms(s, 5, [&] { CK(cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, s)); });
    h2d_gbs = bytes / ms / 1e6;
    CK(cudaFree(d));
    CK(cudaFreeHost(h));
    std::printf("pinned host-to-device copy: %.1f GB/s (cudaMallocHost of 1 GiB: %.1f ms)\n", h2d_gbs, alloc_ms);
  }
  const std::string registered = probe_register ? register_probe(s) : "null";
  std::string out = "{\n  \"device\": \"" + std::string(prop.name) + "\",\n  \"host_register\": " + registered +
                    ",\n  \"results\": [\n";

  size_t pos = 0;
  while (pos < sizes.size()) {
    const size_t comma = sizes.find(',', pos);
    const std::string sz = sizes.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    pos = comma == std::string::npos ? sizes.size() : comma + 1;
    int64_t R = 0, C = 0;
    if (std::sscanf(sz.c_str(), "%lldx%lld", reinterpret_cast<long long*>(&R), reinterpret_cast<long long*>(&C)) != 2) continue;
    const uint64_t N = static_cast<uint64_t>(R) * C;
    const int K = 3;
    // Random BF16 weights (never zeros: they would hide unwritten outputs).
    std::vector<std::vector<uint16_t>> host(K + 1, std::vector<uint16_t>(N));
    {
      std::mt19937_64 rng(R * 131 + C);
      std::normal_distribution<float> nd(0.0f, 0.02f);
      for (uint64_t i = 0; i < N; ++i) host[0][i] = della::f32_to_bf16(nd(rng));
      for (int k = 1; k <= K; ++k)
        for (uint64_t i = 0; i < N; ++i)
          host[k][i] = della::f32_to_bf16(della::bf16_to_f32(host[0][i]) + nd(rng) * 0.1f);
    }
    std::vector<void*> dev(K + 1);
    for (int k = 0; k <= K; ++k) {
      CK(cudaMalloc(&dev[k], N * 2));
      CK(cudaMemcpy(dev[k], host[k].data(), N * 2, cudaMemcpyHostToDevice));
    }
    void* dout = nullptr;
    CK(cudaMalloc(&dout, N * 2));
    const uint64_t in_bytes = (K + 1) * N * 2, out_bytes = N * 2;
    // The ceiling: a device-to-device copy of the merge's input bytes (read + write counted).
    void *ca = nullptr, *cb = nullptr;
    CK(cudaMalloc(&ca, in_bytes));
    CK(cudaMalloc(&cb, in_bytes));
    CK(cudaMemset(ca, 1, in_bytes));
    const double copy_ms = time_ms(s, reps, [&] { CK(cudaMemcpyAsync(cb, ca, in_bytes, cudaMemcpyDeviceToDevice, s)); });
    const double copy_gbs = 2.0 * in_bytes / copy_ms / 1e6;
    CK(cudaFree(ca));
    CK(cudaFree(cb));

    // The addon's path: default options (16 GiB or 85% of free memory, 3 streams).
    della::cuda::Context pipeline{della::cuda::Options{}};
    for (const Method& m : kMethods) {
      if (!methods.empty() && methods.find("," + std::string(m.name) + ",") == std::string::npos) continue;
      if (exclude.find("," + std::string(m.name) + ",") != std::string::npos) continue;
      della::MergeTask t;
      t.base = dev[0];
      t.base_dtype = t.out_dtype = della::DType::BF16;
      t.out = dout;
      t.shape = {R, C};
      t.sparsifier = m.sp;
      t.rescale = m.rs;
      t.consensus = m.cons;
      t.normalize = m.normalize;
      t.seed = 1234;
      t.tensor_id = 0x9e3779b9u;
      for (int k = 0; k < K; ++k) {
        della::ExpertInput e;
        e.data = dev[k + 1];
        e.dtype = della::DType::BF16;
        e.shape = t.shape;
        e.weight = 0.5f + 0.25f * k;
        e.density = m.sp == della::Sparsifier::None ? 1.0 : 0.4;
        e.epsilon = m.sp == della::Sparsifier::Magprune ? 0.15 : 0.0;
        e.gamma = m.sp == della::Sparsifier::Breadcrumbs ? 0.01 : 0.0;
        t.experts.push_back(e);
      }
      della::cuda::Options o;
      o.shared_hist = m.shared_hist;
      o.fast_paths = m.fast_paths;
      const uint64_t ws_bytes = della::cuda::device_workspace_bytes(t, o);
      void* ws = nullptr;
      CK(cudaMalloc(&ws, std::max<uint64_t>(ws_bytes, 256)));
      CK(cudaMemset(dout, 0xA5, N * 2));  // poison
      const double ms = time_ms(s, reps, [&] { della::cuda::run_device_task(t, ws, ws_bytes, o, s); });
      CK(cudaStreamSynchronize(s));
      CK(cudaGetLastError());
      std::vector<uint16_t> gpu(N), cpu(N);
      CK(cudaMemcpy(gpu.data(), dout, N * 2, cudaMemcpyDeviceToHost));
      // The same task on the CPU, from host copies.
      della::MergeTask h = t;
      h.base = host[0].data();
      for (int k = 0; k < K; ++k) h.experts[k].data = host[k + 1].data();
      h.out = cpu.data();
      std::vector<della::MergeStats> st;
      const auto c0 = std::chrono::steady_clock::now();
      della::run_batch({h}, {}, threads, st);
      const double cpu_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - c0).count();
      const bool equal = gpu == cpu;
      all_equal = all_equal && equal;

      // The whole pipeline from pageable host memory (as from memory maps) and back.
      std::vector<uint16_t> pipe(N, 0x5a5a);
      della::MergeTask pt = h;
      pt.out = pipe.data();
      double pipe_ms = 0;
      if (!m.variant) {
        std::vector<della::MergeStats> ps;
        pipeline.run({pt}, ps, threads);  // warm-up: pinned buffers grow here
        std::vector<double> runs;
        for (int r = 0; r < 3; ++r) {
          const auto p0 = std::chrono::steady_clock::now();
          pipeline.run({pt}, ps, threads);
          runs.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - p0).count());
        }
        pipe_ms = median(runs);
      }
      const bool pipe_equal = pipe_ms == 0 || pipe == cpu;  // variants: kernels only
      all_equal = all_equal && pipe_equal;

      const double gbs = (in_bytes + out_bytes) / ms / 1e6;
      const double gps = N / ms / 1e6;
      const double pipe_gbs = pipe_ms > 0 ? (in_bytes + out_bytes) / pipe_ms / 1e6 : 0;
      char pipe_text[128] = "kernels only";
      if (pipe_ms > 0)
        std::snprintf(pipe_text, sizeof pipe_text, "pipeline %.1f ms = %.1f GB/s in+out, %s", pipe_ms, pipe_gbs,
                      pipe_equal ? "equal" : "DIFFERS");
      std::printf("%-23s %-11s %10.3f %10.1f %12.2f %12.1f %9.0f%%  %s (CPU %.0f ms; %s)\n", m.name, sz.c_str(), ms,
                  gbs, gps, copy_gbs, 100.0 * gbs / copy_gbs, equal ? "yes" : "NO", cpu_ms, pipe_text);
      char pipe_json[160] = "\"pipeline_ms\": null, \"pipeline_GBps\": null, \"pipeline_equal_to_cpu\": null";
      if (pipe_ms > 0)
        std::snprintf(pipe_json, sizeof pipe_json,
                      "\"pipeline_ms\": %.3f, \"pipeline_GBps\": %.2f, \"pipeline_equal_to_cpu\": %s", pipe_ms,
                      pipe_gbs, pipe_equal ? "true" : "false");
      char row[1024];
      std::snprintf(row, sizeof row,
                    "%s    {\"method\": \"%s\", \"shape\": [%lld, %lld], \"experts\": %d, \"dtype\": \"BF16\", "
                    "\"kernel_ms\": %.4f, \"kernel_GBps\": %.2f, \"params_per_s\": %.4g, \"memcpy_d2d_ms\": %.4f, "
                    "\"memcpy_d2d_GBps\": %.2f, \"bytes_in\": %llu, \"bytes_out\": %llu, \"equal_to_cpu\": %s, "
                    "\"cpu_ms\": %.2f, \"cpu_threads\": %u, %s, \"h2d_pinned_GBps\": %.2f}",
                    first_row ? "" : ",\n", m.name, static_cast<long long>(R), static_cast<long long>(C), K, ms, gbs,
                    N / ms * 1e3, copy_ms, copy_gbs, static_cast<unsigned long long>(in_bytes),
                    static_cast<unsigned long long>(out_bytes), equal ? "true" : "false", cpu_ms, threads, pipe_json,
                    h2d_gbs);
      out += row;
      first_row = false;
      CK(cudaFree(ws));
    }
    for (void* p : dev) CK(cudaFree(p));
    CK(cudaFree(dout));
  }
  out += "\n  ],\n  \"all_equal_to_cpu\": " + std::string(all_equal ? "true" : "false") + "\n}\n";
  if (!json.empty()) {
    FILE* f = std::fopen(json.c_str(), "w");
    if (f) {
      std::fputs(out.c_str(), f);
      std::fclose(f);
    }
  }
  std::printf(all_equal ? "all results equal to the CPU's\n" : "SOME RESULTS DIFFER FROM THE CPU'S\n");
  return all_equal ? 0 : 1;
}
