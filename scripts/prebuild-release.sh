#!/usr/bin/env bash
# Builds the release binaries in prebuilds/linux-x64/ and prebuilds/linux-arm64/ against
# an old glibc: a Debian 11 (glibc 2.31) root made with debootstrap holds the compilers,
# this machine's Node.js runs there, and prebuildify (through scripts/prebuild-shim.js and cmake-js) builds
# with the C++ runtime linked statically. The addon then needs only glibc >= 2.18 —
# older than Node.js 20 itself needs. Needs root, debootstrap and the Debian mirror.
# When this machine has a CUDA toolkit (nvcc >= 12; $CUDA_HOME, else /usr/local/cuda),
# it is bind-mounted into the root and the CUDA plugin (della_merge_cuda.so: sm_80,
# sm_90 and PTX, the CUDA runtime linked statically) is built there too, with Debian
# 11's g++ 10 as nvcc's host compiler, and put beside the addon. DELLA_RELEASE_CUDA=0
# leaves it out. The plugin loads with NVIDIA drivers for its toolkit's CUDA major
# version: CUDA_HOME=/opt/cuda-12.4 (made by scripts/cuda12-toolkit.sh) builds one that
# drivers from 525.60.13 load, where this machine's CUDA 13 needs 580.65.06. The
# linux-arm64 addon is cross-compiled in the same root, and its plugin where a toolkit
# with arm64 runtime libraries is at hand (below).
#   bash scripts/prebuild-release.sh [ROOT_DIR]   (default: /var/tmp/della-bullseye)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
root=${1:-/var/tmp/della-bullseye}
if [ ! -x "$root/usr/bin/g++" ]; then
  command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap
  debootstrap --variant=minbase --include=g++,cmake,make,ca-certificates bullseye "$root" http://deb.debian.org/debian
fi
install -D "$(readlink -f "$(command -v node)")" "$root/usr/local/bin/node"
work="$root/build/della-merge"
rm -rf "$work" && mkdir -p "$work"
git ls-files --cached --others --exclude-standard | grep -v '^test/' | while read -r f; do
  mkdir -p "$work/$(dirname "$f")" && cp "$f" "$work/$f"
