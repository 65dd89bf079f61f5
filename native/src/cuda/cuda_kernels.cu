// The CUDA kernels of SPEC §2-5 over one slab of rows already on the device. Every fp32
// operation is the CPU kernels' (native/src/kernels/merge_cpu.cc), in the same order;
// the build uses -fmad=false --prec-div=true --prec-sqrt=true and no fast math, so the
// results are the same bits. Integer statistics are summed with atomics (order-free);
// binary64 norm sums run sequentially per row, then over rows, as on the CPU.
#include <cub/block/block_exchange.cuh>
#include <cub/block/block_radix_rank.cuh>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>

#include "cuda_merge.h"
#include "cuda_slab.h"
#include "della/philox.h"
#include "della/tensor_rules.h"

namespace della {
namespace cuda {
namespace detail {

void check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  (void)cudaGetLastError();  // clear a non-sticky error
  int code = DELLA_CUDA_ERROR;
  if (e == cudaErrorMemoryAllocation) code = DELLA_CUDA_OUT_OF_MEMORY;
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorInvalidDevice ||
      e == cudaErrorDevicesUnavailable || e == cudaErrorCompatNotSupportedOnDevice)
    code = DELLA_CUDA_NO_DEVICE;
  throw Error(code, std::string(what) + ": " + cudaGetErrorString(e) + " (" + cudaGetErrorName(e) + ")");
}

namespace {

constexpr int kThreads = 256;          // elementwise kernels
constexpr int kSelectThreads = 1024;
static_assert(sizeof(SlabParams) <= 4096, "kernel parameters must fit 4 KiB");

// ---------------------------------------------------------------- element helpers

// Slab buffers on the device are 256-byte aligned and hold whole elements, so plain
// typed loads replace the CPU's memcpy.
__device__ __forceinline__ float dload(const void* p, DType t, uint64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<float>(static_cast<const double*>(p)[i]);  // RNE
  }
}

__device__ __forceinline__ void dstore(void* p, DType t, uint64_t i, float v) {
  switch (t) {
    // NaN as the canonical quiet NaN (dtype.h): CUDA's own NaNs differ from x86's.
    case DType::F32: static_cast<uint32_t*>(p)[i] = f32_out_bits(v); break;
    case DType::F16: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
    case DType::BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    default: static_cast<uint64_t*>(p)[i] = f64_out_bits(v); break;
  }
}

// v where keep, else +0 (the CPU's keep_or_zero).
__device__ __forceinline__ float keep_or_zero(bool keep, float v) {
  return __uint_as_float(__float_as_uint(v) & (0u - static_cast<uint32_t>(keep)));
}

__device__ __forceinline__ Philox4 philox_block(uint64_t g, uint32_t tensor_id, uint32_t expert, uint64_t seed) {
  return philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), tensor_id, expert,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Adds each lane's count to *dst: one atomic per warp. Every lane of the warp must call it.
template <class T>
__device__ __forceinline__ void count_add(T* dst, uint32_t v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0 && v != 0) atomicAdd(dst, static_cast<T>(v));
}

// One increment of h[bin] per lane (bin == kNoKey: none), aggregated over equal bins.
template <class CountT>
__device__ __forceinline__ void hist_add(CountT* h, uint32_t bin) {
  const unsigned active = __activemask();
  const unsigned peers = __match_any_sync(active, bin);
  const int lane = threadIdx.x & 31;
  if (bin != kNoKey && lane == __ffs(peers) - 1) atomicAdd(h + bin, static_cast<CountT>(__popc(peers)));
}

__device__ __forceinline__ bool before(const DevCut& c, uint32_t key, uint64_t occ) {
  if (c.all) return true;
  if (c.descending) return key > c.key || (key == c.key && occ < c.take);
  return key < c.key || (key == c.key && occ < c.take);
}

// Slab-local element e of expert k: its loaded value and its delta from the base.
__device__ __forceinline__ float expert_delta(const SlabParams& p, const DevExpert& ex, uint64_t e, float& value) {
  value = dload(ex.data, ex.dtype, e);
  return value - dload(p.base, p.base_dtype, e);
}

// Expert k's sparsified delta for a decided element: the survivor rescaled by fac (the
// inverse rescale) or by the norm scale, else +0.
__device__ __forceinline__ float sparsified(const SlabParams& p, unsigned k, bool keep, float d, float fac) {
  if (p.rescale == Rescale::Inverse) return keep_or_zero(keep, d * fac);
  if (p.rescale == Rescale::L1 || p.rescale == Rescale::L2 || p.rescale == Rescale::Linf)
    return keep_or_zero(keep, d * p.state.norm_scale[k]);
  return keep_or_zero(keep, d);
}

// What a sparsify kernel writes for a decided element: in the norm pass the keep flag,
// in the final pass the rescaled survivor (or +0).
__device__ __forceinline__ void emit(const SlabParams& p, unsigned k, uint64_t e, bool keep, float d, float fac,
                                     bool final_pass) {
  if (!final_pass) {
    p.keep[e] = keep;
    return;
  }
  p.ex[k].scratch[e] = sparsified(p, k, keep, d, fac);
}

struct GroupRange {
  uint64_t begin, end;  // flat element indices of the slab
  uint64_t g0, g1;      // Philox blocks covering them (inclusive)
};

__device__ __forceinline__ GroupRange slab_groups(const SlabParams& p) {
  GroupRange r;
  r.begin = p.row0 * p.n;
  r.end = r.begin + p.rows * p.n;
  r.g0 = r.begin >> 2;
  r.g1 = (r.end - 1) >> 2;
  return r;
}

// ---------------------------------------------------------------- magprune: block ranking

// Row r of the slab once its ranks (by index in the row) are in shared memory: keep,
// rescale and emit per Philox block, THREADS threads of the block.
template <int THREADS, class RankT>
__device__ __forceinline__ void keep_row(const SlabParams& p, unsigned k, uint64_t r, const RankT* ranks,
                                         int final_pass) {
  const DevExpert& ex = p.ex[k];
  const uint32_t n = static_cast<uint32_t>(p.n);
  const uint64_t off = r * p.n;
  const uint64_t i0 = (p.row0 + r) * p.n;
  const uint64_t g0 = i0 >> 2, g1 = (i0 + n - 1) >> 2;
  uint32_t bad = 0, kept = 0;
  for (uint64_t g = g0 + threadIdx.x; g <= g1; g += THREADS) {
    const Philox4 w = philox_block(g, p.tensor_id, k, p.seed);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint64_t i = 4 * g + q;
      if (i < i0 || i >= i0 + n) continue;
      const uint32_t j = static_cast<uint32_t>(i - i0);
      float value;
      const float d = expert_delta(p, ex, off + j, value);
      const float x = uniform_from_word(w.v[q]);
      const float qk = magprune_q(ranks[j], n, ex.coef);
      const bool keep = x < qk;
      emit(p, k, off + j, keep, d, inverse_scale(qk), final_pass);
      bad += !is_finite_f32(value);
      kept += keep;
    }
  }
  if (final_pass) {
    count_add(&p.stats[1 + k], bad);
    count_add(&p.stats[1 + p.k + k], kept);
  }
}

// Block ranking tiers: rows up to 4096 elements (512 threads x 8 keys) and up to 16384
// (1024 x 16, in more than 48 KiB of dynamic shared memory where the device allows it).
// One block per row (n <= capacity): stable ascending ranks of the row's keys by a block
// radix sort of the keys alone, the index riding along as a 16-bit value. cub's radix
// sort is stable (LSD passes of stable ranking in the blocked arrangement), so with
// thread t holding indices [t * ITEMS, t * ITEMS + ITEMS) equal keys keep their index
// order, and only the key's 15 (or 31) bits are sorted: three passes of 5-bit digits for
// half keys. (Sorting unique (key << index bits | index) keys took seven passes of 4 bits
// and 1.41 ms against 1.03 for della K = 3 on 4096 x 4096 BF16, H100.) Padding (indices
// >= n) holds the largest key and the largest indices, so it sorts last. Then keep,
// rescale and emit per Philox block.
template <class KeyT, int THREADS, int ITEMS>
struct BlockRankPairs {
  static constexpr int kCapacity = THREADS * ITEMS;
  using Sort = cub::BlockRadixSort<KeyT, THREADS, ITEMS, uint16_t, 5>;
  static constexpr size_t kSmem =
      sizeof(typename Sort::TempStorage) > kCapacity * 2 ? sizeof(typename Sort::TempStorage) : kCapacity * 2;
};

template <class KeyT, int THREADS, int ITEMS>
__global__ void __launch_bounds__(THREADS) magprune_pairs_kernel(const __grid_constant__ SlabParams p, unsigned k,
                                                                 int final_pass) {
  using R = BlockRankPairs<KeyT, THREADS, ITEMS>;
  static_assert(R::kCapacity <= 65536, "indices fit 16 bits");
  DELLA_DYNAMIC_SHARED(smem);
  // The sort's storage, then (after it) the ranks by index, in the same bytes.
  typename R::Sort::TempStorage& temp = *reinterpret_cast<typename R::Sort::TempStorage*>(smem);
  uint16_t* ranks = reinterpret_cast<uint16_t*>(smem);
  const uint64_t r = blockIdx.x;
  const uint32_t n = static_cast<uint32_t>(p.n);
  const uint64_t off = r * p.n;
  const int key_bits = p.mode == KeyMode::F32 ? 31 : 15;
  KeyT keys[ITEMS];
  uint16_t idx[ITEMS];
#pragma unroll
  for (int s = 0; s < ITEMS; ++s) {  // blocked: the index order is the thread-major order
    const uint32_t j = threadIdx.x * ITEMS + s;
    idx[s] = static_cast<uint16_t>(j);
    keys[s] = static_cast<KeyT>(~static_cast<KeyT>(0));
    if (j < n) {
      float value;
      keys[s] = static_cast<KeyT>(magnitude_key(expert_delta(p, p.ex[k], off + j, value), p.mode));
    }
  }
  typename R::Sort(temp).Sort(keys, idx, 0, key_bits);
  __syncthreads();
#pragma unroll
  for (int s = 0; s < ITEMS; ++s) {
    const uint32_t pos = threadIdx.x * ITEMS + s;  // blocked arrangement after Sort
    if (pos < n) ranks[idx[s]] = static_cast<uint16_t>(pos);
  }
  __syncthreads();
  keep_row<THREADS>(p, k, r, ranks, final_pass);
}

using Tier1HalfPairs = BlockRankPairs<uint16_t, 512, 8>;
using Tier2HalfPairs = BlockRankPairs<uint16_t, 1024, 16>;
using Tier2F32Pairs = BlockRankPairs<uint32_t, 1024, 16>;
static_assert(Tier1HalfPairs::kCapacity == 4096 && Tier2HalfPairs::kCapacity == static_cast<int>(kBlockSortMax),
              "tiers");

// Launches the ranking kernel of a tier, raising its dynamic shared memory limit (an
// attribute of the current device's context, so set before every launch; it is cheap).
template <class KeyT, int THREADS, int ITEMS>
void launch_rank(const SlabParams& p, unsigned k, int final_pass, cudaStream_t s) {
  using R = BlockRankPairs<KeyT, THREADS, ITEMS>;
  auto kernel = magprune_pairs_kernel<KeyT, THREADS, ITEMS>;
  if (R::kSmem > 48 * 1024)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(R::kSmem)),
          "cudaFuncSetAttribute (ranking shared memory)");
  DELLA_LAUNCH(static_cast<unsigned>(p.rows), THREADS, R::kSmem, s, kernel)(p, k, final_pass);
}

// ---------------------------------------------------------------- 16-bit fast paths

// Slabs whose inputs and output share one 16-bit dtype D (BF16 or F16, nearly every
// merge) take these kernels where the rows are whole Philox blocks (TaskInfo::fast_*):
// a Philox block's four elements come as one 8-byte load (a ranking thread's eight as
// 16 bytes), indices are 32-bit within a row or slab, and D is a template parameter
// instead of a switch per element. The arithmetic is the generic kernels', in the same
// order, so the bytes are the same.
template <DType D>
__device__ __forceinline__ float half_to_f32(uint32_t h) {
  if constexpr (D == DType::BF16) return bf16_to_f32(static_cast<uint16_t>(h));
  else return f16_to_f32(static_cast<uint16_t>(h));
}

template <DType D>
__device__ __forceinline__ uint32_t f32_to_half(float v) {
  if constexpr (D == DType::BF16) return f32_to_bf16(v);
  else return f32_to_f16(v);
}

