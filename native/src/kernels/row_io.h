// Row loads for the CPU passes: fp32 values, deltas and magnitude keys of one row,
// written as plain loops with selects so that each caller's SIMD build vectorizes them.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "della/dtype.h"
#include "fuse_row.h"

// A hot row function is built three times (AVX-512, AVX2, baseline x86-64) and the
// loader picks the one the CPU supports; every version does the same fp32 operations
// in the same order (no FMA: -ffp-contract=off), so all give the same bytes.
// DELLA_FIXED_SIMD (a test build: see CMakeLists.txt) turns the dispatch off, so that
// the code compiled for the build's own flags runs, whatever the CPU.
// GCC 12 names the x86-64 levels; GCC 10 and 11 (Debian 11, where the release binary is
// built, and Ubuntu 22.04) cannot dispatch on them, nor on AVX-512BW, so their clones
// are AVX-512F and AVX2.
// Clang names no x86-64 levels in target_clones either; it has AVX-512F and AVX2 clones
// from clang 14 (older: one baseline build, correct but several times slower).
// AddressSanitizer builds have no clones (their resolvers would run before ASan starts).
#if defined(__SANITIZE_ADDRESS__)
#define DELLA_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DELLA_ASAN 1
#endif
#endif
#if defined(__x86_64__) && defined(__GNUC__) && (!defined(__clang__) || __clang_major__ >= 14)
#define DELLA_X86_DISPATCH 1
#endif
#if defined(DELLA_X86_DISPATCH) && !defined(DELLA_ASAN) && !defined(DELLA_FIXED_SIMD)
#if __GNUC__ >= 12
#define DELLA_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define DELLA_SIMD_CLONE_HIGH "x86-64-v4"
#define DELLA_SIMD_CLONE_MID "x86-64-v3"
#else
#define DELLA_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define DELLA_SIMD_CLONE_HIGH "avx512f"
#define DELLA_SIMD_CLONE_MID "avx2"
#endif
#define DELLA_HAS_SIMD_CLONES 1
#else
#define DELLA_SIMD_CLONES
#endif

// Hand-written AVX-512 paths, taken when the CPU has AVX-512F (and not in a fixed build).
#if defined(DELLA_X86_DISPATCH) && !defined(DELLA_FIXED_SIMD)
#define DELLA_AVX512_PATHS 1
#endif

