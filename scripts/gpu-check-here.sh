#!/usr/bin/env bash
# scripts/gpu-check.sh, whole, on the emulated CUDA device (native/test/cuda_emu): the
# plugin, parity test and benchmark built as plain C++ and run on the CPU, small shapes
# and a small model. A dry run of the GPU check on a machine without a GPU: every step,
# its comparisons and its summary, so that the GPU's minutes are not spent on a broken
# script or a kernel that differs from the CPU. Timings mean nothing here. Needs the
# project's node_modules and dist (npm ci).
#   bash scripts/gpu-check-here.sh      (OUT defaults to ./gpu-check-emulated-out)
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build-ctest -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build-ctest -j "$(nproc)" --target della_merge_cuda_emu della_cuda_emu_parity della_cuda_emu_bench \
  della_cuda_plugin_test >/dev/null 2>&1 ||
  cmake --build build-ctest -j "$(nproc)" --target della_merge_cuda_emu della_cuda_emu_parity della_cuda_emu_bench
[ -f build/Release/della_merge.node ] || { echo "build/Release/della_merge.node is missing: run npm ci first"; exit 1; }
bin=$(mktemp -d /tmp/della-gpu-check-here.XXXXXX)
trap 'rm -rf "$bin"' EXIT
cp build-ctest/della_merge_cuda_emu.so "$bin/della_merge_cuda.so"
cp build-ctest/della_cuda_emu_parity "$bin/della_cuda_parity"
cp build-ctest/della_cuda_emu_bench "$bin/della_cuda_bench"
cp build/Release/della_merge.node "$bin/"
cp build-ctest/della_cuda_plugin_test "$bin/"
# The same stand in for the CUDA 12 build, so that its steps run too.
mkdir -p "$bin/cuda12"
cp build-ctest/della_merge_cuda_emu.so "$bin/cuda12/della_merge_cuda.so"
cp build-ctest/della_cuda_emu_parity "$bin/cuda12/della_cuda_parity"
echo "emulated, standing in for CUDA 12" >"$bin/cuda12/nvcc-version"
echo "emulated device, $(git rev-parse --short HEAD)" >"$bin/commit"
OUT=${OUT:-$PWD/gpu-check-emulated-out} GPU_CHECK_PREBUILT=$bin GPU_CHECK_NCU=0 \
  GPU_CHECK_BENCH_SIZES=${GPU_CHECK_BENCH_SIZES:-16x512,4x4104} GPU_CHECK_PARITY_ITERATIONS=${GPU_CHECK_PARITY_ITERATIONS:-10} \
  GPU_CHECK_CUDA12_ITERATIONS=${GPU_CHECK_CUDA12_ITERATIONS:-10} GPU_CHECK_BENCH_REPS=${GPU_CHECK_BENCH_REPS:-2} \
  GPU_CHECK_MODEL=${GPU_CHECK_MODEL:---hidden 64 --layers 1 --inter 128 --vocab 256} \
  GPU_CHECK_LARGE=${GPU_CHECK_LARGE:---hidden 64 --layers 4 --inter 128 --vocab 256} \
  GPU_CHECK_HUGE=${GPU_CHECK_HUGE:---rows 40 --cols 64} \
  GPU_CHECK_WORK=/tmp/della-gpu-check-here bash scripts/gpu-check.sh
