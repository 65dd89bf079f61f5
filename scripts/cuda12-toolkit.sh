#!/usr/bin/env bash
# Makes a CUDA 12.4 toolkit in NVIDIA's usual layout (bin/, nvvm/, include/, lib64/) from
# Debian 13's nvidia-cuda-toolkit packages, for machines that reach only Debian's mirror:
# a Debian 13 root made with debootstrap gets the packages, then their files are copied
# out. NVIDIA's binaries in them need only glibc 2.7, so the toolkit also runs on this
# Debian 12 machine and inside the Debian 11 root of the release build
# (CUDA_HOME=DEST bash scripts/prebuild-release.sh). A plugin built with CUDA 12 runs with
# NVIDIA drivers from 525.60.13; one built with CUDA 13, from 580.65.06.
# Needs root, debootstrap and the Debian mirror (about 2 GB of packages).
# CUDA12_TARGET=arm64 makes a cross toolkit for linux-arm64 hosts (Grace Hopper) instead:
# the same x86-64 programs, with the arm64 runtime libraries of Debian's arm64 packages
# in lib64/ (and targets/sbsa-linux/, where CMake looks when cross-compiling); nvcc then
# builds arm64 plugins with -ccbin aarch64-linux-gnu-g++ (scripts/prebuild-release.sh).
#   bash scripts/cuda12-toolkit.sh [DEST] [ROOT]
#   (defaults: /opt/cuda-12.4, or /opt/cuda-12.4-sbsa for arm64; /var/tmp/della-trixie)
set -euo pipefail
target=${CUDA12_TARGET:-amd64}
case $target in
  amd64) dest=${1:-/opt/cuda-12.4} ;;
  arm64) dest=${1:-/opt/cuda-12.4-sbsa} ;;
  *) echo "cuda12-toolkit: CUDA12_TARGET must be amd64 or arm64, not $target" >&2; exit 2 ;;
esac
root=${2:-/var/tmp/della-trixie}
if [ ! -x "$root/usr/lib/nvidia-cuda-toolkit/bin/nvcc" ]; then
  command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap
  [ -x "$root/usr/bin/apt-get" ] ||
    debootstrap --variant=minbase --components=main,contrib,non-free --include=ca-certificates trixie "$root" http://deb.debian.org/debian
  mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
  trap 'umount "$root/proc" 2>/dev/null || true' EXIT
  chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit
  chroot "$root" apt-get clean
fi
rm -rf "$dest"
mkdir -p "$dest/bin/crt" "$dest/nvvm/bin" "$dest/nvvm/libdevice" "$dest/include" "$dest/lib64"
# Headers: the runtime's, CUB, Thrust and libcu++, which Debian puts in /usr/include.
for p in nvidia-cuda-dev libcub-dev libthrust-dev libcu++-dev; do
  chroot "$root" dpkg -L "$p" | grep '^/usr/include/' | while read -r f; do
    if [ -f "$root$f" ]; then
      mkdir -p "$dest/include/$(dirname "${f#/usr/include/}")"
      cp "$root$f" "$dest/include/${f#/usr/include/}"
    fi
  done
done
# The static runtime the plugin links, and the shared one CMake's FindCUDAToolkit wants.
lib="$root/usr/lib/x86_64-linux-gnu"
if [ "$target" = arm64 ]; then
  # The arm64 packages' files, unpacked without installing them.
  if [ ! -f "$root/var/tmp/cuda-arm64/usr/lib/aarch64-linux-gnu/libcudart_static.a" ]; then
    chroot "$root" dpkg --add-architecture arm64
    chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    chroot "$root" /bin/bash -c 'mkdir -p /var/tmp/cuda-arm64 && cd /var/tmp/cuda-arm64 &&
      apt-get download -q nvidia-cuda-dev:arm64 libcudart12:arm64 2>/dev/null &&
      for d in *.deb; do dpkg-deb -x "$d" . && rm "$d"; done'
  fi
  lib="$root/var/tmp/cuda-arm64/usr/lib/aarch64-linux-gnu"
  mkdir -p "$dest/targets/sbsa-linux"
  ln -s ../../include "$dest/targets/sbsa-linux/include"
  ln -s ../../lib64 "$dest/targets/sbsa-linux/lib"
  ln -s sbsa-linux "$dest/targets/aarch64-linux"  # CMake before 3.27 looks here
fi
cp "$lib/libcudart_static.a" "$lib/libcudadevrt.a" "$lib/libculibos.a" "$dest/lib64/"
cp -a "$lib"/libcudart.so* "$dest/lib64/"
t="$root/usr/lib/nvidia-cuda-toolkit"
cp "$t/bin/nvcc" "$dest/bin/"
cp "$t/bin/crt/"* "$dest/bin/crt/"
cp "$t/bin/cicc" "$dest/nvvm/bin/"
cp "$t/libdevice/"* "$dest/nvvm/libdevice/"
for b in ptxas fatbinary nvlink cudafe++ bin2c nvprune cuobjdump nvdisasm; do cp -L "$root/usr/bin/$b" "$dest/bin/"; done
# NVIDIA's own nvcc.profile (Debian's points into /usr).
cat >"$dest/bin/nvcc.profile" <<'EOF'

TOP              = $(_HERE_)/..

NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice

LD_LIBRARY_PATH += $(TOP)/lib64:
PATH            += $(TOP)/nvvm/bin:$(_HERE_):

INCLUDES        +=  "-I$(TOP)/include" $(_SPACE_)

LIBRARIES        =+ $(_SPACE_) "-L$(TOP)/lib64/stubs" "-L$(TOP)/lib64"

CUDAFE_FLAGS    +=
PTXAS_FLAGS     +=
EOF
"$dest/bin/nvcc" --version | tail -1
newest=$(for b in "$dest"/bin/* "$dest/nvvm/bin/cicc"; do [ -f "$b" ] && objdump -T "$b" 2>/dev/null; done |
  grep -o 'GLIBC_[0-9.]*' | sort -t. -k2,2n -k3,3n -u | tail -1)
echo "cuda12-toolkit: $dest ($(du -sh "$dest" | cut -f1)); its programs need at most $newest; its runtime is for $target"
