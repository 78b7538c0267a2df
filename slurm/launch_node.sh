#!/usr/bin/env bash
# One node's part of a training task (slurm/train_subjects.sbatch runs it, through srun on several nodes):
# accelerate's machine flags from Slurm's variables, then ./train_dreambooth.sh IDX resuming from the run's newest
# checkpoint when it has one.
#   machines: SLURM_NTASKS (one task per node)      this machine's rank: SLURM_PROCID
#   processes: machines x GPUS_PER_NODE (default SLURM_GPUS_ON_NODE, else 1)
#   main process: the first host of SLURM_JOB_NODELIST, port MAIN_PROCESS_PORT (default 29500 + job id mod 10000)
#   kind: DDP (--multi_gpu), or what a --config_file in ACCELERATE_ARGS says (configs/fsdp.yaml: FSDP)
set -euo pipefail
IDX=$1
MACHINES=${SLURM_NTASKS:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
PROCESSES=$((MACHINES * GPUS_PER_NODE))
MACHINE_FLAGS=""
if ((PROCESSES > 1)); then
  MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  # DDP unless ACCELERATE_ARGS names a --config_file, which says its own kind (configs/fsdp.yaml, DeepSpeed).
  [[ " ${ACCELERATE_ARGS:-} " =~ \ --config_file[=\ ] ]] || MACHINE_FLAGS="--multi_gpu"
  MACHINE_FLAGS+=" --num_processes $PROCESSES --num_machines $MACHINES --machine_rank ${SLURM_PROCID:-0}"
  MACHINE_FLAGS+=" --main_process_ip $MAIN_HOST --main_process_port ${MAIN_PROCESS_PORT:-$((29500 + SLURM_JOB_ID % 10000))}"
fi
export ACCELERATE_ARGS="$MACHINE_FLAGS ${ACCELERATE_ARGS:-}"
read -r -a TRAIN_FLAGS <<< "${TRAIN_ARGS:-}"
exec ./train_dreambooth.sh "$IDX" --resume_from_checkpoint=latest "${TRAIN_FLAGS[@]}"
