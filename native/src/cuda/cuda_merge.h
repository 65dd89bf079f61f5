// The CUDA backend's C++ interface (no Node here): a Context that runs della::MergeTask
// batches on one GPU, bit for bit equal to della::run_batch, and a kernel-level entry
// for benchmarks. The plugin's C ABI (plugin.cu) wraps this; the parity tests and the
// benchmark link it directly.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../kernels/merge_cpu.h"
#include "della_cuda_api.h"

namespace della {
namespace cuda {

struct Options {
  int device = 0;
  // Device bytes for the streams' work areas. 0: min(16 GiB, 85% of the free memory).
  uint64_t memory_budget = 0;
  unsigned streams = 3;
  // Pinned host bytes per stream (inputs and output of one slab of rows); grows when one
  // row needs more.
  uint64_t pinned_bytes = 64ull << 20;
  // The pinned buffers as anonymous memory on transparent huge pages, pinned with
  // cudaHostRegister, instead of cudaMallocHost (which took 0.45-0.58 s a GiB on the
  // H100 machine, 4 KiB page by page); cudaMallocHost where that is refused. Opt-in
  // (DELLA_CUDA_PINNED=huge) until a GPU run times it.
  bool pinned_huge = false;
  // Each run()'s input tensors pinned in place (cudaHostRegister, read-only, page ranges
  // merged) and copied to the device straight from the caller's memory maps, instead of
  // through the pinned staging buffers: no host copy of the inputs, at the price of
  // registering them. Slabs staged in chunks, and experts larger than the base, keep
  // the staging copy; a refused registration falls back to it for the run. Opt-in
  // (DELLA_CUDA_INPUTS=register) until a GPU run times it.
  bool register_inputs = false;
  // Rows up to this length are ranked inside one thread block (at most kBlockSortMax,
  // in two tiers: 4096 and 16384 keys); longer rows go through a device-wide segmented
  // radix sort. 0 forces the latter.
  uint32_t block_sort_max = 16384;
  // Level-1 histograms of whole-tensor cuts (ties, breadcrumbs) counted in 128 KiB of
  // shared memory per block (where the device allows it), then added to the global one;
  // false: warp-aggregated atomics straight into the global histogram.
  bool shared_hist = true;
  // Tasks whose passes span slabs (ties, breadcrumbs, norm rescales) take slabs as large
  // as device memory allows, staged once in chunks through the pinned buffer, instead of
  // slabs the size of the pinned buffer staged once per pass.
  bool resident_passes = true;
  // Most blocks of a grid-stride kernel (tests lower it, so that threads take several
  // rounds on small inputs too).
  unsigned max_grid_blocks = 1u << 16;
  // Largest slab of rows in elements (tests lower it to exercise multi-slab tensors).
  uint64_t max_slab_elements = 1ull << 28;
  // Kernels specialised for slabs whose inputs and output share one 16-bit dtype (BF16 or
  // F16) and whose rows are a multiple of 4 (fuse) or 8 (ranking) long: vector loads,
  // 32-bit indices, the dtype a template parameter; and the ranking's layout choices.
  // Bits below, all on by default but kFusedRow. Same bytes either way; the parity tests
  // and the benchmark run the generic kernels and the alternatives beside the default.
  unsigned fast_paths = 127 | 256 | 512;
};

constexpr unsigned kFastFuse = 1;    // the fuse kernel (every method); with it:
constexpr unsigned kFuseFixed = 32;  //   K <= 4 and the consensus fixed at compile time, zero dividends not divided; with it:
constexpr unsigned kCutFused = 256;  //     ties' and breadcrumbs' keep decisions inside the fuse (occurrences by tiles)
constexpr unsigned kFastRank = 2;    // magprune's block ranking, keep and rescale; with it:
constexpr unsigned kRank256 = 4;     //   rows up to 4096 as 256 threads x 16 keys, not 512 x 8
constexpr unsigned kRankDirect = 8;  //   radix passes written out, the last one's ranks used directly; with it:
constexpr unsigned kRankLean = 64;   //     the rank ratio without a division, BF16 keys and the rescale without branches
constexpr unsigned kTier2Wide = 16;  //   rows up to 16384 as 512 threads x 32 keys, not 1024 x 16
constexpr unsigned kNormLoads = 512; // norm rescales' row sums (any dtype): loads batched ahead of the additions, a warp a block
// Not on by default (not yet timed on a GPU): della's final pass for rows up to 4096 in
// one kernel, each expert's sparsified row kept in shared memory for the fuse.
constexpr unsigned kFusedRow = 128;

constexpr uint32_t kBlockSortMax = 16384;

// An error of the CUDA backend: code is DELLA_CUDA_ERROR, _OUT_OF_MEMORY or _NO_DEVICE.
class Error : public std::runtime_error {
 public:
  Error(int code, const std::string& what) : std::runtime_error(what), code_(code) {}
  int code() const { return code_; }

 private:
  int code_;
};

// Describes a device without allocating on it; throws Error(DELLA_CUDA_NO_DEVICE) with
// the runtime's reason when there is no driver, no GPU or no such index.
DellaCudaDeviceInfo probe(int device);

class Context {
 public:
  explicit Context(const Options& options);
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  // Tasks hold host pointers (memory maps); results land in each task's `out`. Throws
  // std::invalid_argument for a task the kernels cannot run, Error for device trouble.
  void run(const std::vector<MergeTask>& tasks, std::vector<MergeStats>& stats, unsigned host_threads);
  const DellaCudaDeviceInfo& info() const;
  // False after an error that leaves the device unusable (the context must be dropped).
  bool healthy() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Kernel level, for benchmarks: one task whose base, experts and out are DEVICE pointers
// and whose experts have the base's shape, merged with every pass on `stream` inside a
// workspace of device_workspace_bytes(). No host copies; results equal run_batch's.
uint64_t device_workspace_bytes(const MergeTask& t, const Options& options);
void run_device_task(const MergeTask& t, void* workspace, uint64_t workspace_bytes, const Options& options,
                     cudaStream_t stream);

}  // namespace cuda
}  // namespace della
