// The parts of CUB the CUDA backend uses, for the emulated device (cuda_runtime.h here):
// the same results (cub's radix ranks and sorts are stable, over the blocked
// arrangement) computed plainly. A block collective deposits every thread's items in its
// TempStorage, meets at a barrier, lets thread 0 compute, meets again, and hands each
// thread its results. Like cub's, it leaves the storage in use when it returns: a caller
// that reuses the storage without __syncthreads() first breaks here too.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "cuda_runtime.h"

namespace cub {

struct NullType {};

template <class KeyT>
struct BFEDigitExtractor {
  unsigned bit_start, mask;
  BFEDigitExtractor(unsigned start, unsigned bits) : bit_start(start), mask((1u << bits) - 1u) {}
  unsigned Digit(KeyT key) const { return static_cast<unsigned>(key >> bit_start) & mask; }
};

namespace emu {

// Stable order of n items by bits [begin, end) of their keys.
template <class KeyT>
std::vector<uint32_t> stable_order(const KeyT* keys, int n, int begin, int end) {
  const int bits = end - begin;
  const uint64_t mask = bits >= 64 ? ~0ull : ((1ull << bits) - 1);
  std::vector<uint32_t> order(n);
  std::iota(order.begin(), order.end(), 0u);
  std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
    return ((static_cast<uint64_t>(keys[a]) >> begin) & mask) < ((static_cast<uint64_t>(keys[b]) >> begin) & mask);
  });
  return order;
}

}  // namespace emu

// BlockRadixSort: keys (and values) in the blocked arrangement, sorted by their bits
// [begin_bit, end_bit), stable; afterwards thread t holds sorted positions
// [t * ITEMS, t * ITEMS + ITEMS).
template <class KeyT, int THREADS, int ITEMS, class ValueT = NullType, int RADIX_BITS = 4>
class BlockRadixSort {
  static constexpr int N = THREADS * ITEMS;
  static constexpr bool kValues = !std::is_same<ValueT, NullType>::value;

 public:
  struct TempStorage {
    KeyT keys[N];
    ValueT values[kValues ? N : 1];
  };
  explicit BlockRadixSort(TempStorage& t) : t_(t) {}

  void Sort(KeyT (&keys)[ITEMS], ValueT (&values)[ITEMS], int begin_bit = 0, int end_bit = sizeof(KeyT) * 8) {
    run(keys, values, begin_bit, end_bit);
  }
  void Sort(KeyT (&keys)[ITEMS], int begin_bit = 0, int end_bit = sizeof(KeyT) * 8) {
    run(keys, nullptr, begin_bit, end_bit);
  }

 private:
  void run(KeyT (&keys)[ITEMS], ValueT* values, int begin_bit, int end_bit) {
    della_emu::collective_enter(&t_, sizeof t_);
    const int base = static_cast<int>(threadIdx.x) * ITEMS;
    for (int s = 0; s < ITEMS; ++s) {
      t_.keys[base + s] = keys[s];
      if constexpr (kValues) if (values) t_.values[base + s] = values[s];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const std::vector<uint32_t> order = emu::stable_order(t_.keys, N, begin_bit, end_bit);
      std::vector<KeyT> k(N);
      for (int i = 0; i < N; ++i) k[i] = t_.keys[order[i]];
      std::copy(k.begin(), k.end(), t_.keys);
      if constexpr (kValues) {
        std::vector<ValueT> v(N);
        for (int i = 0; i < N; ++i) v[i] = t_.values[order[i]];
        std::copy(v.begin(), v.end(), t_.values);
      }
    }
    __syncthreads();
    for (int s = 0; s < ITEMS; ++s) {
      keys[s] = t_.keys[base + s];
      if constexpr (kValues) if (values) values[s] = t_.values[base + s];
    }
  }
  TempStorage& t_;
};

// BlockRadixRank: each key's stable rank by one digit over the blocked arrangement.
template <int THREADS, int RADIX_BITS, bool IS_DESCENDING>
class BlockRadixRank {
  static constexpr int kDigits = 1 << RADIX_BITS;

 public:
  static_assert(RADIX_BITS <= 8 && THREADS * 32 <= 65536, "digits fit 8 bits, ranks 16");
  template <int ITEMS>
  struct Storage {
    uint16_t rank[THREADS * ITEMS];
    uint8_t digit[THREADS * ITEMS];
  };
  // Sized for 32 items a thread, the most the backend ranks; checked in RankKeys.
  struct TempStorage {
    alignas(4) unsigned char bytes[sizeof(Storage<32>)];
  };
  explicit BlockRadixRank(TempStorage& t) : t_(t) {}