// Four elements from 8 bytes, the lower half of each word first (little-endian).
template <DType D>
__device__ __forceinline__ void unpack4(uint2 raw, float (&v)[4]) {
  v[0] = half_to_f32<D>(raw.x & 0xffffu);
  v[1] = half_to_f32<D>(raw.x >> 16);
  v[2] = half_to_f32<D>(raw.y & 0xffffu);
  v[3] = half_to_f32<D>(raw.y >> 16);
}

// The base's four values of the slab's Philox block t of D, its non-finite ones counted.
template <DType D>
__device__ __forceinline__ void base_quad(const SlabParams& p, uint32_t t, float (&b)[4], uint32_t& bad_base) {
  unpack4<D>(static_cast<const uint2*>(p.base)[t], b);
#pragma unroll
  for (int q = 0; q < 4; ++q) bad_base += !is_finite_f32(b[q]);
}

// keep_row for a row of D with n % 4 == 0: thread t takes the row's Philox blocks t,
// t + THREADS, ...; ranks[j] as in keep_row.
// LEAN (Options::fast_paths & kRankLean): the rank ratio r / (n - 1) by small_ratio from
// one reciprocal per row (the division re-derived the reciprocal and tested its range
// per element), and the rescale's kind and norm scale read once per row instead of being
// tested and loaded per element. Same values: kernel_tests checks small_ratio against
// the division for every row length this kernel takes.
// dst: where the final pass writes the row's sparsified values (the expert's scratch row
// in device memory, or shared memory in della_row_kernel).
template <DType D, int THREADS, bool LEAN>
__device__ __forceinline__ void keep_row_half(const SlabParams& p, unsigned k, uint32_t r, const uint16_t* ranks,
                                              int final_pass, float* dst) {
  const DevExpert& ex = p.ex[k];
  const uint32_t n = static_cast<uint32_t>(p.n);
  const uint64_t off = static_cast<uint64_t>(r) * n;
  const uint64_t g0 = ((p.row0 + r) * p.n) >> 2;  // the row starts a Philox block
  const uint2* xe = reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(ex.data) + off);
  const uint2* xb = reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(p.base) + off);
  const uint2* rk = reinterpret_cast<const uint2*>(ranks);
  const float fm = static_cast<float>(n - 1), inv = 1.0f / fm;  // LEAN; n >= 8 here
  const bool inverse = p.rescale == Rescale::Inverse;
  const bool by_norm = final_pass && (p.rescale == Rescale::L1 || p.rescale == Rescale::L2 || p.rescale == Rescale::Linf);
  const float norm_scale = LEAN && by_norm ? p.state.norm_scale[k] : 1.0f;
  uint32_t bad = 0, kept = 0;
  for (uint32_t gi = threadIdx.x; gi < n / 4; gi += THREADS) {
    const Philox4 w = philox_block(g0 + gi, p.tensor_id, k, p.seed);
    float value[4], base[4];
    unpack4<D>(xe[gi], value);
    unpack4<D>(xb[gi], base);
    const uint2 rr = rk[gi];
    const uint32_t rank[4] = {rr.x & 0xffffu, rr.x >> 16, rr.y & 0xffffu, rr.y >> 16};
    float v[4];
    uint32_t flags = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float d = value[q] - base[q];
      const float qk = LEAN ? magprune_q_small(rank[q], n, fm, inv, ex.coef) : magprune_q_of<uint32_t>(rank[q], n, ex.coef);
      const bool keep = uniform_from_word(w.v[q]) < qk;
      if constexpr (LEAN)
        v[q] = keep_or_zero(keep, inverse ? d * inverse_scale(qk) : (by_norm ? d * norm_scale : d));
      else
        v[q] = sparsified(p, k, keep, d, inverse_scale(qk));
      flags |= static_cast<uint32_t>(keep) << (8 * q);
      bad += !is_finite_f32(value[q]);
      kept += keep;
    }
    if (final_pass) reinterpret_cast<float4*>(dst)[gi] = make_float4(v[0], v[1], v[2], v[3]);
    else reinterpret_cast<uint32_t*>(p.keep + off)[gi] = flags;
  }
  if (final_pass) {
    count_add(&p.stats[1 + k], bad);
    count_add(&p.stats[1 + p.k + k], kept);
  }
}

// magprune_pairs_kernel for a row of D with n % 8 == 0: the key and the index packed in
// one 32-bit word (key << 16 | index), of which the sort orders the key's 15 bits only.
// One exchange per radix pass instead of two (keys and values), and half the registers.
// The sort is stable and the words start in index order, so the ranks are the same;
// padding (key 0xffff, indices >= n) sorts after every key of the row.
// DIRECT: the passes are written out (cub's BlockRadixRank and BlockExchange, as cub's
// BlockRadixSort does them) so that the last pass's rank of each word, which is its
// stable position, goes straight to ranks[index], without the last exchange.
template <int THREADS, int ITEMS>
struct BlockRankPacked {
  static constexpr int kCapacity = THREADS * ITEMS;
  using Sort = cub::BlockRadixSort<uint32_t, THREADS, ITEMS, cub::NullType, 5>;
  using Rank = cub::BlockRadixRank<THREADS, 5, false>;
  using Exchange = cub::BlockExchange<uint32_t, THREADS, ITEMS>;
  union Passes {
    typename Rank::TempStorage rank;
    typename Exchange::TempStorage exchange;
  };
  static constexpr size_t kTemp =
      sizeof(typename Sort::TempStorage) > sizeof(Passes) ? sizeof(typename Sort::TempStorage) : sizeof(Passes);
  static constexpr size_t kSmem = kTemp > kCapacity * 2 ? kTemp : kCapacity * 2;
};

// Registers: the 4096 tier as 512 x 8 fits 64 (two blocks per multiprocessor; F16's key
// had taken 71), as 256 x 16 takes 80 (three blocks); 1024 x 16 spills at 64, 512 x 32
// has up to 128 (one block).
template <int THREADS, int ITEMS>
constexpr int rank_min_blocks() {
  return THREADS == 256 ? 3 : (THREADS == 512 && ITEMS == 32 ? 1 : 1024 / THREADS);
}

// The key of a BF16 row's delta without branches (LEAN): magnitude_key's RNE to BF16 of
// |d|, a NaN's the canonical 0x7fc0; the compiler had made magnitude_key's NaN test a
// branch around every key.
__device__ __forceinline__ uint32_t bf16_key_lean(float d) {
  const uint32_t ax = __float_as_uint(d) & 0x7fffffffu;
  const uint32_t rounded = (ax + 0x7fffu + ((ax >> 16) & 1u)) >> 16;
  return ax > 0x7f800000u ? 0x7fc0u : rounded;
}

// The stable ranks of expert k's keys in row r of the slab, by index, into `ranks` (in
// the first R::kSmem bytes of shared memory at `smem`, which the sort uses first). Every
// thread of the block calls it; the ranks are ready when it returns.
template <DType D, int THREADS, int ITEMS, bool DIRECT, bool LEAN>
__device__ __forceinline__ void rank_row_half(const SlabParams& p, unsigned k, uint32_t r, unsigned char* smem) {
  using R = BlockRankPacked<THREADS, ITEMS>;
  static_assert(R::kCapacity <= 65536 && ITEMS % 8 == 0, "indices fit 16 bits; 16-byte loads");
  uint16_t* ranks = reinterpret_cast<uint16_t*>(smem);  // after the sort, in the same bytes
  constexpr KeyMode mode = D == DType::BF16 ? KeyMode::BF16 : KeyMode::F16;
  const uint32_t n = static_cast<uint32_t>(p.n);
  const uint64_t off = static_cast<uint64_t>(r) * n;
  const uint4* xe = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p.ex[k].data) + off);
  const uint4* xb = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p.base) + off);
  uint32_t words[ITEMS];
#pragma unroll
  for (int c = 0; c < ITEMS / 8; ++c) {
    const uint32_t j = threadIdx.x * ITEMS + 8 * c;  // blocked: index order is thread-major
    const bool in = j < n;                          // n % 8 == 0: all eight or none
    const uint4 re = in ? xe[j / 8] : make_uint4(0, 0, 0, 0);
    const uint4 rb = in ? xb[j / 8] : make_uint4(0, 0, 0, 0);
    const uint32_t we[4] = {re.x, re.y, re.z, re.w}, wb[4] = {rb.x, rb.y, rb.z, rb.w};
#pragma unroll
    for (int h = 0; h < 8; ++h) {
      const float d = half_to_f32<D>((we[h / 2] >> (16 * (h & 1))) & 0xffffu) -
                      half_to_f32<D>((wb[h / 2] >> (16 * (h & 1))) & 0xffffu);
      uint32_t key;
      if constexpr (LEAN && D == DType::BF16) key = bf16_key_lean(d) | (in ? 0u : 0xffffu);  // padding: 0 | 0xffff
      else key = in ? magnitude_key(d, mode) : 0xffffu;
      words[8 * c + h] = key << 16 | (j + h);
    }
  }
  if constexpr (DIRECT) {
    typename R::Passes& temp = *reinterpret_cast<typename R::Passes*>(smem);
    for (int bit = 16;; bit += 5) {  // bits 16..30: three passes of 5
      int pos[ITEMS];
      typename R::Rank(temp.rank).RankKeys(words, pos, cub::BFEDigitExtractor<uint32_t>(bit, 5));
      __syncthreads();
      if (bit + 5 >= 31) {
#pragma unroll
        for (int s = 0; s < ITEMS; ++s)
          if (pos[s] < static_cast<int>(n)) ranks[words[s] & 0xffffu] = static_cast<uint16_t>(pos[s]);
        break;
      }
      typename R::Exchange(temp.exchange).ScatterToBlocked(words, pos);
      __syncthreads();
    }
  } else {
    typename R::Sort::TempStorage& temp = *reinterpret_cast<typename R::Sort::TempStorage*>(smem);
    typename R::Sort(temp).Sort(words, 16, 31);
    __syncthreads();
#pragma unroll
    for (int s = 0; s < ITEMS; ++s) {
      const uint32_t pos = threadIdx.x * ITEMS + s;  // blocked arrangement after Sort
      if (pos < n) ranks[words[s] & 0xffffu] = static_cast<uint16_t>(pos);
    }
  }
  __syncthreads();
}

template <DType D, int THREADS, int ITEMS, bool DIRECT, bool LEAN>
__global__ void __launch_bounds__(THREADS, rank_min_blocks<THREADS, ITEMS>())
    magprune_half_kernel(const __grid_constant__ SlabParams p, unsigned k, int final_pass) {
  DELLA_DYNAMIC_SHARED(smem);
  rank_row_half<D, THREADS, ITEMS, DIRECT, LEAN>(p, k, blockIdx.x, smem);
  keep_row_half<D, THREADS, LEAN>(p, k, blockIdx.x, reinterpret_cast<const uint16_t*>(smem), final_pass,
                                  p.ex[k].scratch + static_cast<uint64_t>(blockIdx.x) * p.n);
}

using Tier2Packed = BlockRankPacked<1024, 16>;
using Tier2Wide = BlockRankPacked<512, 32>;

template <DType D, int THREADS, int ITEMS, bool DIRECT, bool LEAN>
void launch_rank_half(const SlabParams& p, unsigned k, int final_pass, cudaStream_t s) {
  using R = BlockRankPacked<THREADS, ITEMS>;
  auto kernel = magprune_half_kernel<D, THREADS, ITEMS, DIRECT, LEAN>;
  if (R::kSmem > 48 * 1024)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(R::kSmem)),
          "cudaFuncSetAttribute (ranking shared memory)");
  DELLA_LAUNCH(static_cast<unsigned>(p.rows), THREADS, R::kSmem, s, kernel)(p, k, final_pass);
}

// The 16-bit ranking kernel of a row's tier and the chosen layout (Options::fast_paths).
template <DType D, bool DIRECT, bool LEAN>
void launch_rank_half_tier(const TaskInfo& ti, const SlabParams& p, unsigned k, int final_pass, cudaStream_t s) {
  if (ti.block_tier == 1 && ti.rank256) launch_rank_half<D, 256, 16, DIRECT, LEAN>(p, k, final_pass, s);
  else if (ti.block_tier == 1) launch_rank_half<D, 512, 8, DIRECT, LEAN>(p, k, final_pass, s);
  else if (ti.tier2_wide) launch_rank_half<D, 512, 32, DIRECT, LEAN>(p, k, final_pass, s);
  else launch_rank_half<D, 1024, 16, DIRECT, LEAN>(p, k, final_pass, s);
}

