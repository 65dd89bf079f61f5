#!/usr/bin/env bash
# Builds the CUDA plugin and every native test with CUDA 12.4 (scripts/cuda12-toolkit.sh
# makes the toolkit from Debian 13's packages the first time) and runs ctest: the GPU
# tests skip without a GPU, after cuda_plugin has checked that the plugin loads and
# exports only its C ABI. The development machine's own nvcc is 13; users whose driver
# is older than 580 need a plugin built with CUDA 12, so this says that one builds.
#   bash scripts/cuda12-build-check.sh [BUILD_DIR]   (default: build-cuda12)
# CUDA12_HOME names another CUDA 12 toolkit (default /opt/cuda-12.4).
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=${CUDA12_HOME:-/opt/cuda-12.4}
build=${1:-build-cuda12}
[ -x "$cuda/bin/nvcc" ] || bash scripts/cuda12-toolkit.sh "$cuda"
"$cuda/bin/nvcc" --version | tail -1
start=$(date +%s)
mkdir -p "$build"
log=$build/cuda12-build.log
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$cuda/bin/nvcc" >"$log" 2>&1 ||
  { tail -30 "$log"; exit 1; }
grep "della-merge:" "$log"
grep -q "building the CUDA plugin with nvcc 12" "$log" || { echo "FAIL: the CUDA plugin is not built with CUDA 12"; exit 1; }
cmake --build "$build" -j "$(nproc)" >>"$log" 2>&1 || { grep -E "error|Error" "$log" | head -30; exit 1; }
ctest --test-dir "$build" --output-on-failure 2>&1 | tail -8
ls -l "$build/della_merge_cuda.so"
echo "cuda12-build-check: built and tested in $(($(date +%s) - start)) s"