  template <class KeyT, int ITEMS, class Extractor>
  void RankKeys(KeyT (&keys)[ITEMS], int (&ranks)[ITEMS], Extractor x) {
    static_assert(ITEMS <= 32, "emulated BlockRadixRank: at most 32 items a thread");
    constexpr int N = THREADS * ITEMS;
    della_emu::collective_enter(&t_, sizeof t_);
    auto& st = *reinterpret_cast<Storage<ITEMS>*>(t_.bytes);
    const int base = static_cast<int>(threadIdx.x) * ITEMS;
    for (int s = 0; s < ITEMS; ++s) st.digit[base + s] = static_cast<uint8_t>(x.Digit(keys[s]));
    __syncthreads();
    if (threadIdx.x == 0) {
      int start[kDigits] = {};
      for (int i = 0; i < N; ++i) ++start[st.digit[i]];
      int at = 0;
      for (int d = 0; d < kDigits; ++d) {
        const int dd = IS_DESCENDING ? kDigits - 1 - d : d;
        const int c = start[dd];
        start[dd] = at;
        at += c;
      }
      for (int i = 0; i < N; ++i) st.rank[i] = static_cast<uint16_t>(start[st.digit[i]]++);
    }
    __syncthreads();
    for (int s = 0; s < ITEMS; ++s) ranks[s] = st.rank[base + s];
  }

 private:
  TempStorage& t_;
};

// BlockExchange: items to the blocked positions their ranks name.
template <class T, int THREADS, int ITEMS>
class BlockExchange {
 public:
  struct TempStorage {
    T items[THREADS * ITEMS];
  };
  explicit BlockExchange(TempStorage& t) : t_(t) {}
  template <class OffsetT>
  void ScatterToBlocked(T (&items)[ITEMS], OffsetT (&ranks)[ITEMS]) {
    della_emu::collective_enter(&t_, sizeof t_);
    for (int s = 0; s < ITEMS; ++s) {
      if (ranks[s] < 0 || ranks[s] >= THREADS * ITEMS) della_emu::kernel_fault("BlockExchange::ScatterToBlocked: a rank out of range");
      t_.items[ranks[s]] = items[s];
    }
    __syncthreads();
    const int base = static_cast<int>(threadIdx.x) * ITEMS;
    for (int s = 0; s < ITEMS; ++s) items[s] = t_.items[base + s];
  }

 private:
  TempStorage& t_;
};

template <class T, int THREADS>
class BlockScan {
 public:
  struct TempStorage {
    T v[THREADS];
    T total;
  };
  explicit BlockScan(TempStorage& t) : t_(t) {}
  void ExclusiveSum(T input, T& output, T& block_aggregate) {
    della_emu::collective_enter(&t_, sizeof t_);
    t_.v[threadIdx.x] = input;
    __syncthreads();
    if (threadIdx.x == 0) {
      T sum = T();
      for (int i = 0; i < THREADS; ++i) {
        const T x = t_.v[i];
        t_.v[i] = sum;
        sum = sum + x;
      }
      t_.total = sum;
    }
    __syncthreads();
    output = t_.v[threadIdx.x];
    block_aggregate = t_.total;
  }

 private:
  TempStorage& t_;
};

// Device-wide algorithms: queued on the stream, run on the host (the emulated device's
// memory is the host's); a call without temporary storage asks its size.
struct DeviceSegmentedRadixSort {
  template <class KeyT, class OffsetT>
  static cudaError_t SortKeys(void* temp, size_t& temp_bytes, const KeyT* in, KeyT* out, int num_items,
                              int num_segments, OffsetT begin_offsets, OffsetT end_offsets, int begin_bit = 0,
                              int end_bit = sizeof(KeyT) * 8, cudaStream_t stream = nullptr) {
    if (temp == nullptr) {
      temp_bytes = 256;
      return cudaSuccess;
    }
    if (num_items < 0 || num_segments < 0) return cudaErrorInvalidValue;
    della_emu::enqueue(stream, [=] {
      for (int s = 0; s < num_segments; ++s) {
        const int b = begin_offsets[s], e = end_offsets[s];
        if (e <= b) continue;
        const std::vector<uint32_t> order = emu::stable_order(in + b, e - b, begin_bit, end_bit);
        for (int i = 0; i < e - b; ++i) out[b + i] = in[b + order[i]];
      }
    });
    return cudaSuccess;
  }
};

struct DeviceScan {
  template <class InT, class OutT, class NumT>
  static cudaError_t ExclusiveSum(void* temp, size_t& temp_bytes, InT in, OutT out, NumT num_items,
                                  cudaStream_t stream = nullptr) {
    if (temp == nullptr) {
      temp_bytes = 256;
      return cudaSuccess;
    }
    using V = typename std::remove_cv<typename std::remove_pointer<OutT>::type>::type;
    della_emu::enqueue(stream, [=] {
      V sum = V();
      for (NumT i = 0; i < num_items; ++i) {
        const V x = in[i];  // in and out may be the same buffer
        out[i] = sum;
        sum = sum + x;
      }
    });
    return cudaSuccess;
  }
};

}  // namespace cub