// ---------------------------------------------------------------- magprune: long rows

// (key << 32 | index in row) per element, for the segmented sort.
__global__ void composite_keys_kernel(const __grid_constant__ SlabParams p, unsigned k, uint64_t* comp) {
  const uint64_t E = p.rows * p.n;
  for (uint64_t e = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; e < E;
       e += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const uint64_t j = e % p.n;
    float value;
    const float d = expert_delta(p, p.ex[k], e, value);
    comp[e] = (static_cast<uint64_t>(magnitude_key(d, p.mode)) << 32) | j;
  }
}

__global__ void segment_offsets_kernel(int* offsets, uint64_t rows, uint64_t n) {
  for (uint64_t r = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; r <= rows;
       r += static_cast<uint64_t>(gridDim.x) * blockDim.x)
    offsets[r] = static_cast<int>(r * n);
}

// Sorted position within the row = the stable ascending rank of the element it names.
__global__ void ranks_from_sorted_kernel(const uint64_t* sorted, uint32_t* ranks, uint64_t E, uint64_t n) {
  for (uint64_t e = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; e < E;
       e += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const uint64_t row_start = e - e % n;
    ranks[row_start + static_cast<uint32_t>(sorted[e])] = static_cast<uint32_t>(e - row_start);
  }
}

// ---------------------------------------------------------------- elementwise sparsify

enum ApplyMode : int { kApplyRank = 0, kApplyRandom = 1, kApplyCut = 2 };

// Decides and emits every element of expert k in the slab, one Philox block per thread.
__global__ void apply_kernel(const __grid_constant__ SlabParams p, unsigned k, int amode, const uint32_t* ranks,
                             const uint64_t* occ, int final_pass) {
  const DevExpert& ex = p.ex[k];
  const GroupRange gr = slab_groups(p);
  const bool magnitude = p.sparsifier == Sparsifier::Magnitude;
  const DevCut cut_a = amode == kApplyCut ? p.state.cuts[2 * k] : DevCut{};
  const DevCut cut_b = amode == kApplyCut ? p.state.cuts[2 * k + 1] : DevCut{};
  const uint64_t carry_a = amode == kApplyCut ? p.state.carry[2 * k] : 0;
  const uint64_t carry_b = amode == kApplyCut ? p.state.carry[2 * k + 1] : 0;
  uint32_t bad = 0, kept = 0;
  for (uint64_t g = gr.g0 + blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; g <= gr.g1;
       g += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    Philox4 w{{0, 0, 0, 0}};
    if (amode != kApplyCut) w = philox_block(g, p.tensor_id, k, p.seed);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint64_t i = 4 * g + q;
      if (i < gr.begin || i >= gr.end) continue;
      const uint64_t e = i - gr.begin;
      float value;
      const float d = expert_delta(p, ex, e, value);
      bool keep;
      float fac = 1.0f;
      if (amode == kApplyRank) {
        const float qk = magprune_q(ranks[e], p.n, ex.coef);
        keep = uniform_from_word(w.v[q]) < qk;
        fac = inverse_scale(qk);
      } else if (amode == kApplyRandom) {
        keep = uniform_from_word(w.v[q]) < ex.q_random;
        fac = ex.s_random;
      } else {
        const uint32_t key = magnitude_key(d, p.mode);
        const uint64_t o = occ[e];
        const bool in_a = before(cut_a, key, carry_a + (o >> 32));
        const bool in_b = before(cut_b, key, carry_b + (o & 0xffffffffu));
        keep = magnitude ? in_a : (!in_a && in_b);
      }
      emit(p, k, e, keep, d, fac, final_pass);
      bad += !is_finite_f32(value);
      kept += keep;
    }
  }
  if (final_pass) {
    count_add(&p.stats[1 + k], bad);
    count_add(&p.stats[1 + p.k + k], kept);
  }
}

// ---------------------------------------------------------------- whole-tensor cuts

// Counts the level-1 bin of each of expert k's keys in the slab into h, grid-stride.
// Every lane runs the same number of rounds so the warp stays together for hist_add.
template <class CountT>
__device__ __forceinline__ void count_level1(const SlabParams& p, unsigned k, CountT* h) {
  const uint64_t E = p.rows * p.n;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t base = blockIdx.x * static_cast<uint64_t>(blockDim.x); base < E; base += stride) {
    const uint64_t e = base + threadIdx.x;
    uint32_t bin = kNoKey;
    if (e < E) {
      float value;
      const uint32_t key = magnitude_key(expert_delta(p, p.ex[k], e, value), p.mode);
      bin = p.mode == KeyMode::F32 ? key >> 16 : key;
    }
    hist_add(h, bin);
  }
}

__global__ void hist1_kernel(const __grid_constant__ SlabParams p, unsigned k, unsigned long long* h) {
  count_level1(p, k, h);
}

// The same histogram counted per block in shared memory (32768 32-bit counters, 128 KiB
// of dynamic shared memory) over a grid-stride share of the slab, then added to `h` bin
// by nonzero bin: the global atomics no longer pile up on the few bins that most keys
// share. Counts are integers, so the order of the additions does not matter.
constexpr int kHistThreads = 1024;
constexpr uint32_t kHist1Bins = 32768;
constexpr size_t kHistSmem = kHist1Bins * sizeof(uint32_t);

__global__ void __launch_bounds__(kHistThreads) hist1_shared_kernel(const __grid_constant__ SlabParams p, unsigned k,
                                                                    unsigned long long* h) {
  DELLA_DYNAMIC_SHARED(smem);
  uint32_t* local = reinterpret_cast<uint32_t*>(smem);
  for (uint32_t b = threadIdx.x; b < kHist1Bins; b += kHistThreads) local[b] = 0;
  __syncthreads();
  count_level1(p, k, local);
  __syncthreads();
  for (uint32_t b = threadIdx.x; b < kHist1Bins; b += kHistThreads)
    if (local[b] != 0) atomicAdd(h + b, static_cast<unsigned long long>(local[b]));
}

// Level 2 (F32 keys): low halves of the keys whose high half is the level-1 bin, per cut.
__global__ void hist2_kernel(const __grid_constant__ SlabParams p, unsigned k, int cuts, unsigned long long* h) {
  const uint64_t E = p.rows * p.n;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  bool live[2];
  uint32_t hi[2];
  for (int c = 0; c < 2; ++c) {
    live[c] = c < cuts && !p.state.cuts[2 * k + c].all;
    hi[c] = p.state.hi[2 * k + c];
  }
  for (uint64_t base = blockIdx.x * static_cast<uint64_t>(blockDim.x); base < E; base += stride) {
    const uint64_t e = base + threadIdx.x;
    uint32_t key = kNoKey;
    if (e < E) {
      float value;
      key = magnitude_key(expert_delta(p, p.ex[k], e, value), p.mode);
    }
    for (int c = 0; c < 2; ++c) {
      const bool hit = e < E && live[c] && (key >> 16) == hi[c];
      hist_add(h + static_cast<size_t>(c) * 65536, hit ? (key & 0xffffu) : kNoKey);
    }
  }
}

__global__ void init_cuts_kernel(DevCut* cuts, unsigned K, int descending_a) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= 2 * K) return;
  DevCut c;
  c.key = kNoKey;
  c.take = 0;
  c.descending = (i % 2 == 0) ? static_cast<uint32_t>(descending_a) : 0u;
  c.all = 0;
  c.pad = 0;
  cuts[i] = c;
}

// The CPU's select_bin over one histogram, by one block: the bin holding position `pos`
// in the cut's order and the count before it. Level 1 (pos given) marks the cut "all"
// when pos is past the total; level 2 continues from `remaining` in the bin `hi`.
__global__ void __launch_bounds__(kSelectThreads) select_kernel(const unsigned long long* h, uint32_t bins,
                                                                unsigned long long pos, int descending, int level,
                                                                int half_keys, DevCut* cut, uint32_t* hi,
                                                                unsigned long long* remaining) {
  using Scan = cub::BlockScan<unsigned long long, kSelectThreads>;
  __shared__ typename Scan::TempStorage ts;
  if (level == 2) {
    if (cut->all) return;  // uniform across the block
    pos = *remaining;
  }
  const uint32_t chunk = bins / kSelectThreads;
  const uint32_t q0 = threadIdx.x * chunk;
  unsigned long long sum = 0;
  for (uint32_t q = q0; q < q0 + chunk; ++q) sum += h[descending ? bins - 1 - q : q];
  unsigned long long prefix, total;
  Scan(ts).ExclusiveSum(sum, prefix, total);
  if (pos >= total) {
    if (level == 1 && threadIdx.x == 0) cut->all = 1;
    return;
  }
  if (!(sum > 0 && prefix <= pos && pos < prefix + sum)) return;
  unsigned long long cum = prefix;
  for (uint32_t q = q0; q < q0 + chunk; ++q) {
    const uint32_t b = descending ? bins - 1 - q : q;
    if (pos < cum + h[b]) {
      if (level == 2) {
        cut->key = (*hi << 16) | b;
        cut->take = pos - cum;
      } else if (half_keys) {
        cut->key = b;
        cut->take = pos - cum;
      } else {
        *hi = b;
        *remaining = pos - cum;
      }
      return;
    }
    cum += h[b];
  }
}

// Flags (key == cut a's key) << 32 | (key == cut b's key), for the occurrence scan.
__global__ void cut_flags_kernel(const __grid_constant__ SlabParams p, unsigned k, uint64_t* flags) {
  const uint64_t E = p.rows * p.n;
  const uint32_t ka = p.state.cuts[2 * k].key, kb = p.state.cuts[2 * k + 1].key;
  for (uint64_t e = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; e < E;
       e += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    float value;
    const uint32_t key = magnitude_key(expert_delta(p, p.ex[k], e, value), p.mode);
    flags[e] = (static_cast<uint64_t>(key == ka) << 32) | static_cast<uint64_t>(key == kb);
  }
}

// After a slab: its occurrences of each cut key join the carry for the next slab.
__global__ void carry_kernel(const uint64_t* flags, const uint64_t* occ, uint64_t E, unsigned long long* carry) {
  const uint64_t last = occ[E - 1] + flags[E - 1];
  carry[0] += last >> 32;
  carry[1] += last & 0xffffffffu;
}

// ---------------------------------------------------------------- norm rescales

// Row partial sums in binary64, in index order, one thread per row (as the CPU). The
// sums are chains of dependent additions, so the row's elements are loaded kNormBatch at
// a time ahead of their additions, one dtype switch a batch: the loads' latencies
// overlap instead of adding up (with dload per element, each load sat in its own branch
// of the switch, its value used at once).
constexpr unsigned kNormBatch = 8;

// Elements i .. i + n - 1 (n <= kNormBatch; the rest 0) of a slab buffer, as dload gives them.
__device__ __forceinline__ void dload_batch(const void* p, DType t, uint64_t i, uint64_t n, float (&v)[kNormBatch]) {
  switch (t) {
    case DType::F32: {
      const float* q = static_cast<const float*>(p) + i;
#pragma unroll
      for (unsigned j = 0; j < kNormBatch; ++j) v[j] = j < n ? q[j] : 0.0f;
      break;
    }
    case DType::F16:
    case DType::BF16: {
      const uint16_t* q = static_cast<const uint16_t*>(p) + i;
      uint16_t raw[kNormBatch];
#pragma unroll
      for (unsigned j = 0; j < kNormBatch; ++j) raw[j] = j < n ? q[j] : 0;
#pragma unroll
      for (unsigned j = 0; j < kNormBatch; ++j) v[j] = t == DType::F16 ? f16_to_f32(raw[j]) : bf16_to_f32(raw[j]);
      break;
    }
    default: {
      const double* q = static_cast<const double*>(p) + i;
#pragma unroll
      for (unsigned j = 0; j < kNormBatch; ++j) v[j] = j < n ? static_cast<float>(q[j]) : 0.0f;  // RNE
    }
  }
}

// One element's delta v added to its row's sums, full and kept (for linf, their maxima).
__device__ __forceinline__ void norm_add(const SlabParams& p, double v, bool keep, double& f, double& m) {
  const double a = p.rescale == Rescale::L2 ? v * v : fabs(v);
  if (p.rescale == Rescale::Linf) {
    f = max_or_nan(f, a);
    if (keep) m = max_or_nan(m, a);
  } else {
    f = f + a;
    if (keep) m = m + a;
  }
}

