#!/usr/bin/env bash
# Builds the CUDA plugin and the native tests with CUDA 12 (Debian 13's
# nvidia-cuda-toolkit, nvcc 12.4, g++ 13 as its host compiler) in a Debian 13 root made
# with debootstrap, runs ctest there (the GPU tests skip) and checks that the plugin
# exports only its C ABI. The development machine has nvcc 13; users whose driver is
# older than 580 need a plugin built with CUDA 12, so this says that one builds.
# Needs root, debootstrap and the Debian mirror (about 2 GB of packages the first time).
#   bash scripts/cuda12-build-check.sh [ROOT_DIR]   (default: /var/tmp/della-trixie)
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-/var/tmp/della-trixie}
if [ ! -x "$root/usr/bin/nvcc" ]; then
  command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap
  [ -x "$root/usr/bin/apt-get" ] ||
    debootstrap --variant=minbase --components=main,contrib,non-free --include=ca-certificates trixie "$root" http://deb.debian.org/debian
  mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
  trap 'umount "$root/proc" 2>/dev/null || true' EXIT
  chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    nvidia-cuda-toolkit g++ g++-13 cmake make
  chroot "$root" apt-get clean
fi
work="$root/build/della-cuda12"
rm -rf "$work" && mkdir -p "$work"
git ls-files --cached --others --exclude-standard | while read -r f; do
  mkdir -p "$work/$(dirname "$f")" && cp "$f" "$work/$f"
done
start=$(date +%s)
# nvcc 12.4 takes g++ <= 13; Debian 13's default g++ is 14.
chroot "$root" /usr/bin/env PATH=/usr/bin:/bin HOME=/tmp /bin/bash -c '
  set -eo pipefail
  cd /build/della-cuda12
  nvcc --version | tail -2
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++-13 >build.log 2>&1 ||
    { tail -30 build.log; exit 1; }
  grep "della-merge:" build.log
  grep -q "building the CUDA plugin with nvcc 12" build.log || { echo "FAIL: the CUDA plugin is not built"; exit 1; }
  cmake --build build -j "$(nproc)" >>build.log 2>&1 || { grep -E "error|Error" build.log | head -30; exit 1; }
  ctest --test-dir build --output-on-failure 2>&1 | tail -15
  ls -l build/della_merge_cuda.so
'
echo "cuda12-build-check: built and tested in $(($(date +%s) - start)) s (the cuda_plugin test checks the exports before it skips)"
