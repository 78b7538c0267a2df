# Sourced by the batch scripts in slurm/ once they found the repository (REPO_DIR): its Python, the subject of this
# array task, and running a command as a job step that stop signals reach. Not a job of its own.
cd "$REPO_DIR"
# The project's own environment when there is one (make install), else the Python of the submitting shell's PATH.
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $REPO_DIR/.venv/bin/python ]]; then PYTHON=$REPO_DIR/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON

note() {
  local task=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-}}_${SLURM_ARRAY_TASK_ID:-}
  echo "[$(date '+%F %T')] ${SLURM_JOB_NAME:-job} $task: $*" >&2
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

# run_step SRUN_COMMAND...: run a job step in the background and wait for it, so that a signal to this batch shell
# (--signal=B:TERM@..., scancel --batch or --full) is acted on at once: it is passed on to the step's tasks with
# `scancel --signal` (srun itself would turn a SIGTERM into a SIGKILL of its tasks), and the shell waits for them to
# save and end. STEP_STATUS: the step's exit status.
run_step() {
  "$@" &
  local step=$!
  trap 'note "SIGTERM: passed on to the job step"; scancel --quiet --signal=TERM "$SLURM_JOB_ID" || true' TERM
  trap 'scancel --quiet --signal=INT "$SLURM_JOB_ID" || true' INT
  STEP_STATUS=0
  wait "$step" || STEP_STATUS=$?
  while kill -0 "$step" 2>/dev/null; do  # wait returned early, for a trapped signal: wait for the step to end
    STEP_STATUS=0
    wait "$step" || STEP_STATUS=$?
  done
  trap - TERM INT
}