__device__ void norm_row_batched(const SlabParams& p, unsigned k, uint64_t r) {
  double f = 0.0, m = 0.0;
  const uint64_t row = r * p.n;
  for (uint64_t j0 = 0; j0 < p.n; j0 += kNormBatch) {
    const uint64_t e0 = row + j0, left = p.n - j0;
    float ev[kNormBatch], bv[kNormBatch];
    uint8_t keep[kNormBatch];
    dload_batch(p.ex[k].data, p.ex[k].dtype, e0, left, ev);
    dload_batch(p.base, p.base_dtype, e0, left, bv);
#pragma unroll
    for (unsigned i = 0; i < kNormBatch; ++i) keep[i] = i < left ? p.keep[e0 + i] : 0;
#pragma unroll
    for (unsigned i = 0; i < kNormBatch; ++i) {
      if (i >= left) break;
      norm_add(p, static_cast<double>(ev[i] - bv[i]), keep[i] != 0, f, m);  // ev - bv: expert_delta
    }
  }
  p.state.norm_full[(p.row0 + r) * p.k + k] = f;
  p.state.norm_kept[(p.row0 + r) * p.k + k] = m;
}

// The same sums an element at a time (before kNormLoads; the generic kernels' way).
__device__ void norm_row_plain(const SlabParams& p, unsigned k, uint64_t r) {
  double f = 0.0, m = 0.0;
  for (uint64_t j = 0; j < p.n; ++j) {
    const uint64_t e = r * p.n + j;
    float value;
    norm_add(p, static_cast<double>(expert_delta(p, p.ex[k], e, value)), p.keep[e] != 0, f, m);
  }
  p.state.norm_full[(p.row0 + r) * p.k + k] = f;
  p.state.norm_kept[(p.row0 + r) * p.k + k] = m;
}

template <bool Batched>
__global__ void norm_rows_kernel(const __grid_constant__ SlabParams p, unsigned k) {
  for (uint64_t r = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; r < p.rows;
       r += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    if constexpr (Batched) norm_row_batched(p, k, r);
    else norm_row_plain(p, k, r);
  }
}

// Rows in order, per expert: s = |delta| / |delta * mask| (binary64), or 1.
__global__ void norm_finish_kernel(const __grid_constant__ SlabParams p, uint64_t rows) {
  const unsigned k = threadIdx.x;
  if (k >= p.k) return;
  if (!p.ex[k].sparse) {
    p.state.norm_scale[k] = 1.0f;
    return;
  }
  const bool linf = p.rescale == Rescale::Linf;
  double f = 0.0, m = 0.0;
  for (uint64_t r = 0; r < rows; ++r) {
    const double a = p.state.norm_full[r * p.k + k], b = p.state.norm_kept[r * p.k + k];
    if (linf) {
      f = max_or_nan(f, a);
      m = max_or_nan(m, b);
    } else {
      f = f + a;
      m = m + b;
    }
  }
  if (p.rescale == Rescale::L2) {
    f = sqrt(f);
    m = sqrt(m);
  }
  p.state.norm_scale[k] = static_cast<float>(f < 1e-7 || m < 1e-7 ? 1.0 : f / m);
}

// ---------------------------------------------------------------- election and fuse

// Calls f(k) for k = 0..K-1 in order: fully unrolled for few experts, so that per-expert
// arrays indexed by k stay in registers (`#pragma unroll N` with a break left them in
// local memory: ptxas reported a 96-byte stack frame for KMAX = 4), a plain loop over
// local memory for many.
template <int KMAX, class F>
__device__ __forceinline__ void for_experts(unsigned K, F&& f) {
  if constexpr (KMAX <= 8) {
#pragma unroll
    for (int k = 0; k < KMAX; ++k)
      if (k < static_cast<int>(K)) f(k);
  } else {
#pragma unroll 1
    for (int k = 0; k < static_cast<int>(K); ++k) f(k);
  }
}

// The CPU's fuse_row for one element, in its operation order: v[k] is expert k's
// sparsified delta (or, for linear tasks, its value), b the base's value; returns the
// merged value before the store.
// ZERO_FAST: the normalizing division by divide_zero_fast (same value; see fuse_fixed).
template <int KMAX, bool ZERO_FAST>
__device__ __forceinline__ float fuse_one(const SlabParams& p, unsigned K, const float (&v)[KMAX], float b) {
  float m = 0.0f, d = 0.0f;
  if (p.consensus == Consensus::None) {
    for_experts<KMAX>(K, [&](int k) {
      const float wk = p.ex[k].weight;
      m = m + wk * v[k];
      d = d + wk;
    });
    d = fabsf(d) <= 1e-8f ? 1.0f : d;
  } else {
    float sum = 0.0f;
    for_experts<KMAX>(K, [&](int k) {
      const float pk = p.ex[k].weight * v[k];
      if (p.consensus == Consensus::Sum) sum = sum + pk;
      else sum = sum + static_cast<float>(static_cast<int>(pk > 0.0f) - static_cast<int>(pk < 0.0f));
    });
    const bool positive = sum >= 0.0f;
    for_experts<KMAX>(K, [&](int k) {
      const float wk = p.ex[k].weight;
      const float pk = wk * v[k];
      const bool agree = (positive & (pk > 0.0f)) | (!positive & (pk < 0.0f));
      m = m + keep_or_zero(agree, pk);
      d = d + keep_or_zero(agree, wk);
    });
    d = d == 0.0f ? 1.0f : d;
  }
  if (p.normalize) m = ZERO_FAST ? divide_zero_fast(m, d) : m / d;
  if (p.apply_lambda) m = m * p.lambda;
  if (!p.linear) m = b + m;
  return m;
}

// What a kDirect or kRandomFused expert gives the fuse for its delta d (for linear tasks
// its value): d itself, or DARE's keep decision on Philox word `word`, rescaled, with the
// kept element counted.
__device__ __forceinline__ float loaded_contribution(const SlabParams& p, const DevExpert& ex, float d, uint32_t word,
                                                     uint32_t& kept) {
  if (ex.mode == kDirect) return d;
  const bool keep = uniform_from_word(word) < ex.q_random;
  kept += keep;
  return p.rescale == Rescale::Inverse ? keep_or_zero(keep, d * ex.s_random) : keep_or_zero(keep, d);
}

// A fuse kernel's per-thread counts into the slab's statistics: the base's non-finite
// values, and the loaded experts' non-finite values and DARE's kept elements (scratch
// experts were counted by their sparsify kernel). Every thread of the block calls it.
template <int KMAX>
__device__ __forceinline__ void add_fuse_counts(const SlabParams& p, unsigned K, bool linear, uint32_t bad_base,
                                                const uint32_t (&bad)[KMAX], const uint32_t (&kept)[KMAX]) {
  if (!linear) count_add(&p.stats[0], bad_base);
  for_experts<KMAX>(K, [&](int k) {
    if (p.ex[k].mode != kScratch) count_add(&p.stats[1 + k], bad[k]);
    if (p.ex[k].mode == kRandomFused) count_add(&p.stats[1 + K + k], kept[k]);
  });
}

// One Philox block of the slab per thread: every expert's sparsified delta (or value),
// then the CPU's fuse_row, per element, and the store in the output dtype.
// At most 64 registers (4 blocks of 256 per multiprocessor): no spills for K <= 4.
template <int KMAX>
__global__ void __launch_bounds__(kThreads, 4) fuse_kernel(const __grid_constant__ SlabParams p) {
  const GroupRange gr = slab_groups(p);
  const unsigned K = p.k;
  const bool linear = p.linear != 0;
  uint32_t bad_base = 0;
  uint32_t bad[KMAX], kept[KMAX];
  for_experts<KMAX>(KMAX, [&](int k) { bad[k] = kept[k] = 0; });
  for (uint64_t g = gr.g0 + blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; g <= gr.g1;
       g += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    bool valid[4];
    uint64_t el[4];
    float b[4];
    float v[4][KMAX];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint64_t i = 4 * g + q;
      valid[q] = i >= gr.begin && i < gr.end;
      el[q] = valid[q] ? i - gr.begin : 0;
      b[q] = 0.0f;
      if (valid[q] && !linear) {
        b[q] = dload(p.base, p.base_dtype, el[q]);
        bad_base += !is_finite_f32(b[q]);
      }
    }
    for_experts<KMAX>(K, [&](int k) {
      const DevExpert& ex = p.ex[k];
      Philox4 w{{0, 0, 0, 0}};
      if (ex.mode == kRandomFused) w = philox_block(g, p.tensor_id, k, p.seed);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        v[q][k] = 0.0f;
        if (!valid[q]) continue;
        if (ex.mode == kScratch) {
          v[q][k] = ex.scratch[el[q]];
          continue;
        }
        const float value = dload(ex.data, ex.dtype, el[q]);
        bad[k] += !is_finite_f32(value);
        v[q][k] = loaded_contribution(p, ex, linear ? value : value - b[q], w.v[q], kept[k]);
      }
    });
#pragma unroll
    for (int q = 0; q < 4; ++q)
      if (valid[q]) dstore(p.out, p.out_dtype, el[q], fuse_one<KMAX, true>(p, K, v[q], b[q]));
  }
  add_fuse_counts<KMAX>(p, K, linear, bad_base, bad, kept);
}

// Expert k's four sparsified values of a Philox block, as one 16-byte load gives them,
// into v[0..3][k].
template <int KMAX>
__device__ __forceinline__ void spread4(float4 sv, float (&v)[4][KMAX], int k) {
  v[0][k] = sv.x;
  v[1][k] = sv.y;
  v[2][k] = sv.z;
  v[3][k] = sv.w;
}

// Expert k's four values of the slab's Philox block t for a 16-bit fuse, into v[0..3][k]:
// its scratch values (one 16-byte load), or its loaded values, as deltas from the base b
// unless linear, through loaded_contribution; bad and kept count as in fuse_kernel.
template <DType D, int KMAX>
__device__ __forceinline__ void expert_quad(const SlabParams& p, int k, uint32_t t, uint64_t g0, const float (&b)[4],
                                            bool linear, float (&v)[4][KMAX], uint32_t& bad, uint32_t& kept) {
  const DevExpert& ex = p.ex[k];
  if (ex.mode == kScratch) {
    spread4(reinterpret_cast<const float4*>(ex.scratch)[t], v, k);
    return;
  }
  float value[4];
  unpack4<D>(static_cast<const uint2*>(ex.data)[t], value);
  Philox4 w{{0, 0, 0, 0}};
  if (ex.mode == kRandomFused) w = philox_block(g0 + t, p.tensor_id, k, p.seed);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    bad += !is_finite_f32(value[q]);
    v[q][k] = loaded_contribution(p, ex, linear ? value[q] : value[q] - b[q], w.v[q], kept);
  }
}

// fuse_kernel for a slab of D whose length and start are multiples of 4 (K <= 4): one
// Philox block per thread, each input's four elements as one 8-byte load (scratch as
// 16 bytes), the output as one 8-byte store.
template <DType D>
__global__ void __launch_bounds__(kThreads, 4) fuse_half_kernel(const __grid_constant__ SlabParams p) {
  constexpr int KMAX = 4;
  const uint32_t G = static_cast<uint32_t>((p.rows * p.n) >> 2);
  const uint64_t g0 = (p.row0 * p.n) >> 2;
  const unsigned K = p.k;
  const bool linear = p.linear != 0;
  uint32_t bad_base = 0;
  uint32_t bad[KMAX], kept[KMAX];
  for_experts<KMAX>(KMAX, [&](int k) { bad[k] = kept[k] = 0; });
  for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < G; t += gridDim.x * blockDim.x) {
    float b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (!linear) base_quad<D>(p, t, b, bad_base);
    float v[4][KMAX];
    for_experts<KMAX>(K, [&](int k) { expert_quad<D>(p, k, t, g0, b, linear, v, bad[k], kept[k]); });
    uint32_t o[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) o[q] = f32_to_half<D>(fuse_one<KMAX, false>(p, K, v[q], b[q]));
    static_cast<uint2*>(p.out)[t] = make_uint2(o[0] | o[1] << 16, o[2] | o[3] << 16);
  }
  add_fuse_counts<KMAX>(p, K, linear, bad_base, bad, kept);
}

