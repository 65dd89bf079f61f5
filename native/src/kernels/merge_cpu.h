// CPU merge of whole tensors (SPEC §1-5). Plain pointers and structs: no Node here.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "della/merge_math.h"

namespace della {

// Where a merge's output goes when it is not one buffer: slabs of whole rows, merged
// one after another into room the sink gives and handed back in row order. A tensor
// then needs memory for a slab or two of its output, not for all of it.
class RowSink {
 public:
  virtual ~RowSink() = default;
  // The most rows one slab may hold. The kernels use a multiple of their work item's
  // rows (rows_per_item in merge_state.h) and refuse a sink smaller than one item.
  virtual uint64_t slab_rows() const = 0;
  // Room for output rows [row0, row0 + rows), at least rows * row bytes, left alone
  // by the sink until put() hands it back.
  virtual uint8_t* room(uint64_t row0, uint64_t rows) = 0;
  // Rows [row0, row0 + rows), merged into the room given for them.
  virtual void put(uint64_t row0, uint64_t rows, uint8_t* bytes) = 0;
  // After the last put(); returns once everything put has been dealt with.
  virtual void finish() = 0;
};

struct ExpertInput {
  const void* data = nullptr;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;  // equal to the base's, or larger in every dimension
  float weight = 1.0f;         // f32(w_k)
  double density = 1.0;
  double epsilon = 0.0;
  double gamma = 0.0;
};

// One output tensor. Normally a delta merge: out = B + fuse(sparsified deltas). With
// `linear` set there is no base: a plain weighted combination of the experts' values
// (the linear method, and the second pass of slerp): out = fuse(w_k * X_k).
struct MergeTask {
  bool linear = false;
  const void* base = nullptr;
  DType base_dtype = DType::F32;
  void* out = nullptr;
  DType out_dtype = DType::F32;
  std::vector<int64_t> shape;  // base and output shape
  std::vector<ExpertInput> experts;
  Sparsifier sparsifier = Sparsifier::None;
  Rescale rescale = Rescale::None;
  Consensus consensus = Consensus::None;
  bool normalize = false;
  double lambda = 1.0;
  uint32_t tensor_id = 0;
  uint64_t seed = 0;
  // Also hash the output (XXH64, seed 0) while its rows are still in cache: into
  // MergeStats::digest.
  bool digest = false;
  // When set, the output goes to the sink in slabs of rows, and `out` is not used.
  RowSink* sink = nullptr;
  // Output row r is at out + (r - out_row0) * row bytes: the first row of a slab.
  uint64_t out_row0 = 0;
};

struct CopyTask {
  const void* src = nullptr;
  void* dst = nullptr;
  uint64_t bytes = 0;
};

struct MergeStats {
  std::vector<uint64_t> nonfinite;  // [base, expert 0, ...]
  std::vector<uint64_t> kept;       // per expert: elements whose delta survived
  uint64_t out_nonfinite = 0;       // merged values stored as NaN or infinity (overflow)
  uint64_t numel = 0;
  bool has_digest = false;  // MergeTask::digest was set: digest is the output's XXH64
  uint64_t digest = 0;
};

// Sums over two tensors of the same shape for slerp, in binary64 with row partial
// sums in index order and rows summed in index order.
struct DotTask {
  const void* a = nullptr;
  DType a_dtype = DType::F32;
  const void* b = nullptr;
  DType b_dtype = DType::F32;
  std::vector<int64_t> shape;
};

struct DotStats {
  double dot = 0, aa = 0, bb = 0;
  uint64_t nonfinite_a = 0, nonfinite_b = 0;
};

// Throws std::invalid_argument for a task the kernels cannot run.
void validate_task(const MergeTask& t);

// Runs every task on up to `threads` threads of the global pool. Rows of large
// tensors are spread across threads; small tensors are batched. Results do not
// depend on `threads`.
void run_batch(const std::vector<MergeTask>& merges, const std::vector<CopyTask>& copies,
               unsigned threads, std::vector<MergeStats>& stats);

void run_dots(const std::vector<DotTask>& tasks, unsigned threads, std::vector<DotStats>& stats);

// The CPU code paths this machine selects at run time (the row functions' build and
// the hand-written AVX-512 and F16C paths), in words, for `della-merge doctor`.
std::vector<std::string> cpu_kernel_paths();

}  // namespace della
