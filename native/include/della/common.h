// Shared by the CPU kernels and the CUDA plugin: no Node, no I/O, no allocation.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DELLA_HD __host__ __device__ __forceinline__
#else
#define DELLA_HD inline
#endif

namespace della {

DELLA_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

DELLA_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

}  // namespace della
