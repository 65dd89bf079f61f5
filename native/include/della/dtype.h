// Exact loads and round-to-nearest-even stores between fp32 and the stored dtypes.
#pragma once
#include "della/common.h"

namespace della {

enum class DType : uint8_t { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

DELLA_HD unsigned dtype_size(DType t) {
  return t == DType::F64 ? 8u : (t == DType::F32 ? 4u : 2u);
}

DELLA_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return bits_f32(sign);
  // Subnormal: man * 2^-24 is exact in fp32.
  const float v = static_cast<float>(man) * 5.9604644775390625e-08f;
  return sign ? -v : v;
}

// NaN results are stored as the dtype's canonical quiet NaN, positive and without a
// payload (F32 7fc00000, F16 7e00, BF16 7fc0, F64 7ff8000000000000), and every NaN
// has the same magnitude key: the sign and payload of a NaN depend on the hardware
// (x86 and CUDA make different ones) and on JavaScript's engine, so they are not
// allowed to reach the bytes (the output of a --allow-nonfinite merge).
constexpr uint32_t kCanonicalNan32 = 0x7fc00000u;
constexpr uint64_t kCanonicalNan64 = 0x7ff8000000000000ull;

DELLA_HD bool is_nan_f32(float v) { return (f32_bits(v) & 0x7fffffffu) > 0x7f800000u; }

DELLA_HD uint16_t f32_to_f16(float f) {
  const uint32_t x = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7e00u;               // NaN: the canonical quiet NaN
  if (ax >= 0x477ff000u) return sign | 0x7c00u;       // >= 65520 rounds to infinity
  if (ax >= 0x38800000u) {                            // normal half
    const uint32_t r = ax - 0x38000000u;
    return sign | static_cast<uint16_t>((r + 0xfffu + ((r >> 13) & 1u)) >> 13);
  }
  if (ax < 0x33000000u) return sign;                  // below 2^-25: rounds to zero
  // Subnormal half: round the 24-bit significand right by 126 - exp (14..24 bits).
  const uint32_t e = ax >> 23;
  const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;
  uint32_t r = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (r & 1u))) ++r;
  return sign | static_cast<uint16_t>(r);
}

DELLA_HD float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

DELLA_HD uint16_t f32_to_bf16(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;  // NaN: the canonical quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Tensors inside safetensors files need not be aligned to their element size, so
// every access goes through memcpy (a plain load once compiled).
template <class T>
DELLA_HD T load_raw(const void* p, uint64_t i) {
  T v;
  std::memcpy(&v, static_cast<const char*>(p) + i * sizeof(T), sizeof(T));
  return v;
}

template <class T>
DELLA_HD void store_raw(void* p, uint64_t i, T v) {
  std::memcpy(static_cast<char*>(p) + i * sizeof(T), &v, sizeof(T));
}

DELLA_HD float load_f32(const void* p, DType t, uint64_t i) {
  switch (t) {
    case DType::F32: return load_raw<float>(p, i);
    case DType::F16: return f16_to_f32(load_raw<uint16_t>(p, i));
    case DType::BF16: return bf16_to_f32(load_raw<uint16_t>(p, i));
    default: return static_cast<float>(load_raw<double>(p, i));  // RNE
  }
}

// The bits an fp32 result is stored as in an F32 or F64 tensor: NaN as the canonical
// NaN, by a mask rather than a branch so that store loops vectorize.
DELLA_HD uint32_t f32_out_bits(float v) {
  const uint32_t nan = 0u - static_cast<uint32_t>(is_nan_f32(v));
  return (kCanonicalNan32 & nan) | (f32_bits(v) & ~nan);
}

DELLA_HD uint64_t f64_out_bits(float v) {
  const double d = static_cast<double>(v);
  uint64_t bits;
  std::memcpy(&bits, &d, sizeof bits);
  const uint64_t nan = 0ull - static_cast<uint64_t>(is_nan_f32(v));
  return (kCanonicalNan64 & nan) | (bits & ~nan);
}

DELLA_HD void store_f32(void* p, DType t, uint64_t i, float v) {
  switch (t) {
    case DType::F32: store_raw<uint32_t>(p, i, f32_out_bits(v)); break;
    case DType::F16: store_raw<uint16_t>(p, i, f32_to_f16(v)); break;
    case DType::BF16: store_raw<uint16_t>(p, i, f32_to_bf16(v)); break;
    default: store_raw<uint64_t>(p, i, f64_out_bits(v)); break;
  }
}

DELLA_HD bool is_finite_f32(float v) { return (f32_bits(v) & 0x7f800000u) != 0x7f800000u; }

// Whether element i of a stored tensor is NaN or an infinity, read from its bits (all
// exponent bits set). A finite fp32 result beyond the output dtype's range (F16 from
// 65520 up) is stored as an infinity: counting stored values catches that overflow.
DELLA_HD bool stored_nonfinite(const void* p, DType t, uint64_t i) {
  switch (t) {
    case DType::F32: return (load_raw<uint32_t>(p, i) & 0x7f800000u) == 0x7f800000u;
    case DType::F16: return (load_raw<uint16_t>(p, i) & 0x7c00u) == 0x7c00u;
    case DType::BF16: return (load_raw<uint16_t>(p, i) & 0x7f80u) == 0x7f80u;
    default: return (load_raw<uint64_t>(p, i) & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
  }
}

// Ranking keys (SPEC §4): monotone in |v|. Half-precision keys are 15 bits.
enum class KeyMode : uint8_t { F32 = 0, F16 = 1, BF16 = 2 };

DELLA_HD uint32_t magnitude_key(float v, KeyMode m) {
  const float a = bits_f32(f32_bits(v) & 0x7fffffffu);
  switch (m) {
    case KeyMode::F16: return f32_to_f16(a) & 0x7fffu;
    case KeyMode::BF16: return f32_to_bf16(a) & 0x7fffu;
    default: return is_nan_f32(a) ? kCanonicalNan32 : f32_bits(a);
  }
}

}  // namespace della
