// Internal to the CPU kernels: what a tensor's passes share (geometry, per-expert
// tables and cuts, per-worker scratch), so each pass can live in its own file.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "della/tensor_rules.h"
#include "merge_cpu.h"
#include "row_io.h"

namespace della::detail {

constexpr uint32_t kNoKey = 0xffffffffu;  // above every key (keys are < 2^31)
constexpr uint64_t kItemElements = 1u << 16;  // rows per work item: about this many elements

// Rows per work item of a tensor with rows of n. The final pass and the whole-tensor
// pre-passes cut a tensor into the same items, so that per-item counts of a pre-pass
// line up with the final pass's items.
inline uint64_t rows_per_item(uint64_t n) { return std::max<uint64_t>(1, kItemElements / std::max<uint64_t>(1, n)); }

// "Before the cut": ascending, key < T or (key == T and it is among the first `take`
// elements with key T in index order); descending, the same with key > T.
struct Cut {
  uint32_t key = kNoKey;
  uint64_t take = 0;
  bool descending = false;
  bool all = false;
};

// A magprune keep probability and its inverse rescale, side by side so that one load
// fetches both.
struct KeepScale {
  float q;
  float s;
};

struct ExpertState {
  bool sparse = false;  // false: the delta is left unchanged
  MagpruneCoef coef{};
  std::vector<KeepScale> table;  // magprune (q, 1/q) by rank; empty when not tabulated
  bool arith = false;            // the AVX-512 path computes the table's values from the rank
  float q_random = 0, s_random = 0;
  Cut cut_a, cut_b;
  // Per block of TaskState::occ_rows rows (and one past the last block): how many
  // elements with the cut's key come before the block, in index order. Blocks after
  // the one where a cut falls may hold any count above `take`.
  std::vector<uint64_t> occ_a, occ_b;
  float norm_scale = 1.0f;
};

struct TaskState {
  Geometry g;
  KeyMode mode = KeyMode::F32;
  uint64_t occ_rows = 1;  // rows per block of ExpertState::occ_a / occ_b
  std::vector<ExpertState> ex;
};

// At the first row of an occurrence block, sets run[0] and run[1] to the elements with
// cut a's and cut b's key before it; rows inside a block keep the running counts their
// predecessors left (work items start on block boundaries: rows_per_item).
inline void occ_block_start(const TaskState& st, const ExpertState& es, uint64_t r, uint64_t* run) {
  if (r % st.occ_rows != 0 || es.occ_a.empty()) return;
  run[0] = es.occ_a[r / st.occ_rows];
  run[1] = es.occ_b.empty() ? 0 : es.occ_b[r / st.occ_rows];
}

// Per-worker buffers, grown on demand and reused across rows and tensors.
struct Scratch {
  std::vector<float> base, delta, x, fac, vals;
  std::vector<uint32_t> keys, ranks, hist, words;
  std::vector<uint64_t> items, items_tmp;  // stable_ranks: key << 32 | index
  std::vector<uint8_t> keep, keep_b;
  // Row-local pass: half-precision keys and a histogram over all 2^15 keys, kept
  // zeroed between rows.
  std::vector<uint16_t> keys16;
  std::vector<uint32_t> hist15;
  std::vector<uint16_t> blocks;
  std::vector<KeepScale> ks;
  // Bracket pass: the keys inside a bracket, and eight interleaved tables per bracket.
  std::vector<uint16_t> bracket_list;
  std::vector<uint32_t> bracket_tables;
  std::vector<uint32_t> bracket_keys;  // fp32 brackets: every list of one cut, for its selection
};

// Base row r (of length n) as fp32 into dst; returns how many values are not finite.
// fetch_next: row r + 1 is prefetched meanwhile (with_next_row). Inlined, so that each
// SIMD build of a caller vectorizes it.
DELLA_ALWAYS_INLINE uint64_t load_base_row(const MergeTask& t, uint64_t r, uint64_t n, float* dst,
                                           bool fetch_next = false) {
  const uint64_t bs = dtype_size(t.base_dtype);
  const uint8_t* src = static_cast<const uint8_t*>(t.base) + r * n * bs;
  uint64_t bad = 0;
  with_next_row(fetch_next ? src + n * bs : nullptr, bs, n, [&](uint64_t j0, uint64_t j1) DELLA_INLINE_LAMBDA {
    bad += load_any(t.base_dtype, src + j0 * bs, j1 - j0, dst + j0);
  });
  return bad;
}

// Where output row r goes (a slab of a sink's output starts at row t.out_row0).
inline uint8_t* out_row(const MergeTask& t, uint64_t r, uint64_t n) {
  return static_cast<uint8_t*>(t.out) + (r - t.out_row0) * n * dtype_size(t.out_dtype);
}

// The bytes of expert k's row r (rows of n; the embedding sub-block rule applies).
DELLA_ALWAYS_INLINE const uint8_t* expert_row(const MergeTask& t, unsigned k, uint64_t r, uint64_t n) {
  const ExpertInput& e = t.experts[k];
  return static_cast<const uint8_t*>(e.data) + expert_row_offset(t.shape, e.shape, r, n) * dtype_size(e.dtype);
}

// Stable ascending ranks of keys[0..n) (any 32-bit keys).
void stable_ranks(const uint32_t* keys, uint64_t n, Scratch& s, uint32_t* ranks);

// Philox blocks g0 .. g0 + count - 1 of one stream, four words each, into out.
void philox_blocks(uint64_t g0, uint64_t count, uint32_t tensor_id, uint32_t expert, uint32_t k0, uint32_t k1,
                   uint32_t* out);

// The Philox blocks that cover flat elements [i0, i0 + n) of expert k's stream (SPEC
// §3), to be made into `words` (4 * blocks of room); element i0's word is then
// words[i0 & 3].
struct PhiloxRun {
  uint64_t g0, blocks;
  uint32_t c2, c3, k0, k1;  // tensor id, expert, seed low and high
  uint32_t* words;
};

inline PhiloxRun philox_run(uint64_t seed, uint32_t tensor_id, uint32_t expert, uint64_t i0, uint64_t n,
                            uint32_t* words) {
  const uint64_t g0 = i0 >> 2;
  return {g0, ((i0 + n - 1) >> 2) - g0 + 1, tensor_id, expert, static_cast<uint32_t>(seed),
          static_cast<uint32_t>(seed >> 32), words};
}

// The final pass of a delta merge (every method but linear and slerp) over rows
// [r0, r1), one fused sweep per row: merged values straight into the output. Adds
// non-finite and kept counts to `local`. Needs the task's pre-passes (cuts, norm
// scales) done.
void merge_rows_delta(const MergeTask& t, const TaskState& st, uint64_t r0, uint64_t r1, Scratch& s,
                      MergeStats& local);

// Whether the AVX-512 magprune path's arithmetic (q, 1/q) equals es.table at every
// rank of a row of n (checked once per tensor and expert).
bool magprune_arith_matches(const ExpertState& es, uint64_t n);

// Adds the key histograms of rows [r0, r1) to hists[k] for every sparse expert k:
// level 1 bins 15-bit keys (the high half of fp32 keys); level 2 bins the low half of
// the fp32 keys whose high half is hi_filter[k].
void histogram_rows(const MergeTask& t, const TaskState& st, uint64_t r0, uint64_t r1, Scratch& s, int level,
                    const std::vector<uint32_t>& hi_filter, std::vector<std::vector<uint64_t>>& hists);

// The whole-tensor cuts of a magnitude or breadcrumbs task, from a key bracket chosen
// on a sample and one pass over the tensor (bracket_cuts.cc): sets every sparse
// expert's cuts and occurrence blocks. Returns false, having set nothing, when a
// bracket would be too wide or too full, or missed its cut; the caller then takes the
// exact full-histogram path. positions_b is empty unless the task has second cuts.
bool bracketed_cuts(const MergeTask& t, TaskState& st, unsigned threads, std::vector<Scratch>& scratch,
                    const std::vector<uint64_t>& positions_a, const std::vector<uint64_t>& positions_b);

// A key bracket [lo, lo + w) of one cut and, per work item, what it counted: the keys
// below lo, and a histogram of the keys inside (w bins an item).
struct BracketCounts {
  uint32_t lo = 0, w = 0;  // w == 0: nothing to count
  std::vector<uint64_t> below;
  std::vector<uint32_t> hist;
};

// Counts work item `item` (rows [r0, r1)) into every active bracket; brackets[2k + c]
// belongs to expert k's cut c (0: a, 1: b).
void bracket_rows(const MergeTask& t, const TaskState& st, uint64_t item, uint64_t r0, uint64_t r1, Scratch& s,
                  std::vector<BracketCounts>& brackets);

// A key bracket [lo, hi] of one cut among fp32 keys and, per work item, the keys below
// lo and the keys inside, in index order. An item whose list would pass `cap` keys is
// marked in `overfull` and its list dropped: the bracket is then abandoned.
struct BracketList {
  uint32_t lo = 0, hi = 0;
  bool active = false;
  uint64_t cap = 0;
  std::vector<uint64_t> below;
  std::vector<std::vector<uint32_t>> inside;
  std::vector<uint8_t> overfull;
};

// The same pass for fp32 keys: lists instead of histograms, since a narrow share of a
// tensor still spans millions of distinct 31-bit keys.
void bracket_rows32(const MergeTask& t, const TaskState& st, uint64_t item, uint64_t r0, uint64_t r1, Scratch& s,
                    std::vector<BracketList>& brackets);

// The magnitude keys (15 bits for half-precision bases, 31 for fp32) of every sparse
// expert (others: empty) at `count` (<= numel) flat positions spread over the tensor:
// one in each stretch of step = numel / count elements, at an offset hashed from s.
std::vector<std::vector<uint32_t>> sample_keys(const MergeTask& t, const TaskState& st, uint64_t count);

// Per row r in [r0, r1) and expert k with active[k] set, how many keys equal the
// expert's cut keys: into a_counts[r * K + k] and b_counts[r * K + k].
void cut_key_counts(const MergeTask& t, const TaskState& st, uint64_t r0, uint64_t r1, Scratch& s,
                    const uint8_t* active, std::vector<uint64_t>& a_counts, std::vector<uint64_t>& b_counts);

}  // namespace della::detail