done
# One modification time for every copied file, $SOURCE_DATE_EPOCH or else the last
# commit's: nvcc writes the sources' times into the CUDA plugin, so copies made at
# different times built plugins that differed.
find "$work" -exec touch -h -d "@${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}" {} +
mounts=()
trap 'for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || true; done' EXIT
bind_into_root() {  # bind_into_root HOST_DIR DIR_IN_ROOT: unmounted on exit
  mkdir -p "$root$2"
  mountpoint -q "$root$2" || mount --bind "$1" "$root$2"
  mounts+=("$root$2")
}
bind_into_root "$repo/node_modules" /build/della-merge/node_modules
# The host's CUDA toolkit, if any, for the plugin.
cuda=0
cuda_home=$(readlink -f "${CUDA_HOME:-/usr/local/cuda}" 2>/dev/null || true)
if [ "${DELLA_RELEASE_CUDA:-1}" != 0 ] && [ -n "$cuda_home" ] && [ -x "$cuda_home/bin/nvcc" ]; then
  nvcc_major=$("$cuda_home/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
  if [ "${nvcc_major:-0}" -ge 12 ]; then
    cuda=1
    bind_into_root "$cuda_home" /usr/local/cuda
    echo "prebuild-release: CUDA plugin with nvcc $nvcc_major from $cuda_home"
  else
    echo "prebuild-release: nvcc in $cuda_home is older than 12: no CUDA plugin"
  fi
else
  echo "prebuild-release: no CUDA toolkit (or DELLA_RELEASE_CUDA=0): no CUDA plugin"
fi
# prebuildify for one architecture inside the root, with the plugin when WITH_PLUGIN is 1
# (nvcc from CUDA_BIN), then prebuilds/linux-ARCH/ copied out.
prebuild_in_root() {  # prebuild_in_root ARCH WITH_PLUGIN CUDA_BIN [NAME=VALUE ...]
  local arch=$1 plugin=$2 cuda_bin=$3
  shift 3
  chroot "$root" /usr/bin/env PATH="$cuda_bin":/usr/local/bin:/usr/bin:/bin HOME=/tmp DELLA_PREBUILD_CUDA="$plugin" "$@" \
    /bin/bash -c "cd /build/della-merge && node node_modules/prebuildify/bin.js --napi --strip --tag-libc --arch $arch --node-gyp scripts/prebuild-shim.js"
  mkdir -p "prebuilds/linux-$arch"
  rm -f "prebuilds/linux-$arch/della_merge_cuda.so"
  cp "$work/prebuilds/linux-$arch/"*.node "prebuilds/linux-$arch/"
  if [ "$plugin" = 1 ]; then cp "$work/prebuilds/linux-$arch/della_merge_cuda.so" "prebuilds/linux-$arch/"; fi
}
prebuild_in_root x64 "$cuda" /usr/local/cuda/bin
# linux-arm64 (Graviton, Grace): the addon cross-compiled in the same root by Debian 11's
# aarch64 g++ 10 (scripts/aarch64-toolchain.cmake), and its CUDA plugin when a CUDA
# toolkit with arm64 runtime libraries is at $CUDA_SBSA_HOME (default
# /opt/cuda-12.4-sbsa, made by CUDA12_TARGET=arm64 scripts/cuda12-toolkit.sh).
# DELLA_RELEASE_ARM64=0 leaves arm64 out.
if [ "${DELLA_RELEASE_ARM64:-1}" != 0 ]; then
  if [ ! -x "$root/usr/bin/aarch64-linux-gnu-g++" ]; then
    chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive /bin/bash -c \
      'apt-get update -qq && apt-get install -y -qq --no-install-recommends g++-aarch64-linux-gnu' >/dev/null
  fi
  arm_cuda=0
  sbsa=$(readlink -f "${CUDA_SBSA_HOME:-/opt/cuda-12.4-sbsa}" 2>/dev/null || true)
  if [ "${DELLA_RELEASE_CUDA:-1}" != 0 ] && [ -n "$sbsa" ] && [ -x "$sbsa/bin/nvcc" ] && [ -d "$sbsa/targets/sbsa-linux" ]; then
    arm_cuda=1
    bind_into_root "$sbsa" /usr/local/cuda-sbsa
    echo "prebuild-release: arm64 CUDA plugin with the toolkit in $sbsa"
  else
    echo "prebuild-release: no arm64 CUDA toolkit in ${CUDA_SBSA_HOME:-/opt/cuda-12.4-sbsa}: no arm64 CUDA plugin"
  fi
  prebuild_in_root arm64 "$arm_cuda" /usr/local/cuda-sbsa/bin PREBUILD_STRIP_BIN=aarch64-linux-gnu-strip
  readelf -h prebuilds/linux-arm64/*.node | grep -q AArch64 || { echo "prebuild-release: prebuilds/linux-arm64 is not aarch64" >&2; exit 1; }
else
  rm -rf prebuilds/linux-arm64  # an earlier run's binaries would otherwise be packed
fi
# Every binary's newest glibc symbol version; the plugin's exports, which must be the
# C ABI alone (della_cuda_*), nothing of the CUDA runtime or the C++ library.
for f in prebuilds/linux-*/*; do
  dump=(objdump -T "$f")  # the arm64 binaries through the root's cross binutils
  case $f in *linux-arm64*) dump=(chroot "$root" aarch64-linux-gnu-objdump -T "/build/della-merge/$f") ;; esac
  need=$("${dump[@]}" | grep -o 'GLIBC_[0-9.]*' | sort -t. -k2,2n -k3,3n -u | tail -1)
  echo "$f ($(du -h "$f" | cut -f1)) needs at most $need"
done
for f in prebuilds/linux-*/della_merge_cuda.so; do
  [ -f "$f" ] || continue
  other=$(nm -D --defined-only "$f" | awk '{print $3}' | grep -v '^della_cuda_' || true)
  [ -z "$other" ] || { echo "prebuild-release: $f exports more than della_cuda_*: $other" >&2; exit 1; }
done
if [ "${DELLA_RELEASE_ARM64:-1}" != 0 ]; then
  echo "prebuild-release: check the arm64 addon with ARM64_CHECK_ADDON=prebuilds/linux-arm64/della-merge.glibc.node bash scripts/arm64-check.sh"
fi