// fuse_one with the expert count K and the consensus C (sum or none) fixed at compile
// time, for a task that is not linear: fuse_element_fixed (merge_math.h), the same
// operations in the same order without fuse_one's per-element tests of k < K and of the
// consensus kind (about 30 of its 150 instructions an element were branches; Nsight
// Compute, 2026-11-27), and with the normalizing division's zero dividends answered by
// divide_zero_fast: CUDA's division sends them to a slow subroutine, and in a della merge
// a fifth of the elements have m = 0 (every expert dropped), so nearly every warp took
// it, four times an iteration.
template <int K, Consensus C>
__device__ __forceinline__ float fuse_fixed(const SlabParams& p, const float (&v)[K], float b) {
  float pk[K], w[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    w[k] = p.ex[k].weight;
    pk[k] = w[k] * v[k];
  }
  return b + fuse_element_fixed<K, C>(pk, w, p.normalize != 0, p.apply_lambda != 0, p.lambda);
}

// The four merged values of the slab's Philox block t by fuse_fixed, stored as one 8-byte
// word.
template <DType D, int K, Consensus C>
__device__ __forceinline__ void fuse_store4(const SlabParams& p, uint32_t t, const float (&v)[4][K], const float (&b)[4]) {
  uint32_t o[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) o[q] = f32_to_half<D>(fuse_fixed<K, C>(p, v[q], b[q]));
  static_cast<uint2*>(p.out)[t] = make_uint2(o[0] | o[1] << 16, o[2] | o[3] << 16);
}

// A fixed fuse kernel's counts into the slab's statistics, as add_fuse_counts (the
// experts decided in the fuse count their kept elements). Every thread calls it.
template <int K>
__device__ __forceinline__ void add_fixed_counts(const SlabParams& p, uint32_t bad_base, const uint32_t (&bad)[K],
                                                 const uint32_t (&kept)[K]) {
  count_add(&p.stats[0], bad_base);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (p.ex[k].mode != kScratch) count_add(&p.stats[1 + k], bad[k]);
    if (p.ex[k].mode == kRandomFused || p.ex[k].mode == kCutFused) count_add(&p.stats[1 + K + k], kept[k]);
  }
}

// fuse_half_kernel for K experts and the consensus C (Options::fast_paths & kFuseFixed).
template <DType D, int K, Consensus C>
__global__ void __launch_bounds__(kThreads, 4) fuse_fixed_kernel(const __grid_constant__ SlabParams p) {
  const uint32_t G = static_cast<uint32_t>((p.rows * p.n) >> 2);
  const uint64_t g0 = (p.row0 * p.n) >> 2;
  uint32_t bad_base = 0, bad[K], kept[K];
#pragma unroll
  for (int k = 0; k < K; ++k) bad[k] = kept[k] = 0;
  for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < G; t += gridDim.x * blockDim.x) {
    float b[4];
    base_quad<D>(p, t, b, bad_base);
    float v[4][K];
#pragma unroll
    for (int k = 0; k < K; ++k) expert_quad<D>(p, k, t, g0, b, false, v, bad[k], kept[k]);
    fuse_store4<D, K, C>(p, t, v, b);
  }
  add_fixed_counts<K>(p, bad_base, bad, kept);
}

// Calls f(K, C) with the slab's expert count (1 to 4) and consensus (sum or none) as
// compile-time constants: the instantiations of the fixed kernels.
template <class F>
void with_fixed_k_consensus(const SlabParams& p, F&& f) {
  auto with_k = [&](auto c) {
    switch (p.k) {
      case 1: f(std::integral_constant<int, 1>{}, c); break;
      case 2: f(std::integral_constant<int, 2>{}, c); break;
      case 3: f(std::integral_constant<int, 3>{}, c); break;
      default: f(std::integral_constant<int, 4>{}, c); break;
    }
  };
  if (p.consensus == Consensus::Sum) with_k(std::integral_constant<Consensus, Consensus::Sum>{});
  else with_k(std::integral_constant<Consensus, Consensus::None>{});
}

template <DType D>
void launch_fuse_fixed(const SlabParams& p, unsigned grid, cudaStream_t s) {
  with_fixed_k_consensus(p, [&](auto K, auto C) { DELLA_LAUNCH(grid, kThreads, 0, s, fuse_fixed_kernel<D, K(), C()>)(p); });
}

// ---------------------------------------------------------------- ties and breadcrumbs in the fuse

// Whole-tensor cuts (ties, breadcrumbs) without a rescale, decided inside the fuse
// (Options::fast_paths & kCutFused): an element is kept by where its key falls against
// the cut, and an element whose key equals the cut's key by its occurrence among those
// in index order (DevCut::take). The occurrence came from flags for every element and a
// device-wide scan (16 bytes an element written, 24 read, per expert, plus the scratch
// row and the sparsify kernel). Here the slab is cut into tiles of 1024 elements (one
// fuse block's 256 Philox blocks): a count kernel counts each tile's cut keys, one block
// turns the counts into each tile's first occurrence, and the fuse block adds its own
// threads' counts before it (a block scan) and the thread's before each element.
void launched(const char* what);

// (matches of cut a's key) << 16 | (matches of cut b's key) among expert k's four elements
// of Philox block t; their keys and deltas (the base's values b given) into key and d.
template <DType D>
__device__ __forceinline__ uint32_t cut_matches4(const SlabParams& p, unsigned k, uint32_t t, const float (&b)[4],
                                                 uint32_t ka, uint32_t kb, float (&value)[4], float (&d)[4],
                                                 uint32_t (&key)[4]) {
  constexpr KeyMode mode = D == DType::BF16 ? KeyMode::BF16 : KeyMode::F16;
  unpack4<D>(static_cast<const uint2*>(p.ex[k].data)[t], value);
  uint32_t m = 0;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    d[q] = value[q] - b[q];
    key[q] = magnitude_key(d[q], mode);
    m += (static_cast<uint32_t>(key[q] == ka) << 16) + static_cast<uint32_t>(key[q] == kb);
  }
  return m;
}

// The cut decisions of a thread's four elements (keys `key`), given the occurrences of
// cut a's and cut b's keys before the first of them: ties keep what comes before cut a
// in its order, breadcrumbs what lies between the cuts (as apply_kernel).
__device__ __forceinline__ void cut_keep4(const DevCut& ca, const DevCut& cb, bool magnitude, const uint32_t (&key)[4],
                                          unsigned long long oa, unsigned long long ob, bool (&keep)[4]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const bool in_a = before(ca, key[q], oa), in_b = before(cb, key[q], ob);
    oa += key[q] == ca.key;
    ob += key[q] == cb.key;
    keep[q] = magnitude ? in_a : (!in_a && in_b);
  }
}

// counts[tile] = cut_matches4 summed over the tile (zeroed before), for expert k.
template <DType D>
__global__ void __launch_bounds__(kThreads) cut_tile_counts_kernel(const __grid_constant__ SlabParams p, unsigned k,
                                                                   uint32_t* counts) {
  const uint32_t G = static_cast<uint32_t>((p.rows * p.n) >> 2);
  const uint32_t ka = p.state.cuts[2 * k].key, kb = p.state.cuts[2 * k + 1].key;
  // Whole blocks per round, so that every lane of a warp takes part in the sum.
  for (uint32_t base = blockIdx.x * kThreads; base < G; base += gridDim.x * kThreads) {
    const uint32_t t = base + threadIdx.x;
    uint32_t m = 0;
    if (t < G) {
      float b[4], value[4], d[4];
      uint32_t key[4];
      unpack4<D>(static_cast<const uint2*>(p.base)[t], b);
      m = cut_matches4<D>(p, k, t, b, ka, kb, value, d, key);
    }
    count_add(counts + base / kThreads, m);
  }
}

// One block per expert: each tile's first occurrences of cut a's and cut b's keys (the
// occurrences in earlier slabs, `carry`, included), then carry += the slab's.
__global__ void __launch_bounds__(kSelectThreads) cut_tile_offsets_kernel(const uint32_t* counts, uint32_t tiles,
                                                                          unsigned long long* carry,
                                                                          unsigned long long* first_a,
                                                                          unsigned long long* first_b) {
  using Scan = cub::BlockScan<unsigned long long, kSelectThreads>;
  __shared__ typename Scan::TempStorage ts;
  const uint32_t chunk = (tiles + kSelectThreads - 1) / kSelectThreads;
  const uint32_t t0 = threadIdx.x * chunk < tiles ? threadIdx.x * chunk : tiles;
  const uint32_t t1 = t0 + chunk < tiles ? t0 + chunk : tiles;
  unsigned long long sa = 0, sb = 0;
  for (uint32_t t = t0; t < t1; ++t) {
    sa += counts[t] >> 16;
    sb += counts[t] & 0xffffu;
  }
  unsigned long long pa, ta, pb, tb;
  Scan(ts).ExclusiveSum(sa, pa, ta);
  __syncthreads();
  Scan(ts).ExclusiveSum(sb, pb, tb);
  unsigned long long oa = carry[0] + pa, ob = carry[1] + pb;
  for (uint32_t t = t0; t < t1; ++t) {
    first_a[t] = oa;
    first_b[t] = ob;
    oa += counts[t] >> 16;
    ob += counts[t] & 0xffffu;
  }
  __syncthreads();  // every thread has read the carry
  if (threadIdx.x == 0) {
    carry[0] += ta;
    carry[1] += tb;
  }
}

// fuse_fixed_kernel with its kCutFused experts decided here: per expert, the keys of the
// block's 1024 elements, a block scan of their cut matches, and each element's
// occurrence = the tile's first + the threads' before it + its own before it. Its other
// experts (not sparsified) are loaded as there. first_a/first_b: [K][tiles]. Registers:
// K = 4 spilled about 120 bytes at 64 (four blocks of 256 a multiprocessor), so it takes
// three blocks' 80.
template <DType D, int K, Consensus C>
__global__ void __launch_bounds__(kThreads, K >= 4 ? 3 : 4) cut_fuse_kernel(const __grid_constant__ SlabParams p,
                                                               const unsigned long long* first_a,
                                                               const unsigned long long* first_b, uint32_t tiles) {
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  __shared__ typename Scan::TempStorage ts;
  const uint32_t G = static_cast<uint32_t>((p.rows * p.n) >> 2);
  const uint64_t g0 = (p.row0 * p.n) >> 2;
  const bool magnitude = p.sparsifier == Sparsifier::Magnitude;
  uint32_t bad_base = 0, bad[K], kept[K];
#pragma unroll
  for (int k = 0; k < K; ++k) bad[k] = kept[k] = 0;
  for (uint32_t base = blockIdx.x * kThreads; base < G; base += gridDim.x * kThreads) {
    const uint32_t t = base + threadIdx.x, tile = base / kThreads;
    const bool in = t < G;
    float b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (in) base_quad<D>(p, t, b, bad_base);
    float v[4][K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (p.ex[k].mode != kCutFused) {  // the same for every thread: the scan below is not skipped by some
        if (in) expert_quad<D>(p, k, t, g0, b, false, v, bad[k], kept[k]);
        continue;
      }
      const DevCut ca = p.state.cuts[2 * k], cb = p.state.cuts[2 * k + 1];
      float value[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      uint32_t key[4] = {kNoKey, kNoKey, kNoKey, kNoKey};
      const uint32_t m = in ? cut_matches4<D>(p, k, t, b, ca.key, cb.key, value, d, key) : 0u;
      uint32_t before_me, total;
      Scan(ts).ExclusiveSum(m, before_me, total);
      __syncthreads();  // the next expert's scan reuses ts
      bool keep[4];
      cut_keep4(ca, cb, magnitude, key, first_a[k * tiles + tile] + (before_me >> 16),
                first_b[k * tiles + tile] + (before_me & 0xffffu), keep);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        v[q][k] = keep_or_zero(keep[q], d[q]);
        if (in) {
          kept[k] += keep[q];
          bad[k] += !is_finite_f32(value[q]);
        }
      }
    }
    if (in) fuse_store4<D, K, C>(p, t, v, b);
  }
  add_fixed_counts<K>(p, bad_base, bad, kept);
}

// The tiles of a slab of E elements (E % 4 == 0 where kCutFused applies).
uint32_t cut_tiles(uint64_t E) { return static_cast<uint32_t>((E / 4 + kThreads - 1) / kThreads); }

