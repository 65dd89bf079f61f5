#!/usr/bin/env bash
# The SASS (machine code) of the CUDA kernels for sm_90, read on this machine without a
# GPU: instruction counts and branches can be compared before spending device time.
# nvcc 13 has no disassembler here; CUDA 11.8's nvdisasm (Debian bookworm's non-free
# nvidia-cuda-toolkit) reads an sm_90 cubin once the ELF header is put in its older
# form (OS/ABI 0x33, ABI version 7, e_flags 0x005a055a); the code sections are the same.
#   bash scripts/sass-here.sh [KERNEL_REGEX] [OUT_DIR]
#     KERNEL_REGEX  a grep -E pattern on the mangled kernel names (default: della's BF16
#                   K = 3 fuse and its 4096-tier ranking kernel); OUT_DIR default /tmp/della-sass
#   NVDISASM=/path/to/nvdisasm to use another copy. To get one (about 84 MB download):
#     apt-get download nvidia-cuda-toolkit   (bookworm, component non-free)
#     dpkg-deb -x nvidia-cuda-toolkit_*.deb x && export NVDISASM=$PWD/x/usr/bin/nvdisasm
set -euo pipefail
cd "$(dirname "$0")/.."
pattern=${1:-'17fuse_fixed_kernelILNS_5DTypeE2ELi3ELNS_9ConsensusE1E|20magprune_half_kernelILNS_5DTypeE2ELi256ELi16ELb1ELb1E'}
out=${2:-/tmp/della-sass}
nvdisasm=${NVDISASM:-$(command -v nvdisasm || true)}
if [ -z "$nvdisasm" ] || [ ! -x "$nvdisasm" ]; then
  echo "sass-here: no nvdisasm (set NVDISASM; this script's header says where to get one)" >&2
  exit 2
fi
mkdir -p "$out"
# The plugin's device flags (CMakeLists.txt), for sm_90 only.
nvcc -cubin -arch=sm_90 -std=c++17 -O3 -fmad=false --prec-div=true --prec-sqrt=true --ftz=false \
  -Inative/include -Inative/src/cuda native/src/cuda/cuda_kernels.cu -o "$out/kernels.cubin"
cp "$out/kernels.cubin" "$out/patched.cubin"
printf '\x33\x07' | dd of="$out/patched.cubin" bs=1 seek=7 conv=notrunc status=none
printf '\x5a\x05\x5a\x00' | dd of="$out/patched.cubin" bs=1 seek=48 conv=notrunc status=none
"$nvdisasm" -c "$out/patched.cubin" >"$out/all.sass"
found=0
for name in $(grep -oE '^\.text\.[A-Za-z0-9_]+:' "$out/all.sass" | sed 's/^\.text\.//; s/:$//' | grep -E "$pattern" | sort -u); do
  file="$out/$(echo "$name" | sed -E 's/.*_cu_[0-9a-f]{8}//' | cut -c1-90).sass"
  awk -v n=".text.$name:" '$0 == n {f = 1; next} f && /\.section/ {exit} f' "$out/all.sass" |
    grep -vE '^\s*/\*[0-9a-f]*\*/\s*$' | sed 's@/\* 0x[0-9a-f]* \*/@@' >"$file"
  echo "$(grep -cE '^\s+/\*[0-9a-f]{4}\*/' "$file") instructions, $(grep -c 'BRA' "$file") branches, $(grep -c 'CALL' "$file") calls: $file"
  found=$((found + 1))
done
[ "$found" -gt 0 ] || { echo "sass-here: no kernel matches '$pattern' (names: grep '^.text.' $out/all.sass)" >&2; exit 1; }
