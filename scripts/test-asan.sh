#!/usr/bin/env bash
# Runs the C++ tests, the kernel fuzz harness and the vitest suite against
# AddressSanitizer + UBSan builds, and the CUDA plugin's hash threads under TSan. For
# the addon, the sanitizer runtimes are preloaded into node; leaks at exit are node's
# own, so leak checking is off. Any sanitizer report aborts the process and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
npx cmake-js compile --out build-asan --CDDELLA_SANITIZE=ON
cmake -S . -B build-asan-ctest -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDELLA_SANITIZE=ON >/dev/null
cmake --build build-asan-ctest -j
ctest --test-dir build-asan-ctest --output-on-failure
# The CUDA plugin's hash threads (host code) under ThreadSanitizer, which cannot share a
# build with ASan.
g++ -std=c++17 -O1 -g -fsanitize=thread -pthread -Inative/include -Inative/src/cuda \
  native/test/ordered_digests_test.cc -o build-asan-ctest/della_ordered_digests_tsan
TSAN_OPTIONS=halt_on_error=1 build-asan-ctest/della_ordered_digests_tsan
npx tsc -p tsconfig.json && node scripts/bundle-cli.mjs
export DELLA_NATIVE_PATH="$PWD/build-asan/Release/della_merge.node"
export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
# independent.test.ts runs Python; pack.test.ts tests packaging, not the addon's memory use.
# huge-tensor.test.ts (4 GiB tensors, about 13 GB of memory) runs alone afterwards: beside
# the other files under ASan it made vitest lose its worker RPC ('Timeout calling
# onTaskUpdate', every test passed) in two runs out of two; alone, and without it, none.
npx vitest run --exclude test/independent.test.ts --exclude test/pack.test.ts --exclude test/huge-tensor.test.ts "$@"
npx vitest run test/huge-tensor.test.ts