// Expert k's tile counts and first occurrences (its [tiles] parts of the work arrays),
// and the carry moved past this slab.
template <DType D>
void cut_tile_firsts(const SlabParams& p, unsigned k, uint32_t* counts, unsigned long long* first_a,
                     unsigned long long* first_b, unsigned grid, cudaStream_t s) {
  const size_t tiles = cut_tiles(p.rows * p.n), at = static_cast<size_t>(k) * tiles;
  check(cudaMemsetAsync(counts + at, 0, tiles * 4, s), "cudaMemsetAsync");
  DELLA_LAUNCH(grid, kThreads, 0, s, cut_tile_counts_kernel<D>)(p, k, counts + at);
  launched("cut_tile_counts_kernel");
  DELLA_LAUNCH(1, kSelectThreads, 0, s, cut_tile_offsets_kernel)(counts + at, static_cast<uint32_t>(tiles),
                                                                  p.state.carry + 2 * k, first_a + at, first_b + at);
  launched("cut_tile_offsets_kernel");
}

// apply_kernel's cut decision for expert k of a 16-bit slab (TaskInfo::cut_tiles: the
// cuts outside the fuse, with a norm rescale or where the fixed fuse does not apply), by
// tiles as in cut_fuse_kernel: the keep flags (norm pass) or the sparsified values, with
// the norm scale, into scratch (final pass).
template <DType D>
__global__ void __launch_bounds__(kThreads) cut_apply_kernel(const __grid_constant__ SlabParams p, unsigned k,
                                                             const unsigned long long* first_a,
                                                             const unsigned long long* first_b, int final_pass) {
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  __shared__ typename Scan::TempStorage ts;
  const uint32_t G = static_cast<uint32_t>((p.rows * p.n) >> 2);
  const bool magnitude = p.sparsifier == Sparsifier::Magnitude;
  const DevCut ca = p.state.cuts[2 * k], cb = p.state.cuts[2 * k + 1];
  uint32_t bad = 0, kept = 0;
  for (uint32_t base = blockIdx.x * kThreads; base < G; base += gridDim.x * kThreads) {
    const uint32_t t = base + threadIdx.x, tile = base / kThreads;
    const bool in = t < G;
    float b[4] = {0.0f, 0.0f, 0.0f, 0.0f}, value[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    uint32_t key[4] = {kNoKey, kNoKey, kNoKey, kNoKey}, m = 0;
    if (in) {
      unpack4<D>(static_cast<const uint2*>(p.base)[t], b);
      m = cut_matches4<D>(p, k, t, b, ca.key, cb.key, value, d, key);
    }
    uint32_t before_me, total;
    Scan(ts).ExclusiveSum(m, before_me, total);
    __syncthreads();  // the next round's scan reuses ts
    if (!in) continue;
    bool keep[4];
    cut_keep4(ca, cb, magnitude, key, first_a[tile] + (before_me >> 16), first_b[tile] + (before_me & 0xffffu), keep);
    float v[4];
    uint32_t flags = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      v[q] = sparsified(p, k, keep[q], d[q], 1.0f);
      flags |= static_cast<uint32_t>(keep[q]) << (8 * q);
      bad += !is_finite_f32(value[q]);
      kept += keep[q];
    }
    if (final_pass) reinterpret_cast<float4*>(p.ex[k].scratch)[t] = make_float4(v[0], v[1], v[2], v[3]);
    else reinterpret_cast<uint32_t*>(p.keep)[t] = flags;
  }
  if (final_pass) {
    count_add(&p.stats[1 + k], bad);
    count_add(&p.stats[1 + p.k + k], kept);
  }
}

// The final pass of a kCutFused slab: counts, first occurrences, then the fuse.
template <DType D>
void launch_cut_fuse(const TaskInfo& ti, const SlabParams& p, uint32_t* counts, unsigned long long* first_a,
                     unsigned long long* first_b, unsigned grid, cudaStream_t s) {
  const uint32_t tiles = cut_tiles(p.rows * p.n);
  for (unsigned k = 0; k < ti.k; ++k)
    if (ti.mode_k[k] == kCutFused) cut_tile_firsts<D>(p, k, counts, first_a, first_b, grid, s);
  with_fixed_k_consensus(p, [&](auto K, auto C) {
    DELLA_LAUNCH(grid, kThreads, 0, s, cut_fuse_kernel<D, K(), C()>)(p, first_a, first_b, tiles);
  });
  launched("cut_fuse_kernel");
}

// ---------------------------------------------------------------- della: one block a row

// della's whole final pass for a row of n <= 4096 in one block (Options::fast_paths &
// kFusedRow; K <= 4 experts, every one sparsified by magprune with the inverse or no
// rescale): each expert's ranks, keep and rescale in turn (rank_row_half, keep_row_half)
// into K rows of floats in shared memory, then the fuse of the row from there
// (fuse_fixed). No scratch rows in device memory (at K = 3, 24 of the 40 bytes an
// element that della moves: 12 written, then read again) and no separate fuse kernel. The
// arithmetic is the separate kernels', so the bytes are the same. Shared memory: the
// ranking's R::kSmem, then K x 4096 floats (64 KiB at K = 4).
using RowRank = BlockRankPacked<256, 16>;
constexpr size_t kRowSortBytes = (RowRank::kSmem + 15) / 16 * 16;

template <int K>
constexpr size_t della_row_smem() {
  return kRowSortBytes + static_cast<size_t>(K) * RowRank::kCapacity * sizeof(float);
}

template <DType D, int K, Consensus C>
__global__ void __launch_bounds__(256, 3) della_row_kernel(const __grid_constant__ SlabParams p) {
  DELLA_DYNAMIC_SHARED(smem);
  float* vals = reinterpret_cast<float*>(smem + kRowSortBytes);  // [K][n]
  const uint32_t r = blockIdx.x;
  const uint32_t n = static_cast<uint32_t>(p.n);
#pragma unroll 1
  for (int k = 0; k < K; ++k) {
    rank_row_half<D, 256, 16, true, true>(p, k, r, smem);
    keep_row_half<D, 256, true>(p, k, r, reinterpret_cast<const uint16_t*>(smem), 1, vals + k * n);
    __syncthreads();  // the next expert's sort reuses the ranks' bytes
  }
  const uint32_t t0 = r * (n / 4);  // the row's first Philox block in the slab (n % 8 == 0)
  uint32_t bad_base = 0;
  for (uint32_t gi = threadIdx.x; gi < n / 4; gi += 256) {
    float b[4];
    base_quad<D>(p, t0 + gi, b, bad_base);
    float v[4][K];
#pragma unroll
    for (int k = 0; k < K; ++k) spread4(reinterpret_cast<const float4*>(vals + k * n)[gi], v, k);
    fuse_store4<D, K, C>(p, t0 + gi, v, b);
  }
  count_add(&p.stats[0], bad_base);
}

template <DType D>
void launch_della_row(const SlabParams& p, cudaStream_t s) {
  with_fixed_k_consensus(p, [&](auto K, auto C) {
    auto kernel = della_row_kernel<D, K(), C()>;
    constexpr size_t smem = della_row_smem<K()>();
    if (smem > 48 * 1024)
      check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
            "cudaFuncSetAttribute (della row shared memory)");
    DELLA_LAUNCH(static_cast<unsigned>(p.rows), 256, smem, s, kernel)(p);
  });
}

// The slab's stored outputs that are NaN or infinite, counted into p.stats[1 + 2K]:
// a finite merged value beyond the output dtype's range was stored as an infinity.
__global__ void __launch_bounds__(kThreads) out_check_kernel(const __grid_constant__ SlabParams p) {
  const uint64_t E = p.rows * p.n;
  uint32_t bad = 0;
  for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < E;
       i += static_cast<uint64_t>(gridDim.x) * blockDim.x)
    bad += stored_nonfinite(p.out, p.out_dtype, i);
  count_add(&p.stats[1 + 2 * p.k], bad);
}

// ---------------------------------------------------------------- host side

// Blocks of a grid-stride kernel over `items`: one per `threads` items, at most `cap`
// (Options::max_grid_blocks; beyond it each thread takes several).
unsigned grid_for(uint64_t items, unsigned cap, unsigned threads = kThreads) {
  const uint64_t blocks = (items + threads - 1) / threads;
  return static_cast<unsigned>(std::max<uint64_t>(1, std::min<uint64_t>(blocks, std::max(1u, cap))));
}

// Blocks of the shared-memory histogram: one per multiprocessor (each holds 128 KiB),
// fewer for a small slab.
unsigned hist_grid(uint64_t E) {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) sms = 1;
  (void)cudaGetLastError();
  const uint64_t blocks = (E + kHistThreads - 1) / kHistThreads;
  return static_cast<unsigned>(std::max<uint64_t>(1, std::min<uint64_t>(blocks, static_cast<uint64_t>(sms))));
}

// Shared memory a block of the current device may opt into (0 where unknown).
size_t optin_shared_bytes() {
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) optin = 0;
  (void)cudaGetLastError();
  return static_cast<size_t>(optin);
}

bool whole_tensor(Sparsifier s) { return s == Sparsifier::Magnitude || s == Sparsifier::Breadcrumbs; }
bool norm_rescale(Rescale r) { return r == Rescale::L1 || r == Rescale::L2 || r == Rescale::Linf; }

uint64_t seg_sort_temp(uint64_t E, uint64_t rows) {
  size_t bytes = 0;
  check(cub::DeviceSegmentedRadixSort::SortKeys(nullptr, bytes, static_cast<const uint64_t*>(nullptr),
                                                  static_cast<uint64_t*>(nullptr), static_cast<int>(E),
                                                  static_cast<int>(rows), static_cast<const int*>(nullptr),
                                                  static_cast<const int*>(nullptr) + 1, 0, 63),
        "cub::DeviceSegmentedRadixSort (temporary storage size)");
  return bytes;
}

uint64_t scan_temp(uint64_t E) {
  size_t bytes = 0;
  check(cub::DeviceScan::ExclusiveSum(nullptr, bytes, static_cast<const uint64_t*>(nullptr),
                                      static_cast<uint64_t*>(nullptr), static_cast<int64_t>(E)),
        "cub::DeviceScan (temporary storage size)");
  return bytes;
}

void launched(const char* what) { check(cudaGetLastError(), what); }

// The vector kernels' loads and stores need the slab's buffers aligned to `bytes` (slab
// buffers are 256-byte aligned; run_device_task takes the caller's pointers).
bool aligned_slab(const SlabParams& p, uintptr_t bytes) {
  auto ok = [&](const void* q) { return q == nullptr || reinterpret_cast<uintptr_t>(q) % bytes == 0; };
  bool all = ok(p.base) && ok(p.out) && ok(p.keep);
  for (unsigned k = 0; k < p.k; ++k)
    all = all && ok(p.ex[k].data) && (p.ex[k].scratch == nullptr || reinterpret_cast<uintptr_t>(p.ex[k].scratch) % 16 == 0);
  return all;
}

}  // namespace

