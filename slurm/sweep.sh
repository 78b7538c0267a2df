#!/usr/bin/env bash
# The paper's evaluation on Slurm in one command: train the subjects (a job array), evaluate each subject once its
# own training succeeded, then gather the table whatever the evaluations' outcome (subjects missing are listed).
#   slurm/sweep.sh [SUBJECTS] [sbatch options for the three jobs...]
#   slurm/sweep.sh                                          # the 30 subjects
#   MODEL_NAME=stable-diffusion-v1-5/stable-diffusion-v1-5 slurm/sweep.sh 0-29%8 --partition=a100 --account=lab
# SUBJECTS takes sbatch's --array forms (0-29, 5,11, 0-29%8: at most 8 at once). The environment (MODEL_NAME,
# OUTPUT_DIR, BLOCK_*, TRAIN_ARGS, EVAL_ARGS, ...) goes to every job, as sbatch exports it. Prints the jobs' ids.
set -euo pipefail
cd "$(dirname "$0")/.."
ARRAY=0-29
if [[ $# -gt 0 && $1 != -* ]]; then  # else sbatch options alone: all the subjects
  ARRAY=$1
  shift
fi
if [[ ! $ARRAY =~ ^[0-9][0-9,%-]*$ ]]; then
  echo "usage: $0 [SUBJECTS (0-29, 5,11, 0-29%8)] [sbatch options...]" >&2
  exit 2
fi
export SUBJECTS=${ARRAY%\%*}  # the table's subjects: the array without its throttle
submit() { sbatch --parsable "$@" | cut -d';' -f1; }
TRAIN=$(submit --array="$ARRAY" "$@" slurm/train_subjects.sbatch)
# A subject whose training failed gets no evaluation (its task is cancelled, not left waiting); the table lists it.
EVALUATE=$(submit --array="$ARRAY" --dependency="aftercorr:$TRAIN" --kill-on-invalid-dep=yes "$@" \
  slurm/evaluate_subjects.sbatch)
TABLE=$(submit --dependency="afterany:$EVALUATE" "$@" slurm/report.sbatch)
printf 'train %s\nevaluate %s\ntable %s\n' "$TRAIN" "$EVALUATE" "$TABLE"
echo "The table: $(./train_dreambooth.sh --subject 0 | cut -f5)/sweep/table.md once job $TABLE ends" >&2
