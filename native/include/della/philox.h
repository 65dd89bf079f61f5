// Philox4x32-10 (Salmon et al. 2011) and the SPEC §3 uniform.
#pragma once
#include "della/common.h"

namespace della {

struct Philox4 {
  uint32_t v[4];
};

DELLA_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                               uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {  // the key is bumped between rounds, not before the first
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// x = f32(w >>> 8) * 2^-24: exact, in [0, 1).
DELLA_HD float uniform_from_word(uint32_t w) {
  return static_cast<float>(w >> 8) * 5.9604644775390625e-08f;
}

// The uniform of flat element i of a tensor (SPEC §3). Callers that walk
// consecutive elements should reuse the block (see RowRng in the kernels).
DELLA_HD float element_uniform(uint64_t seed, uint32_t tensor_id, uint32_t expert,
                               uint64_t i) {
  const uint64_t g = i >> 2;
  const Philox4 b = philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32),
                                  tensor_id, expert, static_cast<uint32_t>(seed),
                                  static_cast<uint32_t>(seed >> 32));
  return uniform_from_word(b.v[i & 3]);
}

// FNV-1a 32-bit of a byte string: the tensor id of SPEC §3.
DELLA_HD uint32_t fnv1a32(const unsigned char* s, uint64_t n) {
  uint32_t h = 2166136261u;
  for (uint64_t i = 0; i < n; ++i) {
    h ^= s[i];
    h *= 16777619u;
  }
  return h;
}

}  // namespace della