TaskInfo task_info(const MergeTask& t, const Options& o) {
  const uint32_t block_sort_max = o.block_sort_max;
  TaskInfo ti;
  const Geometry g = geometry(t.shape);
  ti.numel = g.numel;
  ti.n = g.n;
  ti.rows = g.rows;
  ti.mode = t.base_dtype == DType::F16 ? KeyMode::F16 : (t.base_dtype == DType::BF16 ? KeyMode::BF16 : KeyMode::F32);
  ti.f32_keys = ti.mode == KeyMode::F32;
  ti.k = static_cast<unsigned>(t.experts.size());
  ti.sparsifier = t.sparsifier;
  ti.sparse.assign(ti.k, 0);
  ti.mode_k.assign(ti.k, kDirect);
  ti.pos_a.assign(ti.k, 0);
  ti.pos_b.assign(ti.k, 0);
  bool any_sparse = false;
  for (unsigned k = 0; k < ti.k; ++k) {
    const ExpertInput& e = t.experts[k];
    ti.sparse[k] = !t.linear && t.sparsifier != Sparsifier::None && e.density < 1.0;
    if (!ti.sparse[k]) continue;
    any_sparse = true;
    const bool fused = t.sparsifier == Sparsifier::Random && (t.rescale == Rescale::None || t.rescale == Rescale::Inverse);
    ti.mode_k[k] = fused ? kRandomFused : kScratch;
    ti.any_scratch = ti.any_scratch || !fused;
    if (whole_tensor(t.sparsifier)) {
      const CutPositions c = cut_positions(t.sparsifier, e.density, e.gamma, ti.numel);
      ti.pos_a[k] = c.a;
      ti.pos_b[k] = c.b;
    }
  }
  ti.need_cuts = any_sparse && whole_tensor(t.sparsifier) && ti.numel > 0;
  ti.need_norm = any_sparse && norm_rescale(t.rescale) && ti.numel > 0;
  ti.block_tier = 0;
  if (t.sparsifier == Sparsifier::Magprune && ti.n <= block_sort_max) {
    if (ti.n <= static_cast<uint64_t>(Tier1HalfPairs::kCapacity)) {
      ti.block_tier = 1;
    } else if (ti.n <= kBlockSortMax) {
      // The large tier needs more than 48 KiB of shared memory per block: where the
      // device has less, long rows take the segmented sort.
      const size_t need = ti.f32_keys ? Tier2F32Pairs::kSmem : Tier2HalfPairs::kSmem;
      ti.block_tier = optin_shared_bytes() >= need ? 2 : 0;
    }
  }
  ti.block_sort = ti.block_tier != 0;
  ti.shared_hist = ti.need_cuts && o.shared_hist && optin_shared_bytes() >= kHistSmem;
  // One 16-bit dtype throughout: the vector kernels' precondition (with the row length).
  bool half = t.out_dtype == DType::BF16 || t.out_dtype == DType::F16;
  half = half && (t.linear || t.base_dtype == t.out_dtype);
  for (const ExpertInput& e : t.experts) half = half && e.dtype == t.out_dtype;
  ti.half = half ? t.out_dtype : DType::F32;
  ti.fast_fuse = half && (o.fast_paths & kFastFuse) && ti.k <= 4 && ti.n % 4 == 0;
  ti.fuse_fixed = ti.fast_fuse && (o.fast_paths & kFuseFixed) && ti.k >= 1 && !t.linear &&
                  (t.consensus == Consensus::Sum || t.consensus == Consensus::None);
  // Ties and breadcrumbs without a rescale: the cuts decided inside the fuse.
  ti.cut_fused = ti.fuse_fixed && (o.fast_paths & kCutFused) && ti.need_cuts && !ti.need_norm && !ti.f32_keys &&
                 t.rescale == Rescale::None && ti.numel < (1ull << 33);
  // The other 16-bit cuts (a norm rescale, more than four experts, the count consensus):
  // their sparsify kernel by tiles too.
  ti.cut_tiles = !ti.cut_fused && (o.fast_paths & kCutFused) && ti.need_cuts && !ti.f32_keys && half &&
                 ti.n % 4 == 0 && ti.numel < (1ull << 33);
  if (ti.cut_fused) {
    ti.any_scratch = false;
    for (unsigned k = 0; k < ti.k; ++k)
      if (ti.mode_k[k] == kScratch) ti.mode_k[k] = kCutFused;
  }
  ti.fast_rank = half && (o.fast_paths & kFastRank) && ti.block_sort && ti.n % 8 == 0 &&
                 (ti.block_tier == 1 || optin_shared_bytes() >= Tier2Packed::kSmem);
  ti.rank256 = (o.fast_paths & kRank256) != 0;
  ti.rank_direct = (o.fast_paths & kRankDirect) != 0;
  ti.rank_lean = ti.rank_direct && (o.fast_paths & kRankLean) != 0;
  // della_row_kernel: every expert ranked in the 4096 tier as 256 x 16 with the lean keep
  // step, rescaled by 1/q or not at all, and fused by fuse_fixed.
  bool all_scratch = ti.k >= 1;
  for (unsigned k = 0; k < ti.k; ++k) all_scratch = all_scratch && ti.mode_k[k] == kScratch;
  ti.fused_row = (o.fast_paths & kFusedRow) && all_scratch && t.sparsifier == Sparsifier::Magprune &&
                 (t.rescale == Rescale::Inverse || t.rescale == Rescale::None) && ti.fast_rank && ti.rank_lean &&
                 ti.rank256 && ti.block_tier == 1 && ti.fuse_fixed &&
                 optin_shared_bytes() >= della_row_smem<4>();
  ti.max_grid = o.max_grid_blocks;
  ti.tier2_wide = (o.fast_paths & kTier2Wide) != 0 && optin_shared_bytes() >= Tier2Wide::kSmem;
  ti.norm_loads = (o.fast_paths & kNormLoads) != 0;
  return ti;
}

uint64_t state_bytes(const TaskInfo& ti) {
  uint64_t b = 0;
  if (ti.need_cuts) {
    b += align_up(ti.k * 32768ull * 8);
    if (ti.f32_keys) b += align_up(ti.k * 2ull * 65536 * 8);
    b += align_up(ti.k * 2ull * sizeof(DevCut)) + align_up(ti.k * 2ull * 4) + 2 * align_up(ti.k * 2ull * 8);
  }
  if (ti.need_norm) b += 2 * align_up(ti.rows * ti.k * 8ull) + align_up(ti.k * 4ull);
  return b;
}

StatePtrs state_layout(const TaskInfo& ti, char* p) {
  StatePtrs s;
  auto take = [&](uint64_t bytes) {
    char* q = p;
    p += align_up(bytes);
    return q;
  };
  if (ti.need_cuts) {
    s.hist1 = reinterpret_cast<unsigned long long*>(take(ti.k * 32768ull * 8));
    if (ti.f32_keys) s.hist2 = reinterpret_cast<unsigned long long*>(take(ti.k * 2ull * 65536 * 8));
    s.cuts = reinterpret_cast<DevCut*>(take(ti.k * 2ull * sizeof(DevCut)));
    s.hi = reinterpret_cast<uint32_t*>(take(ti.k * 2ull * 4));
    s.remaining = reinterpret_cast<unsigned long long*>(take(ti.k * 2ull * 8));
    s.carry = reinterpret_cast<unsigned long long*>(take(ti.k * 2ull * 8));
  }
  if (ti.need_norm) {
    s.norm_full = reinterpret_cast<double*>(take(ti.rows * ti.k * 8ull));
    s.norm_kept = reinterpret_cast<double*>(take(ti.rows * ti.k * 8ull));
    s.norm_scale = reinterpret_cast<float*>(take(ti.k * 4ull));
  }
  return s;
}

uint64_t slab_scratch_bytes(const TaskInfo& ti, uint64_t rows) {
  const uint64_t E = rows * ti.n;
  uint64_t b = 0;
  for (unsigned k = 0; k < ti.k; ++k)
    if (ti.mode_k[k] == kScratch) b += align_up(E * 4);
  if (ti.need_norm) b += align_up(E);
  return b;
}

namespace {

// Work area of the sorts and scans, laid out from `work`.
struct WorkLayout {
  uint64_t* comp = nullptr;
  uint64_t* sorted = nullptr;
  int* offsets = nullptr;
  uint64_t* flags = nullptr;
  uint64_t* occ = nullptr;
  void* temp = nullptr;
  uint64_t temp_bytes = 0;
  uint32_t* counts = nullptr;  // kCutFused: [K][tiles] cut-key matches per tile
  unsigned long long* first_a = nullptr;  // [K][tiles] first occurrences
  unsigned long long* first_b = nullptr;
  uint64_t total = 0;
};

WorkLayout work_layout(const TaskInfo& ti, uint64_t rows, char* work) {
  WorkLayout w;
  const uint64_t E = rows * ti.n;
  if (E == 0) return w;
  uint64_t sort_bytes = 0, cut_bytes = 0, sort_temp = 0, cut_temp = 0;
  const bool long_rows = ti.sparsifier == Sparsifier::Magprune && !ti.block_sort && ti.any_scratch;
  if (long_rows) {
    sort_temp = seg_sort_temp(E, rows);
    sort_bytes = 2 * align_up(E * 8) + align_up((rows + 1) * 4) + align_up(sort_temp);
  }
  const uint64_t tiles = cut_tiles(E);
  if (ti.cut_fused || ti.cut_tiles) cut_bytes = align_up(ti.k * tiles * 4) + 2 * align_up(ti.k * tiles * 8);
  else if (ti.need_cuts) {
    cut_temp = scan_temp(E);
    cut_bytes = 2 * align_up(E * 8) + align_up(cut_temp);
  }
  w.total = std::max(sort_bytes, cut_bytes);
  if (!work) return w;
  char* p = work;
  if (long_rows) {
    w.comp = reinterpret_cast<uint64_t*>(p);
    w.sorted = reinterpret_cast<uint64_t*>(p + align_up(E * 8));
    w.offsets = reinterpret_cast<int*>(p + 2 * align_up(E * 8));
    w.temp = p + 2 * align_up(E * 8) + align_up((rows + 1) * 4);
    w.temp_bytes = sort_temp;
  }
  if (ti.cut_fused || ti.cut_tiles) {
    w.counts = reinterpret_cast<uint32_t*>(p);
    w.first_a = reinterpret_cast<unsigned long long*>(p + align_up(ti.k * tiles * 4));
    w.first_b = reinterpret_cast<unsigned long long*>(p + align_up(ti.k * tiles * 4) + align_up(ti.k * tiles * 8));
  } else if (ti.need_cuts) {
    w.flags = reinterpret_cast<uint64_t*>(p);
    w.occ = reinterpret_cast<uint64_t*>(p + align_up(E * 8));
    w.temp = p + 2 * align_up(E * 8);
    w.temp_bytes = cut_temp;
  }
  return w;
}

// Sparsifies expert k of the slab: keep flags (norm pass) or the scratch values (final).
void sparsify(const MergeTask& t, const TaskInfo& ti, const SlabParams& p, unsigned k, bool final_pass,
              const WorkLayout& w, cudaStream_t s) {
  const uint64_t E = p.rows * p.n;
  const uint64_t groups = ((p.row0 * p.n + E - 1) >> 2) - ((p.row0 * p.n) >> 2) + 1;
  switch (t.sparsifier) {
    case Sparsifier::Magprune:
      if (ti.fast_rank && aligned_slab(p, 16)) {
        const bool bf16 = ti.half == DType::BF16;
        if (bf16 && ti.rank_lean) launch_rank_half_tier<DType::BF16, true, true>(ti, p, k, final_pass, s);
        else if (bf16 && ti.rank_direct) launch_rank_half_tier<DType::BF16, true, false>(ti, p, k, final_pass, s);
        else if (bf16) launch_rank_half_tier<DType::BF16, false, false>(ti, p, k, final_pass, s);
        else if (ti.rank_lean) launch_rank_half_tier<DType::F16, true, true>(ti, p, k, final_pass, s);
        else if (ti.rank_direct) launch_rank_half_tier<DType::F16, true, false>(ti, p, k, final_pass, s);
        else launch_rank_half_tier<DType::F16, false, false>(ti, p, k, final_pass, s);
        launched("magprune_half_kernel");
      } else if (ti.block_sort) {
        if (ti.block_tier == 1 && ti.f32_keys) launch_rank<uint32_t, 512, 8>(p, k, final_pass, s);
        else if (ti.block_tier == 1) launch_rank<uint16_t, 512, 8>(p, k, final_pass, s);
        else if (ti.f32_keys) launch_rank<uint32_t, 1024, 16>(p, k, final_pass, s);
        else launch_rank<uint16_t, 1024, 16>(p, k, final_pass, s);
        launched("magprune_pairs_kernel");
      } else {
        DELLA_LAUNCH(grid_for(E, ti.max_grid), kThreads, 0, s, composite_keys_kernel)(p, k, w.comp);
        launched("composite_keys_kernel");
        DELLA_LAUNCH(grid_for(p.rows + 1, ti.max_grid), kThreads, 0, s, segment_offsets_kernel)(w.offsets, p.rows, p.n);
        launched("segment_offsets_kernel");
        size_t temp = w.temp_bytes;
        check(cub::DeviceSegmentedRadixSort::SortKeys(w.temp, temp, w.comp, w.sorted, static_cast<int>(E),
                                                        static_cast<int>(p.rows), w.offsets, w.offsets + 1, 0,
                                                        32 + (ti.f32_keys ? 31 : 15), s),
              "cub::DeviceSegmentedRadixSort::SortKeys");
        uint32_t* ranks = reinterpret_cast<uint32_t*>(w.comp);  // the unsorted keys are no longer needed
        DELLA_LAUNCH(grid_for(E, ti.max_grid), kThreads, 0, s, ranks_from_sorted_kernel)(w.sorted, ranks, E, p.n);
        launched("ranks_from_sorted_kernel");
        DELLA_LAUNCH(grid_for(groups, ti.max_grid), kThreads, 0, s, apply_kernel)(p, k, kApplyRank, ranks, nullptr, final_pass);
        launched("apply_kernel");
      }
      break;
    case Sparsifier::Random:
      DELLA_LAUNCH(grid_for(groups, ti.max_grid), kThreads, 0, s, apply_kernel)(p, k, kApplyRandom, nullptr, nullptr, final_pass);
      launched("apply_kernel");
      break;
    case Sparsifier::Magnitude:
    case Sparsifier::Breadcrumbs: {
      if (ti.cut_tiles) {  // task_info's conditions; the pointers are checked here
        if (E >= (1ull << 33) || !aligned_slab(p, 16))
          throw Error(DELLA_CUDA_ERROR, "internal: a slab for the tiled cut kernels is not 16-byte aligned");
        const size_t at = static_cast<size_t>(k) * cut_tiles(E);
        if (ti.half == DType::BF16) {
          cut_tile_firsts<DType::BF16>(p, k, w.counts, w.first_a, w.first_b, grid_for(groups, ti.max_grid), s);
          DELLA_LAUNCH(grid_for(groups, ti.max_grid), kThreads, 0, s, cut_apply_kernel<DType::BF16>)(p, k, w.first_a + at, w.first_b + at,
                                                                                        final_pass);
        } else {
          cut_tile_firsts<DType::F16>(p, k, w.counts, w.first_a, w.first_b, grid_for(groups, ti.max_grid), s);
          DELLA_LAUNCH(grid_for(groups, ti.max_grid), kThreads, 0, s, cut_apply_kernel<DType::F16>)(p, k, w.first_a + at, w.first_b + at,
                                                                                       final_pass);
        }
        launched("cut_apply_kernel");
        break;
      }
      DELLA_LAUNCH(grid_for(E, ti.max_grid), kThreads, 0, s, cut_flags_kernel)(p, k, w.flags);
      launched("cut_flags_kernel");
      size_t temp = w.temp_bytes;
      check(cub::DeviceScan::ExclusiveSum(w.temp, temp, w.flags, w.occ, static_cast<int64_t>(E), s),
            "cub::DeviceScan::ExclusiveSum");
      DELLA_LAUNCH(grid_for(groups, ti.max_grid), kThreads, 0, s, apply_kernel)(p, k, kApplyCut, nullptr, w.occ, final_pass);
      launched("apply_kernel");
      DELLA_LAUNCH(1, 1, 0, s, carry_kernel)(w.flags, w.occ, E, p.state.carry + 2 * k);
      launched("carry_kernel");
      break;
    }
    default:
      break;
  }
}

}  // namespace

