// <immintrin.h> for the hand-written AVX-512 paths (DELLA_AVX512_PATHS). GCC 12 warns
// inside its own AVX-512 headers (_mm512_undefined_epi32), where the code using them is
// inlined; clang has no -Wmaybe-uninitialized.
#pragma once
#include <immintrin.h>
#pragma GCC diagnostic ignored "-Wuninitialized"
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
