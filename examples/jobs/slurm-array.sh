#!/bin/bash
# Slurm: merge in 8 parts with a job array, then assemble once all succeeded.
#   sbatch examples/jobs/slurm-array.sh recipe.yaml
#SBATCH --job-name=della-merge
#SBATCH --array=1-8
#SBATCH --cpus-per-task=16
#SBATCH --mem=8G
#SBATCH --time=12:00:00
set -euo pipefail
recipe=${1:?usage: sbatch slurm-array.sh RECIPE}
n=${SLURM_ARRAY_TASK_COUNT}
i=${SLURM_ARRAY_TASK_ID}
npx della-merge run "$recipe" --out "parts/part-$i" --part "$i/$n" --threads "$SLURM_CPUS_PER_TASK" \
  --overwrite --quiet --report "reports/part-$i.json"
# The last array task to finish submits nothing; assemble with a dependent job instead:
#   jid=$(sbatch --parsable examples/jobs/slurm-array.sh recipe.yaml)
#   sbatch --dependency=afterok:$jid --wrap "npx della-merge assemble --out merged parts/part-* && npx della-merge verify merged --recipe recipe.yaml"