uint64_t slab_work_bytes(const TaskInfo& ti, uint64_t rows) {
  return slab_scratch_bytes(ti, rows) + align_up(work_layout(ti, rows, nullptr).total);
}

void fill_params(const MergeTask& t, const TaskInfo& ti, SlabParams& p) {
  p.n = ti.n;
  p.seed = t.seed;
  p.tensor_id = t.tensor_id;
  p.k = ti.k;
  p.lambda = static_cast<float>(t.lambda);
  p.apply_lambda = t.lambda != 1.0;
  p.base_dtype = t.base_dtype;
  p.out_dtype = t.out_dtype;
  p.mode = ti.mode;
  p.sparsifier = t.sparsifier;
  p.rescale = t.rescale;
  p.consensus = t.consensus;
  p.linear = t.linear;
  p.normalize = t.normalize;
  for (unsigned k = 0; k < ti.k; ++k) {
    const ExpertInput& e = t.experts[k];
    DevExpert& d = p.ex[k];
    d.dtype = e.dtype;
    d.weight = e.weight;
    d.sparse = ti.sparse[k];
    d.mode = ti.mode_k[k];
    if (t.sparsifier == Sparsifier::Magprune) d.coef = magprune_coef(e.density, e.epsilon);
    if (t.sparsifier == Sparsifier::Random) {
      d.q_random = static_cast<float>(e.density);
      d.s_random = inverse_scale(d.q_random);
    }
  }
}

void enqueue_out_check(const TaskInfo& ti, const SlabParams& p, cudaStream_t s) {
  const uint64_t E = p.rows * p.n;
  if (E == 0) return;
  DELLA_LAUNCH(grid_for(E, ti.max_grid), kThreads, 0, s, out_check_kernel)(p);
  launched("out_check_kernel");
}

void enqueue_slab(const MergeTask& t, const TaskInfo& ti, SlabParams& p, unsigned passes, char* scratch, char* work,
                  uint64_t work_bytes, cudaStream_t s) {
  const uint64_t E = p.rows * p.n;
  if (E == 0) return;
  const unsigned K = ti.k;
  // Scratch buffers: one float per element per kScratch expert, then the keep flags.
  char* q = scratch;
  for (unsigned k = 0; k < K; ++k) {
    if (ti.mode_k[k] != kScratch) continue;
    p.ex[k].scratch = reinterpret_cast<float*>(q);
    q += align_up(E * 4);
  }
  p.keep = ti.need_norm ? reinterpret_cast<uint8_t*>(q) : nullptr;
  const WorkLayout w = work_layout(ti, p.rows, work);
  if (w.total > work_bytes) throw Error(DELLA_CUDA_ERROR, "internal: slab work area too small");
  const bool breadcrumbs = t.sparsifier == Sparsifier::Breadcrumbs;
  const int cuts = breadcrumbs ? 2 : 1;

  if (passes & kInitState) {
    if (ti.need_cuts) {
      check(cudaMemsetAsync(p.state.hist1, 0, K * 32768ull * 8, s), "cudaMemsetAsync");
      if (ti.f32_keys) check(cudaMemsetAsync(p.state.hist2, 0, K * 2ull * 65536 * 8, s), "cudaMemsetAsync");
      check(cudaMemsetAsync(p.state.carry, 0, K * 2ull * 8, s), "cudaMemsetAsync");
    }
  }
  if ((passes & kPassHist1) && ti.need_cuts) {
    for (unsigned k = 0; k < K; ++k) {
      if (!ti.sparse[k]) continue;
      if (ti.shared_hist) {
        check(cudaFuncSetAttribute(hist1_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(kHistSmem)),
              "cudaFuncSetAttribute (histogram shared memory)");
        DELLA_LAUNCH(hist_grid(E), kHistThreads, kHistSmem, s, hist1_shared_kernel)(p, k, p.state.hist1 + k * 32768ull);
        launched("hist1_shared_kernel");
      } else {
        DELLA_LAUNCH(grid_for(E, ti.max_grid), kThreads, 0, s, hist1_kernel)(p, k, p.state.hist1 + k * 32768ull);
        launched("hist1_kernel");
      }
    }
  }
  if ((passes & kSelect1) && ti.need_cuts) {
    DELLA_LAUNCH(grid_for(2 * K, ti.max_grid), kThreads, 0, s, init_cuts_kernel)(p.state.cuts, K, t.sparsifier == Sparsifier::Magnitude);
    launched("init_cuts_kernel");
    for (unsigned k = 0; k < K; ++k) {
      if (!ti.sparse[k]) continue;
      for (int c = 0; c < cuts; ++c) {
        const bool desc = c == 0 && t.sparsifier == Sparsifier::Magnitude;
        DELLA_LAUNCH(1, kSelectThreads, 0, s, select_kernel)(p.state.hist1 + k * 32768ull, 32768, c == 0 ? ti.pos_a[k] : ti.pos_b[k],
                                                   desc, 1, !ti.f32_keys, p.state.cuts + 2 * k + c,
                                                   p.state.hi + 2 * k + c, p.state.remaining + 2 * k + c);
        launched("select_kernel");
      }
    }
  }
  if ((passes & kPassHist2) && ti.need_cuts && ti.f32_keys) {
    for (unsigned k = 0; k < K; ++k) {
      if (!ti.sparse[k]) continue;
      DELLA_LAUNCH(grid_for(E, ti.max_grid), kThreads, 0, s, hist2_kernel)(p, k, cuts, p.state.hist2 + k * 2ull * 65536);
      launched("hist2_kernel");
    }
  }
  if ((passes & kSelect2) && ti.need_cuts && ti.f32_keys) {
    for (unsigned k = 0; k < K; ++k) {
      if (!ti.sparse[k]) continue;
      for (int c = 0; c < cuts; ++c) {
        const bool desc = c == 0 && t.sparsifier == Sparsifier::Magnitude;
        DELLA_LAUNCH(1, kSelectThreads, 0, s, select_kernel)(p.state.hist2 + (k * 2ull + c) * 65536, 65536, 0, desc, 2, 0,
                                                   p.state.cuts + 2 * k + c, p.state.hi + 2 * k + c,
                                                   p.state.remaining + 2 * k + c);
        launched("select_kernel");
      }
    }
  }
  if ((passes & kPassNorm) && ti.need_norm) {
    if ((passes & kResetCarryNorm) && ti.need_cuts)
      check(cudaMemsetAsync(p.state.carry, 0, K * 2ull * 8, s), "cudaMemsetAsync");
    for (unsigned k = 0; k < K; ++k) {
      if (!ti.sparse[k]) continue;
      sparsify(t, ti, p, k, false, w, s);
      // A thread a row and, batched, a warp a block: rows are few (4096 for a 4096 x 4096
      // slab), and blocks of 128 put them on a quarter of an H100's multiprocessors.
      if (ti.norm_loads) DELLA_LAUNCH(grid_for(p.rows, ti.max_grid, 32), 32, 0, s, norm_rows_kernel<true>)(p, k);
      else DELLA_LAUNCH(grid_for(p.rows, ti.max_grid, 128), 128, 0, s, norm_rows_kernel<false>)(p, k);
      launched("norm_rows_kernel");
    }
  }
  if ((passes & kNormFinish) && ti.need_norm) {
    DELLA_LAUNCH(1, kMaxExperts, 0, s, norm_finish_kernel)(p, ti.rows);
    launched("norm_finish_kernel");
  }
  if (passes & kPassFinal) {
    if ((passes & kResetCarryFinal) && ti.need_cuts)
      check(cudaMemsetAsync(p.state.carry, 0, K * 2ull * 8, s), "cudaMemsetAsync");
    if (ti.fused_row && aligned_slab(p, 16)) {
      if (ti.half == DType::BF16) launch_della_row<DType::BF16>(p, s);
      else launch_della_row<DType::F16>(p, s);
      launched("della_row_kernel");
      return;
    }
    for (unsigned k = 0; k < K; ++k)
      if (ti.mode_k[k] == kScratch) sparsify(t, ti, p, k, true, w, s);
    const uint64_t groups = ((p.row0 * p.n + E - 1) >> 2) - ((p.row0 * p.n) >> 2) + 1;
    if (ti.cut_fused) {  // task_info's conditions; the pointers are checked here
      if (E >= (1ull << 33) || !aligned_slab(p, 8))
        throw Error(DELLA_CUDA_ERROR, "internal: a slab for the fused cut kernels is not 8-byte aligned");
      if (ti.half == DType::BF16) launch_cut_fuse<DType::BF16>(ti, p, w.counts, w.first_a, w.first_b, grid_for(groups, ti.max_grid), s);
      else launch_cut_fuse<DType::F16>(ti, p, w.counts, w.first_a, w.first_b, grid_for(groups, ti.max_grid), s);
      return;
    }
    if (ti.fuse_fixed && E < (1ull << 33) && aligned_slab(p, 8)) {
      if (ti.half == DType::BF16) launch_fuse_fixed<DType::BF16>(p, grid_for(groups, ti.max_grid), s);
      else launch_fuse_fixed<DType::F16>(p, grid_for(groups, ti.max_grid), s);
    } else if (ti.fast_fuse && E < (1ull << 33) && aligned_slab(p, 8)) {
      if (ti.half == DType::BF16) DELLA_LAUNCH(grid_for(groups, ti.max_grid), kThreads, 0, s, fuse_half_kernel<DType::BF16>)(p);
      else DELLA_LAUNCH(grid_for(groups, ti.max_grid), kThreads, 0, s, fuse_half_kernel<DType::F16>)(p);
    } else if (K <= 4) DELLA_LAUNCH(grid_for(groups, ti.max_grid), kThreads, 0, s, fuse_kernel<4>)(p);
    else DELLA_LAUNCH(grid_for(groups, ti.max_grid), kThreads, 0, s, fuse_kernel<kMaxExperts>)(p);
    launched("fuse_kernel");
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace della