namespace della::detail {

// F16 rows through the F16C instructions when the CPU has them (f16_rows.cc): the same
// bits as the select code below, about an order of magnitude fewer instructions.
#if defined(DELLA_X86_DISPATCH) && !defined(DELLA_FIXED_SIMD)
#define DELLA_F16C_PATHS 1
bool have_f16c();
// Halves to fp32; returns how many are not finite.
uint64_t f16_to_f32_row(const uint8_t* src, uint64_t n, float* dst);
// fp32 to halves (RNE, NaN as the canonical 0x7e00).
void f32_to_f16_row(const float* v, uint64_t n, uint8_t* dst);
// The F16 magnitude keys of SPEC §4: the half pattern of each value without its sign.
void f16_keys_row(const float* d, uint64_t n, uint16_t* k16);
#endif

#if defined(DELLA_AVX512_PATHS)
// BF16 rows with AVX-512BW, and with AVX-512 BF16 for keys and stores, when the CPU has
// them (bf16_rows.cc): the same bits as the code below (bf16_key, f32_to_bf16), a third
// of the instructions.
bool have_avx512_bw();
bool have_avx512_bf16();
// BF16 values to fp32; returns how many are not finite. n below 2^32.
uint64_t bf16_to_f32_row(const uint8_t* src, uint64_t n, float* dst);
// d = E - B for a BF16 expert row; returns how many E are not finite.
uint64_t bf16_deltas_row(const uint8_t* src, uint64_t n, const float* b, float* d);
// The BF16 keys of fp32 values.
void bf16_keys_row(const float* d, uint64_t n, uint16_t* k16);
// The same keys without storing the deltas.
void bf16_delta_keys_row(const uint8_t* src, uint64_t n, const float* b, uint16_t* k16);
// fp32 to BF16 (RNE, NaN as the canonical 0x7fc0).
void f32_to_bf16_row(const float* v, uint64_t n, uint8_t* dst);
#endif

// Picks a where c, else b, by a bit mask: plain ?: on computed values can keep control
// flow that stops GCC vectorizing the loop around it.
DELLA_ALWAYS_INLINE uint32_t select_u32(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

// f16_to_f32 with selects instead of early returns, so loops over it vectorize.
DELLA_ALWAYS_INLINE float f16_to_f32_select(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  const uint32_t normal = sign | ((exp + 112u) << 23) | (man << 13);
  const uint32_t special = sign | 0x7f800000u | (man << 13);
  // Subnormal: man * 2^-24 is exact in fp32 (+0 for man 0).
  const uint32_t sub = sign | f32_bits(static_cast<float>(static_cast<int32_t>(man)) * 5.9604644775390625e-08f);
  return bits_f32(select_u32(exp == 0, sub, select_u32(exp == 0x1fu, special, normal)));
}

template <DType DT>
DELLA_ALWAYS_INLINE float load_elem(const uint8_t* p, uint64_t j) {
  if constexpr (DT == DType::F32) return load_raw<float>(p, j);
  else if constexpr (DT == DType::BF16) return bf16_to_f32(load_raw<uint16_t>(p, j));
  else if constexpr (DT == DType::F16) return f16_to_f32_select(load_raw<uint16_t>(p, j));
  else return static_cast<float>(load_raw<double>(p, j));
}

// f32_to_f16 (RNE, subnormals, NaN -> quiet NaN) with every case computed and one
// picked by masks, so loops over it vectorize; kernel_tests compares the two over the
// whole fp32 range.
DELLA_ALWAYS_INLINE uint16_t f32_to_f16_select(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  const uint32_t r = ax - 0x38000000u;
  const uint32_t normal = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;
  // Subnormal half: the 24-bit significand shifted right by 126 - exponent (14..24),
  // clamped so that lanes which take another case shift by a valid amount.
  const int32_t sh0 = 126 - static_cast<int32_t>(ax >> 23);
  const int32_t sh1 = sh0 < 14 ? 14 : sh0;
  const uint32_t shift = static_cast<uint32_t>(sh1 > 24 ? 24 : sh1);
  const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  const uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  // Round up iff rem > half, or rem == half and q is odd: iff rem + (q & 1) > half,
  // read from the sign of the difference (both sides are below 2^25).
  const uint32_t sub = q + ((half - (rem + (q & 1u))) >> 31);
  uint32_t out = select_u32(ax < 0x33000000u, 0u, sub);
  out = select_u32(ax >= 0x38800000u, normal, out);
  out = select_u32(ax >= 0x477ff000u, 0x7c00u, out);
  // NaN: the canonical quiet NaN, without the sign (see dtype.h).
  return static_cast<uint16_t>(select_u32(ax > 0x7f800000u, 0x7e00u, sign | out));
}

// The BF16 magnitude key of SPEC §4 with selects only.
DELLA_ALWAYS_INLINE uint16_t bf16_key(float v) {
  const uint32_t x = f32_bits(v) & 0x7fffffffu;
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((x > 0x7f800000u ? 0x7fc0u : rounded) & 0x7fffu);  // every NaN one key
}

// Loads n elements as fp32 into dst; returns how many are not finite. (Counts are
// 32-bit inside, per chunk below 2^32: 64-bit lanes would widen every vector step.)
template <DType DT>
DELLA_ALWAYS_INLINE uint64_t load_values(const uint8_t* __restrict src, uint64_t n, float* __restrict dst) {
  uint64_t bad = 0;
  for (uint64_t j0 = 0; j0 < n; j0 += 1ull << 31) {
    const uint64_t j1 = n - j0 < (1ull << 31) ? n : j0 + (1ull << 31);
    uint32_t b = 0;
    for (uint64_t j = j0; j < j1; ++j) {
      const float v = load_elem<DT>(src, j);
      dst[j] = v;
      b += !is_finite_f32(v);
    }
    bad += b;
  }
  return bad;
}

// d = E - B; keys when asked for (SPEC §4: the half-precision pattern of |d| without
// its sign bit, which equals the pattern of d rounded, sign cleared). One row: n is
// below 2^32 (validate_task), so the count is 32-bit.
template <DType DT, int KEYS>  // KEYS: 0 none, 1 BF16, 2 F16, 3 F32
DELLA_ALWAYS_INLINE uint64_t deltas(const uint8_t* __restrict src, uint64_t n, const float* __restrict b,
                                    float* __restrict d, uint16_t* __restrict k16, uint32_t* __restrict k32) {
  uint32_t bad = 0;
  for (uint64_t j = 0; j < n; ++j) {
    const float v = load_elem<DT>(src, j);
    bad += !is_finite_f32(v);
    const float dv = v - b[j];
    d[j] = dv;
    if constexpr (KEYS == 1) k16[j] = bf16_key(dv);
  }
  if constexpr (KEYS == 2)
    for (uint64_t j = 0; j < n; ++j) k16[j] = static_cast<uint16_t>(f32_to_f16_select(d[j]) & 0x7fffu);
  if constexpr (KEYS == 3)
    for (uint64_t j = 0; j < n; ++j) k32[j] = magnitude_key(d[j], KeyMode::F32);
  return bad;
}

// The half-precision keys of a row's deltas E - B, without storing the deltas (for the
// key histograms of the TIES pre-pass).
template <DType DT, int KEYS>  // KEYS: 1 BF16, 2 F16
DELLA_ALWAYS_INLINE void delta_keys(const uint8_t* __restrict src, uint64_t n, const float* __restrict b,
                                    uint16_t* __restrict k16) {
  for (uint64_t j = 0; j < n; ++j) {
    const float dv = load_elem<DT>(src, j) - b[j];
    k16[j] = static_cast<uint16_t>(KEYS == 1 ? bf16_key(dv) : (f32_to_f16_select(dv) & 0x7fffu));
  }
}

// How many of a row's deltas E - B have half-precision key ka, and how many kb (the
// cut keys of a whole-tensor magnitude cut), straight from the inputs: nothing stored.
template <DType DT, int KEYS>  // KEYS: 1 BF16, 2 F16
DELLA_ALWAYS_INLINE void count_cut_keys(const uint8_t* __restrict src, uint64_t n, const float* __restrict b,
                                        uint32_t ka, uint32_t kb, uint64_t& a, uint64_t& bb) {
  uint32_t ca = 0, cb = 0;  // a row is far shorter than 2^32
  for (uint64_t j = 0; j < n; ++j) {
    const float dv = load_elem<DT>(src, j) - b[j];
    const uint32_t key = KEYS == 1 ? bf16_key(dv) : (f32_to_f16_select(dv) & 0x7fffu);
    ca += key == ka;
    cb += key == kb;
  }
  a = ca;
  bb = cb;
}

template <int KEYS>
DELLA_ALWAYS_INLINE void count_cut_keys_any(DType dt, const uint8_t* src, uint64_t n, const float* b, uint32_t ka,
                                            uint32_t kb, uint64_t& a, uint64_t& bb) {
  switch (dt) {
    case DType::F32: return count_cut_keys<DType::F32, KEYS>(src, n, b, ka, kb, a, bb);
    case DType::F16: return count_cut_keys<DType::F16, KEYS>(src, n, b, ka, kb, a, bb);
    case DType::BF16: return count_cut_keys<DType::BF16, KEYS>(src, n, b, ka, kb, a, bb);
    default: return count_cut_keys<DType::F64, KEYS>(src, n, b, ka, kb, a, bb);
  }
}

#if defined(DELLA_F16C_PATHS)
// With F16C: the deltas of a row with F16 values or F16 keys, in passes over the row
// (conversion, subtraction, keys) instead of one loop of selects.
template <int KEYS>
DELLA_ALWAYS_INLINE uint64_t deltas_f16c(DType dt, const uint8_t* src, uint64_t n, const float* __restrict b,
                                         float* __restrict d, uint16_t* __restrict k16, uint32_t* __restrict k32) {
  uint64_t bad;
  if (dt == DType::F16) {
    bad = f16_to_f32_row(src, n, d);
    for (uint64_t j = 0; j < n; ++j) d[j] = d[j] - b[j];
  } else {
    switch (dt) {
      case DType::F32: bad = deltas<DType::F32, 0>(src, n, b, d, k16, k32); break;
      case DType::BF16: bad = deltas<DType::BF16, 0>(src, n, b, d, k16, k32); break;
      default: bad = deltas<DType::F64, 0>(src, n, b, d, k16, k32); break;
    }
  }
  if constexpr (KEYS == 1)
    for (uint64_t j = 0; j < n; ++j) k16[j] = bf16_key(d[j]);
  if constexpr (KEYS == 2) f16_keys_row(d, n, k16);
  if constexpr (KEYS == 3)
    for (uint64_t j = 0; j < n; ++j) k32[j] = magnitude_key(d[j], KeyMode::F32);
  return bad;
}
#endif

template <int KEYS>
DELLA_ALWAYS_INLINE uint64_t deltas_any(DType dt, const uint8_t* src, uint64_t n, const float* b, float* d,
                                        uint16_t* k16, uint32_t* k32) {
#if defined(DELLA_AVX512_PATHS)
  // BF16 keys in a second loop over d, still in the cache (delta_pass.cc passes chunks of
  // 256 values where it prefetches the next row).
  if constexpr (KEYS == 1) {
    if (have_avx512_bf16()) {
      const uint64_t bad = deltas_any<0>(dt, src, n, b, d, k16, k32);
      bf16_keys_row(d, n, k16);
      return bad;
    }
  }
#endif
#if defined(DELLA_F16C_PATHS)
  if ((dt == DType::F16 || KEYS == 2) && have_f16c()) return deltas_f16c<KEYS>(dt, src, n, b, d, k16, k32);
#endif
#if defined(DELLA_AVX512_PATHS)
  if (KEYS == 0 && dt == DType::BF16 && have_avx512_bw()) return bf16_deltas_row(src, n, b, d);
#endif
  switch (dt) {
    case DType::F32: return deltas<DType::F32, KEYS>(src, n, b, d, k16, k32);
    case DType::F16: return deltas<DType::F16, KEYS>(src, n, b, d, k16, k32);
    case DType::BF16: return deltas<DType::BF16, KEYS>(src, n, b, d, k16, k32);
    default: return deltas<DType::F64, KEYS>(src, n, b, d, k16, k32);
  }
}

// fn(j0, j1) over a row's elements [0, n) in chunks, each chunk preceded by a prefetch of
// the same span of the next row's bytes (`next`, elements of `es` bytes; null: none),
// so that the next row's loads find their lines in the cache: the hardware prefetchers
// stop at every 4 KiB page of a mapped input, and each row's first loads had waited on
// memory. Into L2 (prefetcht2): with prefetcht0 the prefetches waited for L1 fill
// buffers (a tenth of the bracket pass's samples). Chunks of 256 (8 lines of 2-byte
// inputs) measured a little faster than 512 and 128.
template <class Fn>
DELLA_ALWAYS_INLINE void with_next_row(const uint8_t* next, uint64_t es, uint64_t n, Fn&& fn) {
  constexpr uint64_t kChunk = 256;
  if (next == nullptr || n < 2 * kChunk) {
    if (next != nullptr)
      for (uint64_t b = 0; b < n * es; b += 64) __builtin_prefetch(next + b, 0, 1);
    fn(uint64_t{0}, n);
    return;
  }
  for (uint64_t j0 = 0; j0 < n; j0 += kChunk) {
    const uint64_t j1 = n - j0 < kChunk ? n : j0 + kChunk;
    for (uint64_t b = j0 * es; b < j1 * es; b += 64) __builtin_prefetch(next + b, 0, 1);
    fn(j0, j1);
  }
}

// tmp: room for n floats (used with F16C).
template <int KEYS>
DELLA_ALWAYS_INLINE void delta_keys_any(DType dt, const uint8_t* src, uint64_t n, const float* b, uint16_t* k16,
                                        float* tmp) {
#if defined(DELLA_F16C_PATHS)
  if ((dt == DType::F16 || KEYS == 2) && have_f16c()) {
    deltas_f16c<KEYS>(dt, src, n, b, tmp, k16, nullptr);
    return;
  }
#else
  (void)tmp;
#endif
#if defined(DELLA_AVX512_PATHS)
  if (KEYS == 1 && dt == DType::BF16 && have_avx512_bf16()) return bf16_delta_keys_row(src, n, b, k16);
#endif
  switch (dt) {
    case DType::F32: return delta_keys<DType::F32, KEYS>(src, n, b, k16);
    case DType::F16: return delta_keys<DType::F16, KEYS>(src, n, b, k16);
    case DType::BF16: return delta_keys<DType::BF16, KEYS>(src, n, b, k16);
    default: return delta_keys<DType::F64, KEYS>(src, n, b, k16);
  }
}

DELLA_ALWAYS_INLINE uint64_t load_any(DType dt, const uint8_t* src, uint64_t n, float* dst) {
#if defined(DELLA_F16C_PATHS)
  if (dt == DType::F16 && have_f16c()) return f16_to_f32_row(src, n, dst);
#endif
#if defined(DELLA_AVX512_PATHS)
  if (dt == DType::BF16 && n < (1ull << 32) && have_avx512_bw()) return bf16_to_f32_row(src, n, dst);
#endif
  switch (dt) {
    case DType::F32: return load_values<DType::F32>(src, n, dst);
    case DType::F16: return load_values<DType::F16>(src, n, dst);
    case DType::BF16: return load_values<DType::BF16>(src, n, dst);
    default: return load_values<DType::F64>(src, n, dst);
  }
}

// The indices of the flags set among flags[0..count) (bytes of 0 or 1; count a
// multiple of 8), in
// order, into list; returns how many. Eight flags per load: touched blocks are few
// and clustered, and a branch per flag would mispredict on every cluster edge.
inline uint32_t nonzero_flags(const uint8_t* flags, uint32_t count, uint16_t* list) {
  uint32_t m = 0;
  for (uint32_t b = 0; b < count; b += 8) {
    uint64_t w;
    std::memcpy(&w, flags + b, 8);
    while (w) {
      list[m++] = static_cast<uint16_t>(b + (__builtin_ctzll(w) >> 3));
      w &= w - 1;
    }
  }
  return m;
}

// Rounds n fp32 values to dtype dt (RNE, SPEC §1) into dst.
template <DType DT>
DELLA_ALWAYS_INLINE void store_values(const float* __restrict v, uint64_t n, uint8_t* __restrict dst) {
  for (uint64_t j = 0; j < n; ++j) {
    if constexpr (DT == DType::F32) store_raw<uint32_t>(dst, j, f32_out_bits(v[j]));
    else if constexpr (DT == DType::F16) store_raw<uint16_t>(dst, j, f32_to_f16_select(v[j]));
    else if constexpr (DT == DType::BF16) store_raw<uint16_t>(dst, j, f32_to_bf16(v[j]));
    else store_raw<uint64_t>(dst, j, f64_out_bits(v[j]));
  }
}

DELLA_ALWAYS_INLINE void store_any(DType dt, const float* v, uint64_t n, uint8_t* dst) {
#if defined(DELLA_F16C_PATHS)
  if (dt == DType::F16 && have_f16c()) return f32_to_f16_row(v, n, dst);
#endif
#if defined(DELLA_AVX512_PATHS)
  if (dt == DType::BF16 && have_avx512_bf16()) return f32_to_bf16_row(v, n, dst);
#endif
  switch (dt) {
    case DType::F32: store_values<DType::F32>(v, n, dst); break;
    case DType::F16: store_values<DType::F16>(v, n, dst); break;
    case DType::BF16: store_values<DType::BF16>(v, n, dst); break;
    default: store_values<DType::F64>(v, n, dst); break;
  }
}

// How many of n stored values at dst are NaN or infinite (stored_nonfinite), run on a
// row just stored, while it is in cache. One loop per dtype so that each vectorizes.
template <DType DT>
DELLA_ALWAYS_INLINE uint64_t count_stored_nonfinite(const uint8_t* __restrict dst, uint64_t n) {
  uint64_t c = 0;
  for (uint64_t j = 0; j < n; ++j) c += stored_nonfinite(dst, DT, j);
  return c;
}

inline uint64_t count_stored_nonfinite_any(DType dt, const uint8_t* dst, uint64_t n) {
  switch (dt) {
    case DType::F32: return count_stored_nonfinite<DType::F32>(dst, n);
    case DType::F16: return count_stored_nonfinite<DType::F16>(dst, n);
    case DType::BF16: return count_stored_nonfinite<DType::BF16>(dst, n);
    default: return count_stored_nonfinite<DType::F64>(dst, n);
  }
}

template <class T>
T* grown(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

}  // namespace della::detail
