#!/usr/bin/env bash
# Runs the test suite against an AddressSanitizer + UBSan build of the addon.
# The sanitizer runtimes are preloaded into node; leaks at exit are node's own, so
# leak checking is off. Any sanitizer report aborts the process and fails the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
npx cmake-js compile --out build-asan --CDDELLA_SANITIZE=ON
export DELLA_NATIVE_PATH="$PWD/build-asan/Release/della_merge.node"
export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
npx tsc -p tsconfig.json
npx vitest run --exclude test/independent.test.ts "$@"
