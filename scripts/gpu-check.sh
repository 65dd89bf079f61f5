#!/usr/bin/env bash
# The GPU check, in one command on a lent GPU machine (CUDA, CMake, ninja, a C++
# compiler; no Node.js and no network): builds the plugin and its tests with plain CMake
# for sm_90, runs the CUDA/CPU parity tests (ctest), the kernel benchmark, and end-to-end
# merges with --device cuda against the CPU's (cmp, byte for byte) with timings beside
# the pinned host-to-device bandwidth measured in the same run. Results go to $OUT.
# How to call it with the device tool (command and carry list): native/src/cuda/README.md.
#   bash scripts/gpu-check.sh          (OUT defaults to ./gpu-check-out)
# Exit status: 0 when every check passed; the summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
OUT=${OUT:-$root/gpu-check-out}
mkdir -p "$OUT"
log=$OUT/gpu-check.log
exec > >(tee -a "$log") 2>&1
started=$(date +%s)
jobs=$(nproc 2>/dev/null || echo 8)
work=${GPU_CHECK_WORK:-/tmp/della-gpu-check}
rm -rf "$work" && mkdir -p "$work"
declare -a summary
note() { summary+=("$1"); echo "== $1"; }
elapsed() { echo $(( $(date +%s) - started ))s; }
status=0

echo "== della-merge GPU check, $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
[ -f .gpu/env.sh ] && . .gpu/env.sh
nvidia-smi 2>&1 | head -20 || echo "nvidia-smi failed"
nvcc --version | tail -2

# 1. Plugin, kernel tests, parity tests and benchmark: plain CMake, sm_90 only (the H100).
#    GPU_CHECK_PREBUILT=DIR (scripts/gpu-prebuild.sh, run where the code is edited) skips
#    the builds and runs the binaries in DIR instead: a minute less of device time.
arch=${GPU_CHECK_ARCH:-90-real}
gen=(); command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
prebuilt=${GPU_CHECK_PREBUILT:-}
bin=build-gpu
if [ -n "$prebuilt" ]; then
  bin=$prebuilt
  note "prebuilt binaries from $bin ($(cat "$bin/commit" 2>/dev/null | tr '\n' ' '))"
elif timeout 300 cmake -S . -B build-gpu "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DDELLA_CUDA_ARCHITECTURES="$arch" \
     >"$OUT/build.log" 2>&1 && timeout 300 cmake --build build-gpu -j "$jobs" >>"$OUT/build.log" 2>&1; then
  note "build: plugin + tests for $arch in $(elapsed)"
else
  note "build: FAILED (see build.log)"; tail -30 "$OUT/build.log"; status=1
fi
if [ ! -f "$bin/della_merge_cuda.so" ]; then
  note "no plugin was built: stopping"; printf '%s\n' "${summary[@]}" >"$OUT/summary.txt"; exit 1
fi

# 2. ctest: CPU kernel tests, CUDA/CPU parity (random cases, four pipeline settings),
#    the plugin's C ABI through dlopen. A skip here means no GPU was found: a failure.
#    Prebuilt: the plugin test and the parity test alone (the CPU tests ran where built).
if [ -n "$prebuilt" ]; then
  { "$bin/della_cuda_plugin_test" "$bin/della_merge_cuda.so" && echo "cuda_plugin: passed"; } >"$OUT/ctest.log" 2>&1
  rc=$?
  grep -E "cuda_plugin|device" "$OUT/ctest.log" | head -5
  [ $rc -eq 0 ] && note "plugin test: passed" || { note "plugin test: FAILED rc=$rc (see ctest.log)"; status=1; }
else
  ctest --test-dir build-gpu --output-on-failure --timeout 240 >"$OUT/ctest.log" 2>&1
  rc=$?
  grep -E "Test +#|tests passed|Skipped|seed|cuda_parity:|cuda_plugin:|device:|MISMATCH|FAIL" "$OUT/ctest.log" | head -40
  if [ $rc -ne 0 ] || grep -q "Skipped" "$OUT/ctest.log"; then
    note "ctest: FAILED or skipped (see ctest.log)"; status=1
  else
    note "ctest: $(grep -o '[0-9]*% tests passed.*' "$OUT/ctest.log")"
  fi
