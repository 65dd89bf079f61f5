// Philox4x32-10 blocks for the CPU passes (SPEC §3): AVX-512 when the CPU has it, 32
// blocks per step, else a loop the compiler vectorizes for AVX2 or plain x86-64. All
// give philox4x32_10's words exactly (kernel_tests compares them).
#include <cstring>

#include "della/philox.h"
#include "merge_state.h"
#include "philox_avx512.h"
#include "row_io.h"

#if defined(DELLA_AVX512_PATHS)
#include "avx512_intrin.h"
#define DELLA_PHILOX_AVX512 1
#endif

namespace della::detail {
namespace {

#if defined(DELLA_PHILOX_AVX512)
constexpr int kVecs = 4;  // 32 blocks a step: four independent chains hide the multiplies' latency

__attribute__((target("avx512f"))) void philox_blocks_avx512(uint64_t g0, uint64_t count, uint32_t c2, uint32_t c3,
                                                             uint32_t k0, uint32_t k1, uint32_t* __restrict out) {
  uint64_t b = 0;
  for (; b + 8 * kVecs <= count; b += 8 * kVecs) philox_vectors_avx512<kVecs>(g0 + b, c2, c3, k0, k1, out + 4 * b);
  for (; b + 8 <= count; b += 8) philox_vectors_avx512<1>(g0 + b, c2, c3, k0, k1, out + 4 * b);
  for (; b < count; ++b) {
    const uint64_t g = g0 + b;
    const Philox4 w = philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), c2, c3, k0, k1);
    std::memcpy(out + 4 * b, w.v, sizeof w.v);
  }
}

#endif


DELLA_SIMD_CLONES
void philox_blocks_portable(uint64_t g0, uint64_t count, uint32_t tensor_id, uint32_t expert, uint32_t k0, uint32_t k1,
                            uint32_t* __restrict out) {
  for (uint64_t b = 0; b < count; ++b) {
    const uint64_t g = g0 + b;
    const Philox4 w = philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), tensor_id, expert, k0, k1);
    out[4 * b + 0] = w.v[0];
    out[4 * b + 1] = w.v[1];
    out[4 * b + 2] = w.v[2];
    out[4 * b + 3] = w.v[3];
  }
}

}  // namespace

void philox_blocks(uint64_t g0, uint64_t count, uint32_t tensor_id, uint32_t expert, uint32_t k0, uint32_t k1,
                   uint32_t* out) {
#if defined(DELLA_PHILOX_AVX512)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) {
    philox_blocks_avx512(g0, count, tensor_id, expert, k0, k1, out);
    return;
  }
#endif
  philox_blocks_portable(g0, count, tensor_id, expert, k0, k1, out);
}

}  // namespace della::detail
