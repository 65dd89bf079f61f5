#!/usr/bin/env bash
# Alternates kernel-driver builds and prints each one's best and all its figures:
#   bash bench/native/ab.sh ROUNDS "method threads K dtype" DRIVER_A DRIVER_B [...]
# e.g. bash bench/native/ab.sh 10 "della 1 3 2" /tmp/old/della_kernel_driver build-ctest/della_kernel_driver
# On this shared VM one core can run a third slower than the other for minutes, so a
# change is judged by the best figure of many alternating runs, not by one pair.
# DATA=rnd for random deltas (default: few-ulp, DELLA_DRIVER_DATA=ulp); ITERS sets the
# driver's own repeats (default 3).
set -euo pipefail
rounds=$1 args=$2
shift 2
declare -A best all
for ((i = 0; i < rounds; i++)); do
  for b in "$@"; do
    # shellcheck disable=SC2086
    v=$(DELLA_DRIVER_DATA=${DATA:-ulp} ITERS=${ITERS:-3} "$b" $args | sed 's/.*: \([0-9.]*\) M\/s.*/\1/')
    best[$b]=$(awk -v a="$v" -v b="${best[$b]:-0}" 'BEGIN { print (a > b) ? a : b }')
    all[$b]="${all[$b]:-} $v"
  done
done
for b in "$@"; do echo "$b  best ${best[$b]} M/s :${all[$b]}"; done