fi
# One parity run, appended to $OUT/LOG, and its line in the summary:
#   parity_run LABEL LOG SECONDS BINARY SEED ITERATIONS [optin]
parity_run() {
  local label=$1 log=$2 limit=$3 rc
  shift 3
  timeout "$limit" "$@" >>"$OUT/$log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    note "$label: $(grep -o 'cuda_parity: [0-9]* tasks.*' "$OUT/$log" | tail -1)"
  else
    note "$label: FAILED rc=$rc (see $log)"; status=1
  fi
}
# A second parity run with another seed and more iterations, while there is time.
parity_run "parity (own seed)" ctest.log 120 "$bin/della_cuda_parity" "$(date +%s%N | cut -c1-15)" \
  "${GPU_CHECK_PARITY_ITERATIONS:-120}"
# The kernels not on by default (della's fused rows), in a process of their own.
: >"$OUT/parity-optin.log"
parity_run "parity of the opt-in kernels" parity-optin.log 120 "$bin/della_cuda_parity" "$(date +%s%N | cut -c2-15)" \
  "${GPU_CHECK_PARITY_ITERATIONS:-120}" optin
# The plugin built with CUDA 12 (scripts/gpu-prebuild.sh, where a CUDA 12 toolkit was):
# what drivers older than 580 can load. Its own parity run; end to end below.
if [ -x "$bin/cuda12/della_cuda_parity" ]; then
  : >"$OUT/parity-cuda12.log"
  parity_run "parity of the CUDA 12 build ($(cat "$bin/cuda12/nvcc-version" 2>/dev/null))" parity-cuda12.log 90 \
    "$bin/cuda12/della_cuda_parity" "$(date +%s%N | cut -c3-15)" "${GPU_CHECK_CUDA12_ITERATIONS:-60}"
fi

# 2b. Only when parity failed: the first failing seed again, a few iterations, under
#     compute-sanitizer's memcheck (out-of-bounds and misaligned accesses, bad API calls),
#     so that one run on a GPU says where a kernel goes wrong.
if grep -qE "MISMATCH|GPU FAILED|cuda_parity: FAILED|Exception|Subprocess aborted" "$OUT/ctest.log"; then
  seed=$(grep -o 'cuda_parity: seed [0-9]*' "$OUT/ctest.log" | head -1 | grep -o '[0-9]*$')
  if command -v compute-sanitizer >/dev/null 2>&1 && [ -n "$seed" ]; then
    timeout 150 compute-sanitizer --tool memcheck --print-limit 30 "$bin/della_cuda_parity" "$seed" 4 \
      >"$OUT/memcheck.log" 2>&1
    note "memcheck of parity seed $seed (4 iterations): rc=$? $(grep -o 'ERROR SUMMARY: [0-9]* error.*' "$OUT/memcheck.log" | tail -1)"
    grep -m 12 -E "Invalid|========= +at |Address|MISMATCH|GPU FAILED" "$OUT/memcheck.log"
  fi
fi

# 3. Kernel benchmark: K=3 BF16, 4096x4096 and 14336x4096, beside a device-to-device copy
#    (della, dare_ties, ties, task_arithmetic, breadcrumbs with the l2 rescale, and the
#    alternatives of Options::fast_paths). GPU_CHECK_BENCH_REPS (12) sets the repetitions;
#    the dry run (gpu-check-here.sh) takes 2, and 10 CUDA 12 parity iterations, not 60.
if timeout 240 "$bin/della_cuda_bench" --json "$OUT/cuda-bench.json" --reps "${GPU_CHECK_BENCH_REPS:-12}" --exclude della/fused-row \
     ${GPU_CHECK_BENCH_SIZES:+--sizes "$GPU_CHECK_BENCH_SIZES"} >"$work/bench.txt" 2>&1; then
  note "kernel benchmark: all results equal to the CPU's ($(elapsed))"
else
  note "kernel benchmark: FAILED (see gpu-check.log)"; status=1
fi
cat "$work/bench.txt"
# 3'. The kernels not on by default (Options::fast_paths & kFusedRow) beside della, in a run
#     of their own: a fault there costs none of the results above.
if timeout 120 "$bin/della_cuda_bench" --json "$OUT/cuda-bench-optin.json" --reps "${GPU_CHECK_BENCH_REPS:-12}" --methods della,della/fused-row \
     --no-register-probe ${GPU_CHECK_BENCH_SIZES:+--sizes "$GPU_CHECK_BENCH_SIZES"} >"$work/bench-optin.txt" 2>&1; then
  note "opt-in kernels (della/fused-row): all results equal to the CPU's ($(elapsed))"
