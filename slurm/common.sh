# Sourced by the batch scripts in slurm/ once they found the repository (REPO_DIR): its Python, the subject of this
# array task, and running a command as a job step that stop signals reach. Not a job of its own.
cd "$REPO_DIR"
# The project's own environment when there is one (make install), else the Python of the submitting shell's PATH.
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $REPO_DIR/.venv/bin/python ]]; then PYTHON=$REPO_DIR/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON

# This task's own name for scontrol and scancel: an array task's job id alone can also be its array's id (the
# array's last task keeps it), which names every task of the array.
if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
  THIS_TASK=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
else
  THIS_TASK=${SLURM_JOB_ID:-}
fi

note() {
  echo "[$(date '+%F %T')] ${SLURM_JOB_NAME:-job} $THIS_TASK: $*" >&2
}

# The array task's subject, as the launcher's table and defaults give it (MODEL_NAME, OUTPUT_DIR, BLOCK_* and
# DATASET_DIR from the environment, exported by sbatch).
subject_of_task() {
  if [[ -z ${SLURM_ARRAY_TASK_ID:-} ]]; then
    note "submit as a job array: sbatch --array=0-29 (the subjects of ./train_dreambooth.sh; 5,11 for some)"
    exit 2
  fi
  IDX=$SLURM_ARRAY_TASK_ID
  if ! IFS=$'\t' read -r SUBJECT CLASS_NOUN RUN_NAME MODEL_NAME OUTPUT_DIR INSTANCE_DIR \
    < <(./train_dreambooth.sh --subject "$IDX"); then
    note "no subject $IDX in ./train_dreambooth.sh's table (0-29)"
    exit 2
  fi
}

# run_step COMMAND...: run the training (the node's launcher, or srun starting one per node) in the background and
# wait for it, so that a signal to this batch shell (--signal=B:TERM@..., scancel --batch or --full, preemption) is
# acted on at once: it is passed on and the shell waits for the training to save and end. To a launcher it is passed
# with kill; to the tasks of an srun step with `scancel --signal` (a SIGTERM to srun itself would make it SIGKILL
# them). STEP_STATUS: the command's exit status.
run_step() {
  "$@" &
  local step=$!
  if [[ $1 == srun ]]; then
    trap 'note "SIGTERM: passed on to the job step"; scancel --quiet --signal=TERM "$THIS_TASK" || true' TERM
    trap 'scancel --quiet --signal=INT "$THIS_TASK" || true' INT
  else
    trap 'note "SIGTERM: passed on to the launcher"; kill -TERM '"$step"' 2>/dev/null || true' TERM
    trap 'kill -INT '"$step"' 2>/dev/null || true' INT
  fi
  STEP_STATUS=0
  wait "$step" || STEP_STATUS=$?
  while kill -0 "$step" 2>/dev/null; do  # wait returned early, for a trapped signal: wait for the training to end
    STEP_STATUS=0
    wait "$step" || STEP_STATUS=$?
  done
  trap - TERM INT
}
