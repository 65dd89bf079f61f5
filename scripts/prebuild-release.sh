#!/usr/bin/env bash
# Builds the release binary in prebuilds/linux-x64/ against an old glibc: a Debian 11
# (glibc 2.31) root made with debootstrap holds the compiler, this machine's Node.js
# runs there, and prebuildify (through scripts/prebuild-shim.js and cmake-js) builds
# with the C++ runtime linked statically. The binary then needs only glibc >= 2.14 —
# older than Node.js 20 itself needs. Needs root, debootstrap and the Debian mirror.
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
mkdir -p "$work/node_modules"
mountpoint -q "$work/node_modules" || mount --bind "$repo/node_modules" "$work/node_modules"
trap 'umount "$work/node_modules" 2>/dev/null || true' EXIT
chroot "$root" /usr/bin/env PATH=/usr/local/bin:/usr/bin:/bin HOME=/tmp \
  /bin/bash -c 'cd /build/della-merge && node node_modules/prebuildify/bin.js --napi --strip --tag-libc --node-gyp scripts/prebuild-shim.js'
mkdir -p prebuilds/linux-x64
cp "$work/prebuilds/linux-x64/"*.node prebuilds/linux-x64/
# The CUDA plugin is not part of this build (the Debian root has no CUDA toolkit). To ship
# one, build it on a machine with nvcc >= 12 and an old enough glibc with
#   DELLA_PREBUILD_CUDA=1 npm run prebuilds
# which also copies della_merge_cuda.so into prebuilds/linux-x64/ beside the .node.
need=$(objdump -T prebuilds/linux-x64/*.node | grep -o 'GLIBC_[0-9.]*' | sort -t. -k2,2n -k3,3n -u | tail -1)
echo "prebuilds/linux-x64: $(ls prebuilds/linux-x64) needs at most $need"