else
  note "opt-in kernels (della/fused-row): FAILED (see gpu-check.log)"; status=1
fi
cat "$work/bench-optin.txt"
summary+=("$(grep -E '^(method|della|dare_ties|ties|task_arithmetic|breadcrumbs_l2|pinned)[ /]' "$work/bench.txt")")
summary+=("$(grep -E '^della/fused-row ' "$work/bench-optin.txt")")
# Each method's default kernels against its /prev row (the kernels before 2026-11-28's
# steps 64-67; for breadcrumbs_l2, the norm sums before step 77), and della/fused-row
# against della timed in its own run, per shape: speedups above 1 are the new kernels' gains.
summary+=("$(awk 'FNR == 1 { run++ }
  $2 ~ /^[0-9]+x[0-9]+$/ { if (run == 1) ms[$1 " " $2] = $3; else opt[$1 " " $2] = $3; shapes[$2] = 1 }
  END {
    for (sh in shapes) {
      line = "speedups at " sh ":"
      split("della dare_ties ties task_arithmetic breadcrumbs_l2", m, " ")
      for (i = 1; i <= 5; i++) {
        a = ms[m[i] " " sh]; b = ms[m[i] "/prev " sh]
        if (a > 0 && b > 0) line = line sprintf(" %s %.2fx (%.3f ms, prev %.3f);", m[i], b / a, a, b)
      }
      f = opt["della/fused-row " sh]; a = opt["della " sh]
      if (a > 0 && f > 0) line = line sprintf(" della/fused-row %.2fx over della in its run (%.3f ms against %.3f)", a / f, f, a)
      print line
    }
  }' "$work/bench.txt" "$work/bench-optin.txt")")
h2d=$(grep -o '"h2d_pinned_GBps": [0-9.]*' "$OUT/cuda-bench.json" 2>/dev/null | head -1 | grep -o '[0-9.]*$')

# 4. End to end with Node.js (carried in .gpu by /work/shared/tools/gpu-carry.sh).
if ! command -v node >/dev/null 2>&1; then
  note "end to end: SKIPPED (no node: carry .gpu and start the command with '. .gpu/env.sh;')"; status=1
else
  [ -e node_modules ] || { [ -d .gpu/node_modules ] && ln -s .gpu/node_modules node_modules; }
  # The addon built here against the carried Node-API headers, CPU only; the plugin of
  # step 1 beside it, where the addon looks. Else the carried build/Release.
  addon=""
  if [ -n "$prebuilt" ]; then
    addon=$(cd "$bin" && pwd)/della_merge.node
  elif timeout 180 cmake -S . -B build-gpu-node "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_JS_VERSION=gpu-check \
       -DCMAKE_JS_INC="$root/node_modules/node-api-headers/include" \
       -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$root/build-gpu-node/Release" -DDELLA_CUDA=OFF -DDELLA_TESTS=OFF \
       >>"$OUT/build.log" 2>&1 && timeout 180 cmake --build build-gpu-node -j "$jobs" >>"$OUT/build.log" 2>&1; then
    cp build-gpu/della_merge_cuda.so build-gpu-node/Release/
    addon=$root/build-gpu-node/Release/della_merge.node
  elif [ -f build/Release/della_merge.node ]; then
    echo "addon build failed; using the carried build/Release"
    addon=$root/build/Release/della_merge.node
  fi
  if [ -z "$addon" ] || [ ! -f dist/index.js ]; then
    note "end to end: SKIPPED (no addon or no dist/: carry dist and node_modules/{yaml,node-gyp-build,node-addon-api,node-api-headers})"; status=1
  else
    export DELLA_NATIVE_PATH=$addon
    dm=(node "$root/bin/della-merge.js")
    gpu=${GPU_CHECK_DEVICE:-cuda}  # GPU_CHECK_DEVICE=cpu dry-runs this part on a machine without a GPU
    "${dm[@]}" doctor | tee "$work/doctor.txt"
    same() {  # same bytes in every .safetensors of two output directories, and the same recorded digests
      local a=$1 b=$2 f ok=0
      for f in "$a"/*.safetensors; do cmp -s "$f" "$b/$(basename "$f")" || { echo "DIFFERS: $(basename "$f")"; ok=1; }; done
      # The CPU kernels and the CUDA plugin each hash their outputs for della_merge_run.json.
      node -e 'const r = (d) => JSON.stringify(JSON.parse(require("fs").readFileSync(d + "/della_merge_run.json", "utf8")).xxh64);
        if (r(process.argv[1]) !== r(process.argv[2])) { console.log("DIGESTS DIFFER"); process.exit(1); }' "$a" "$b" || ok=1
      return $ok
    }
    e2e="{\n  \"h2d_pinned_GBps\": ${h2d:-null},\n  \"runs\": ["
    sep=""
    # 4a. The demo's models and recipe: CPU and GPU outputs byte for byte.
    if timeout 120 "${dm[@]}" demo --out "$work/demo" >"$work/demo.txt" 2>&1 &&
       timeout 120 "${dm[@]}" run "$work/demo/models/recipe.yaml" --out "$work/demo-gpu" --device "$gpu" --quiet >>"$work/demo.txt" 2>&1 &&
       same "$work/demo/merged" "$work/demo-gpu"; then
      note "demo: della-merge run --device $gpu equals the CPU's demo merge byte for byte"
    else
      note "demo: FAILED"; tail -20 "$work/demo.txt"; status=1
    fi
    # One recipe on the CPU (all cores) and with --device $gpu into DIR, compared byte for
    # byte and timed: the summary's rows and a record of e2e.json.
    #   e2e_pair MODELS RECIPE OUTPUT(disk|memory) DIR LABEL [VAR=VALUE for the GPU run]
    # To memory, DIR is emptied first (nothing of an earlier pair left in /dev/shm).
    e2e_pair() {
      local models=$1 r=$2 where=$3 dir=$4 label=$5 extra=${6:-} c g prof eq
      if [ "$where" = memory ]; then
        rm -rf "$dir"
        mkdir -p "$dir" || { note "e2e $label: cannot create $dir"; status=1; return; }
      fi
      # DELLA_PROFILE: where each run's main thread spent the merge phase.
      DELLA_PROFILE=1 timeout 300 "${dm[@]}" run "$models/$r.json" --out "$dir/cpu-$r" --quiet \
        --report "$work/cpu-$r.json" >/dev/null 2>"$work/err.txt"
      c=$?
      # In memory, the plugin also says where the host's time went (DELLA_CUDA_PROFILE).
      prof=0; [ "$where" = memory ] && prof=1
      env ${extra:+"$extra"} DELLA_PROFILE=1 DELLA_CUDA_PROFILE=$prof timeout 300 "${dm[@]}" run "$models/$r.json" --out "$dir/gpu-$r" \
        --quiet --device "$gpu" --report "$work/gpu-$r.json" >/dev/null 2>>"$work/err.txt"
      g=$?
      grep -E "della (cuda )?profile" "$work/err.txt" | sed 's/^/     /'
      sed -i -E '/della (cuda )?profile/d' "$work/err.txt"
      if [ $c -eq 0 ] && [ $g -eq 0 ] && same "$dir/cpu-$r" "$dir/gpu-$r"; then eq=true; else eq=false; status=1; cat "$work/err.txt"; fi
      mapfile -t row < <(node scripts/gpu-e2e-row.mjs "$work/cpu-$r.json" "$work/gpu-$r.json" "$label" "$where" "$eq" "${h2d:-}")
      note "${row[0]}"
      echo "${row[1]}"
      echo "${row[2]} on ${row[4]}"
      summary+=("${row[1]}" "${row[2]}")
      e2e+="$sep\n    ${row[3]}"
      sep=","
      rm -rf "$dir/cpu-$r" "$dir/gpu-$r"
    }
    mem=/dev/shm/della-gpu-check
    # 4b. A 0.49 B-parameter BF16 model and three experts: della, dare_ties, ties,
    #     breadcrumbs (l2 rescale), each to disk ($work, as a user would) and to memory
    #     (/dev/shm, which takes the disk's write speed out of the numbers).
    if timeout 150 node scripts/gpu-e2e-models.mjs "$work/e2e" ${GPU_CHECK_MODEL:-} >"$work/models.json"; then
      cat "$work/models.json"
      for r in ${GPU_CHECK_RECIPES:-della dare_ties ties breadcrumbs_l2}; do
        for where in ${GPU_CHECK_OUTPUTS:-disk memory}; do
          if [ $where = disk ]; then dir=$work/e2e; else dir=$mem; fi
          e2e_pair "$work/e2e" "$r" "$where" "$dir" "$r"
        done
      done
      # The pinned staging buffers on transparent huge pages, registered in place
      # (Options::pinned_huge, opt-in): the plugin's profile line gives their allocation
      # time beside the default's in "della to memory" above.
      e2e_pair "$work/e2e" della memory "$mem" della/huge-pinned DELLA_CUDA_PINNED=huge
      # The inputs registered where they are mapped and copied from there, no staging copy
      # (Options::register_inputs, opt-in): its profile line gives the registration time.
      e2e_pair "$work/e2e" della memory "$mem" della/registered DELLA_CUDA_INPUTS=register
      # The CUDA 12 build of the plugin, loaded by the same addon.
      if [ -f "$bin/cuda12/della_merge_cuda.so" ]; then
        e2e_pair "$work/e2e" della memory "$mem" della/cuda12 "DELLA_CUDA_PLUGIN=$(realpath "$bin/cuda12/della_merge_cuda.so")"
      fi
      rm -rf "$mem"
    else
      note "e2e models: FAILED"; status=1
    fi
    rm -rf "$work/e2e"
    # 4c. At scale: a model about three times larger (1.56 B parameters a model, 12.5 GB
    #     of inputs), to memory, where opening the device (about 0.3 s) no longer outweighs
    #     the merge: the run against the issue's end-to-end target (70% of the pinned
    #     host-to-device bandwidth). GPU_CHECK_LARGE sets the generator's arguments
    #     ("0" skips it), GPU_CHECK_LARGE_RECIPES the recipes.
    large=${GPU_CHECK_LARGE:---layers 32}
    if [ "$large" != 0 ]; then
      if timeout 240 node scripts/gpu-e2e-models.mjs "$work/e2e-large" $large >"$work/models-large.json"; then
        cat "$work/models-large.json"
        for r in ${GPU_CHECK_LARGE_RECIPES:-della dare_ties}; do
          e2e_pair "$work/e2e-large" "$r" memory "$mem" "$r/large"
        done
        e2e_pair "$work/e2e-large" dare_ties memory "$mem" dare_ties/large-registered DELLA_CUDA_INPUTS=register
        # 4d. Nsight Systems on dare_ties/large to memory (GPU run alone), where nsys is
        #     installed: how busy the GPU was between batches and slabs, and its longest
        #     idle gaps (scripts/gpu-nsys-gaps.mjs), with the per-kernel and per-copy
        #     summaries in nsys.txt. GPU_CHECK_NSYS=0 skips it.
        if [ "${GPU_CHECK_NSYS:-1}" = 1 ] && command -v nsys >/dev/null 2>&1; then
          rm -rf "$mem"; mkdir -p "$mem"
          if timeout 150 nsys profile -t cuda,osrt -o "$work/nsys-large" --force-overwrite true \
               "${dm[@]}" run "$work/e2e-large/dare_ties.json" --out "$mem/gpu" --quiet --device "$gpu" >"$OUT/nsys.txt" 2>&1 &&
             timeout 120 nsys stats -r cuda_gpu_kern_sum,cuda_gpu_mem_time_sum,cuda_api_sum "$work/nsys-large.nsys-rep" \
               >>"$OUT/nsys.txt" 2>&1 &&
             timeout 120 nsys stats -r cuda_gpu_trace -f csv -o "$work/nsys-large" "$work/nsys-large.nsys-rep" >/dev/null 2>&1; then
            trace=$(ls "$work"/nsys-large*cuda_gpu_trace*.csv 2>/dev/null | head -1)
            if [ -n "$trace" ] && node scripts/gpu-nsys-gaps.mjs "$trace" >"$work/gaps.txt" 2>&1; then
              note "nsys, dare_ties/large to memory: $(head -1 "$work/gaps.txt")"
              sed -n 2p "$work/gaps.txt"
              summary+=("$(sed -n 2p "$work/gaps.txt")")
              cat "$work/gaps.txt" >>"$OUT/nsys.txt"
            else
              note "nsys: no GPU trace to read (see nsys.txt)"
            fi
          else
            note "nsys: the profile or its reports failed (see nsys.txt); nothing else depends on it"
          fi
          rm -rf "$mem" "$work"/nsys-large*
        fi
        rm -rf "$mem"
      else
        note "e2e large models: FAILED (timed out or out of space?)"; status=1
      fi
      rm -rf "$work/e2e-large"
    fi
    # 4e. A tensor over 4 GiB (a 64k-token embedding, 4 GiB + 64 KiB; sparse files with
    #     random rows around element 2^31): della and ties, to memory, byte for byte.
    #     GPU_CHECK_HUGE sets the generator's arguments ("0" skips it; the dry run takes
    #     a small one, as the emulated device would take most of an hour).
    huge=${GPU_CHECK_HUGE:-}
    if [ "$huge" != 0 ]; then
      if timeout 60 node scripts/gpu-huge-model.mjs "$work/huge" $huge >"$work/huge.json"; then
        cat "$work/huge.json"
        for r in della ties; do e2e_pair "$work/huge" "$r" memory "$mem" "$r/over-4GiB"; done
        rm -rf "$mem"
      else
        note "e2e over 4 GiB: the models could not be written"; status=1
      fi
      rm -rf "$work/huge"
    fi
    printf "%b\n  ]\n}\n" "$e2e" >"$OUT/e2e.json"
  fi
fi

# 3b and 3c, profiles, run last: a check past its time loses them, not a result.
# 3b. Nsight Compute, every section, on the main kernels (4096x4096, first launch of
#     each): della's 16-bit ranking kernel and fuse by default (GPU_CHECK_NCU_KERNELS and
#     GPU_CHECK_NCU_METHODS choose others), to say where the time goes. GPU_CHECK_NCU=0
#     skips it.
if [ "${GPU_CHECK_NCU:-1}" = 1 ] && command -v ncu >/dev/null 2>&1; then
  : >"$OUT/ncu.txt"
  for k in ${GPU_CHECK_NCU_KERNELS:-magprune_half_kernel fuse_fixed_kernel}; do
    timeout 45 ncu -k "regex:$k" --launch-count 1 --set full "$bin/della_cuda_bench" --sizes 4096x4096 --reps 1 \
      --methods ${GPU_CHECK_NCU_METHODS:-della} >>"$OUT/ncu.txt" 2>&1
  done
  note "ncu: rc=$? ($(elapsed)); full sections in ncu.txt"
  grep -E "^ +[a-z_]+.*\(|^ +Duration|^ +Memory Throughput|^ +Compute \(SM\) Throughput|^ +Achieved Occupancy|^ +Executed Ipc Active|^ +Registers Per" "$OUT/ncu.txt" | head -40
fi

# 3c. SASS of della's two 16-bit kernels (BF16) to sass.txt, for reading their instruction
#     mix without device time (cuobjdump is on the GPU machine, not the development one).
if command -v cuobjdump >/dev/null 2>&1 && command -v strings >/dev/null 2>&1; then
  for f in $(strings "$bin/della_merge_cuda.so" |
             grep -E '^_ZN5della4cuda6detail.*(17fuse_fixed_kernelILNS_5DTypeE2ELi3ELNS_9ConsensusE1E|20magprune_half_kernelILNS_5DTypeE2ELi256ELi16ELb1ELb1E)' |
             grep -vE 'L(17|20)(fuse|magprune)|[.]cold$' | sort -u); do
    timeout 30 cuobjdump -sass -fun "$f" "$bin/della_merge_cuda.so" 2>&1 | head -30000
  done >"$OUT/sass.txt"
  note "sass: $(grep -cE '^ +/\*[0-9a-f]{4}\*/' "$OUT/sass.txt") instructions of della's 16-bit kernels in sass.txt"
fi

note "total $(elapsed); status $status"
printf '%s\n' "${summary[@]}" >"$OUT/summary.txt"
echo
echo "================ summary"
cat "$OUT/summary.txt"
exit $status
