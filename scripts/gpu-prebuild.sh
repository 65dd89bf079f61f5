#!/usr/bin/env bash
# Builds here, for sm_90 (H100/H200), everything scripts/gpu-check.sh runs on a GPU
# machine, and puts it in .gpu/prebuilt/ (ignored by git, carried with .gpu): the CUDA
# plugin, its parity test, plugin test and benchmark, and the CPU-only addon. With
# GPU_CHECK_PREBUILT=.gpu/prebuilt the check then skips its two builds (about a minute
# of device time). Needs nvcc and the project's node_modules (npm ci). Runs the parity
# test on the emulated device first and stops if it fails.
#   bash scripts/gpu-prebuild.sh        then carry .gpu as gpu-check's README says
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
gen=(); command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
cmake -S . -B build-gpu "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DDELLA_CUDA_ARCHITECTURES=90-real >/dev/null
cmake --build build-gpu -j "$(nproc)" --target della_merge_cuda della_cuda_parity della_cuda_plugin_test della_cuda_bench
cmake -S . -B build-gpu-node "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_JS_VERSION=gpu-check \
  -DCMAKE_JS_INC="$root/node_modules/node-api-headers/include" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$root/build-gpu-node/Release" -DDELLA_CUDA=OFF -DDELLA_TESTS=OFF >/dev/null
cmake --build build-gpu-node -j "$(nproc)"
# The same sources on the emulated device first (native/test/cuda_emu): a kernel or
# pipeline that differs from the CPU there would waste the GPU's minutes.
cmake -S . -B build-ctest -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build-ctest -j "$(nproc)" --target della_cuda_emu_parity
build-ctest/della_cuda_emu_parity random 60
build-ctest/della_cuda_emu_parity random 40 optin
out=.gpu/prebuilt
rm -rf "$out" && mkdir -p "$out"
cp build-gpu/della_merge_cuda.so build-gpu/della_cuda_parity build-gpu/della_cuda_plugin_test \
  build-gpu/della_cuda_bench build-gpu-node/Release/della_merge.node "$out/"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
# The plugin and its parity test built with CUDA 12 as well, where a CUDA 12 toolkit is
# here (scripts/cuda12-toolkit.sh; CUDA12_HOME, default /opt/cuda-12.4): the check runs
# them on the GPU beside the CUDA 13 build, since a CUDA 12 plugin is what drivers older
# than 580 can load. GPU_PREBUILD_CUDA12=0 leaves them out.
cuda12=${CUDA12_HOME:-/opt/cuda-12.4}
if [ "${GPU_PREBUILD_CUDA12:-1}" != 0 ] && [ -x "$cuda12/bin/nvcc" ]; then
  cmake -S . -B build-gpu-cuda12 "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DDELLA_CUDA_ARCHITECTURES=90-real \
    -DCMAKE_CUDA_COMPILER="$cuda12/bin/nvcc" >/dev/null
  cmake --build build-gpu-cuda12 -j "$(nproc)" --target della_merge_cuda della_cuda_parity
  mkdir -p "$out/cuda12"
  cp build-gpu-cuda12/della_merge_cuda.so build-gpu-cuda12/della_cuda_parity "$out/cuda12/"
  "$cuda12/bin/nvcc" --version | grep -o 'release [0-9.]*, V[0-9.]*' >"$out/cuda12/nvcc-version"
fi
git rev-parse --short HEAD >"$out/commit"
git diff --quiet HEAD -- native CMakeLists.txt || echo "(with uncommitted changes under native/)" >>"$out/commit"
du -sh "$out"
