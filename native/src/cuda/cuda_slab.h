// Internal to the CUDA backend: how one slab (a run of whole rows of one tensor, every
// input already on the device in the base's shape) is merged, pass by pass. The
// pipeline (cuda_context.cu) stages slabs; the kernels (cuda_kernels.cu) run them.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "../kernels/merge_cpu.h"
#include "cuda_merge.h"

// Kernel launches and dynamic shared memory, spelled so that the emulated device
// (native/test/cuda_emu, which runs the kernels on the CPU) compiles them as C++ too:
// DELLA_LAUNCH(grid, block, shared bytes, stream, kernel)(arguments).
#ifdef DELLA_CUDA_EMU
#define DELLA_LAUNCH(grid, block, smem, stream, ...) ::della_emu::launcher(__VA_ARGS__, grid, block, smem, stream)
#define DELLA_DYNAMIC_SHARED(name) unsigned char* const name = ::della_emu::dynamic_smem()
#else
#define DELLA_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define DELLA_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace della {
namespace cuda {
namespace detail {

constexpr int kMaxExperts = 64;
constexpr uint32_t kNoKey = 0xffffffffu;  // above every key (keys are < 2^31)

// How the final pass gets expert k's sparsified delta.
enum ExpertMode : uint8_t {
  kDirect = 0,       // not sparsified: the delta (or, for linear tasks, the value) itself
  kRandomFused = 1,  // DARE mask with the inverse or no rescale, computed inside the fuse kernel
  kScratch = 2,      // written to a float scratch buffer by a sparsify kernel first
  kCutFused = 3,     // whole-tensor cut (ties, breadcrumbs) without rescale, decided inside the fuse kernel
};

struct DevExpert {
  const void* data = nullptr;  // slab-local, base-shaped
  float* scratch = nullptr;    // kScratch: slab-local sparsified delta
  float weight = 1.0f;
  MagpruneCoef coef{0.0f, 0.0f};
  float q_random = 0.0f, s_random = 0.0f;
  DType dtype = DType::F32;
  uint8_t mode = kDirect;
  uint8_t sparse = 0;
};

struct DevCut {
  unsigned long long take;
  uint32_t key;
  uint32_t descending;
  uint32_t all;
  uint32_t pad;
};

// Device state of a task that lives across its slabs.
struct StatePtrs {
  unsigned long long* hist1 = nullptr;  // [K][32768]
  unsigned long long* hist2 = nullptr;  // [K][2][65536] (F32 keys only)
  DevCut* cuts = nullptr;               // [K][2]: a, b
  uint32_t* hi = nullptr;               // [K][2]
  unsigned long long* remaining = nullptr;  // [K][2]
  unsigned long long* carry = nullptr;      // [K][2]: cut-key occurrences in earlier slabs
  double* norm_full = nullptr;              // [rows][K]
  double* norm_kept = nullptr;              // [rows][K]
  float* norm_scale = nullptr;              // [K]
};

// Everything a kernel needs, passed by value (< 4 KiB).
struct SlabParams {
  const void* base = nullptr;  // slab-local; null when linear
  void* out = nullptr;         // slab-local
  // [0]: base non-finite, [1+k]: expert k's, [1+K+k]: kept, [1+2K]: non-finite outputs
  unsigned long long* stats = nullptr;
  uint8_t* keep = nullptr;     // norm pass: one expert's keep flags, slab-local
  uint64_t n = 1;              // row length
  uint64_t rows = 0;           // rows in this slab
  uint64_t row0 = 0;           // the slab's first row in the tensor
  uint64_t seed = 0;
  uint32_t tensor_id = 0;
  uint32_t k = 0;              // experts
  float lambda = 1.0f;
  DType base_dtype = DType::F32;
  DType out_dtype = DType::F32;
  KeyMode mode = KeyMode::F32;
  Sparsifier sparsifier = Sparsifier::None;
  Rescale rescale = Rescale::None;
  Consensus consensus = Consensus::None;
  uint8_t linear = 0;
  uint8_t normalize = 0;
  uint8_t apply_lambda = 0;
  StatePtrs state;
  DevExpert ex[kMaxExperts];
};

enum Pass : unsigned {
  kPassHist1 = 1,    // level-1 key histograms (whole-tensor sparsifiers)
  kSelect1 = 2,      // after the last slab's kPassHist1: cut bins
  kPassHist2 = 4,    // level-2 histograms (F32 keys)
  kSelect2 = 8,
  kPassNorm = 16,    // row partial sums of the norm rescales
  kNormFinish = 32,  // after the last slab's kPassNorm: the scales
  kPassFinal = 64,   // sparsify, fuse, store, count
  kInitState = 128,        // before anything: clear histograms and carries
  kResetCarryNorm = 256,   // first slab of kPassNorm: cut-key occurrences start at 0
  kResetCarryFinal = 512,  // first slab of kPassFinal: likewise
};

// Per-task facts that do not depend on the slab.
struct TaskInfo {
  uint64_t numel = 0, n = 1, rows = 0;
  KeyMode mode = KeyMode::F32;
  unsigned k = 0;
  Sparsifier sparsifier = Sparsifier::None;
  bool need_cuts = false;  // magnitude / breadcrumbs with a sparse expert
  bool need_norm = false;  // l1 / l2 / linf with a sparse expert
  bool f32_keys = false;
  bool block_sort = false;  // magprune rows ranked inside one block...
  int block_tier = 0;       // ...of 4096 (1) or 16384 (2) keys; 0: the segmented sort
  bool shared_hist = false; // level-1 histograms in shared memory (Options::shared_hist)
  // The 16-bit kernels (Options::fast_paths) where the dtypes and row length allow; the
  // slab's pointers are checked for alignment when it is enqueued.
  DType half = DType::F32;  // the one 16-bit dtype of every input and the output, else F32
  bool fast_fuse = false;
  bool fuse_fixed = false;  // & kFuseFixed, for K <= 4, the sum or no consensus, not linear
  bool fast_rank = false;
  bool rank256 = false;     // Options::fast_paths & kRank256
  bool rank_direct = false; // & kRankDirect
  bool rank_lean = false;   // & kRankLean (with kRankDirect)
  bool fused_row = false;   // & kFusedRow: della_row_kernel does the final pass
  bool cut_fused = false;   // & kCutFused: the sparse experts are kCutFused (cut_fuse_kernel)
  bool cut_tiles = false;   // & kCutFused, other 16-bit cuts: their sparsify kernel by tiles (cut_apply_kernel)
  bool tier2_wide = false;  // & kTier2Wide, where the device has the shared memory
  bool norm_loads = false;  // & kNormLoads: norm_rows_kernel<true>
  bool any_scratch = false;
  unsigned max_grid = 1u << 16;  // Options::max_grid_blocks
  std::vector<uint8_t> sparse, mode_k;
  std::vector<uint64_t> pos_a, pos_b;  // cut positions (elements before the cut)
};

TaskInfo task_info(const MergeTask& t, const Options& o);

// Device bytes of the state that persists across a task's slabs.
uint64_t state_bytes(const TaskInfo& ti);
// Lays the state out at `p` (aligned); returns the pointers.
StatePtrs state_layout(const TaskInfo& ti, char* p);

// Device bytes of one slab of `rows` rows beside its inputs and output: scratch buffers,
// keep flags and the work area of the sorts and scans (which depends on the device).
uint64_t slab_work_bytes(const TaskInfo& ti, uint64_t rows);
// Scratch (float per element per kScratch expert) and keep bytes of a slab.
uint64_t slab_scratch_bytes(const TaskInfo& ti, uint64_t rows);

// Fills the parts of SlabParams that come from the task (not the pointers).
void fill_params(const MergeTask& t, const TaskInfo& ti, SlabParams& p);

// Enqueues `passes` of one slab on `stream`. `scratch` holds slab_scratch_bytes(),
// `work` slab_work_bytes() - slab_scratch_bytes() bytes. p.stats must be zeroed by the caller.
void enqueue_slab(const MergeTask& t, const TaskInfo& ti, SlabParams& p, unsigned passes, char* scratch, char* work,
                  uint64_t work_bytes, cudaStream_t stream);

// Words of a slab's statistics (SlabParams::stats) for K experts.
inline uint64_t stats_words(unsigned K) { return 2ull * K + 2; }

// Enqueues the overflow check of a slab's final pass: its stored outputs that are NaN or
// infinite (stored_nonfinite) counted into p.stats[1 + 2K]. One read of the output,
// after the fuse kernels, whichever of them stored it.
void enqueue_out_check(const TaskInfo& ti, const SlabParams& p, cudaStream_t stream);

// Throws della::cuda::Error for a failed CUDA call, naming it.
void check(cudaError_t e, const char* what);

inline uint64_t align_up(uint64_t x, uint64_t a = 256) { return (x + a - 1) / a * a; }

}  // namespace detail
}  // namespace cuda
}  // namespace della
