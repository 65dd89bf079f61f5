#!/bin/bash
# The same split on one machine or over ssh: 4 parts, then assemble and verify.
#   bash examples/jobs/shell-loop.sh recipe.yaml merged
set -euo pipefail
recipe=${1:?usage: shell-loop.sh RECIPE OUT}
out=${2:?usage: shell-loop.sh RECIPE OUT}
n=4
parts=$(mktemp -d)
for i in $(seq 1 $n); do
  npx della-merge run "$recipe" --out "$parts/part-$i" --part "$i/$n" --threads 1 --quiet &
done
wait
npx della-merge assemble --out "$out" "$parts"/part-*
npx della-merge verify "$out" --recipe "$recipe"
rm -rf "$parts"
