"""Adapters and training state on disk: atomic folders, exact resume, and refusing incompatible resumes.

Where they go is utils/layout.py's business; a checkpoint folder holds:
    unet/, text_encoder/                              adapter weights (safetensors, through the hooks)
    optimizer.bin, scheduler.bin, random_states_*.pkl optimizer, lr schedule, every process's RNG
    train_state.json                                  TrainState, compatibility settings, file sizes
Every folder is written under a temporary name and renamed when complete.
"""

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import SafetensorError

from utils.atomic import atomic_folder
from utils.errors import UserError
from utils.layout import RunLayout

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
# Settings a checkpoint's weights, optimizer and data position depend on; resuming with others is refused.
COMPATIBILITY_SETTINGS = (
    "pretrained_model_name_or_path",
    "learning_rate",
    "revision",
    "pretrained_vae_model_name_or_path",
    "boft_block_num",
    "boft_block_size",
    "boft_n_butterfly_factor",
    "boft_bias",
    "unet_target_modules",
    "text_encoder_target_modules",
    "train_text_encoder",
    "with_prior_preservation",
    "train_batch_size",
    "gradient_accumulation_steps",
    "num_processes",
    "base_quantization",  # absent from older checkpoints: None, as unquantized runs have it
)


@dataclass
class TrainState:
    """Where a run stands: what a checkpoint records and a resume restores."""

    seed: int
    global_step: int = 0
    epoch: int = 0
    batches_done_in_epoch: int = 0


def _write_failed(final: Path, error: Exception) -> UserError:
    reason = getattr(error, "strerror", None) or str(error)
    return UserError(
        f"could not write {final}: {reason}. Earlier checkpoints and adapters are intact; free disk space "
        "or fix the folder's permissions, then resume with --resume_from_checkpoint latest"
    )


# safetensors reports a full disk as an error of its own
WRITE_ERRORS = (OSError, SafetensorError)


def save_adapters(models: dict, layout: RunLayout, step: int, state_dicts=None) -> list[Path]:
    """Save each PeftModel's adapter (named after the run) where the layout puts it, in stock peft layout;
    `state_dicts` (by model name) are full state dicts to take the weights from, as accelerate's get_state_dict
    gives them."""
    written, adapter_name = [], layout.run
    for model_name, peft_model in models.items():
        final = layout.adapter(model_name, step)  # other subjects' adapters stay untouched
        try:
            with atomic_folder(final) as partial:
                staging = partial / ".staging"
                peft_model.save_pretrained(staging, selected_adapters=[adapter_name],
                                           state_dict=(state_dicts or {}).get(model_name))
                for file in (staging / adapter_name).iterdir():
                    file.rename(partial / file.name)
                shutil.rmtree(staging)
        except WRITE_ERRORS as error:
            try:
                final.parent.rmdir()  # the step's folder, when this was its first part
            except OSError:
                pass
            raise _write_failed(final, error) from None
        written.append(final)
    return written


def rerun_problem(layout: RunLayout, config) -> str | None:
    """Why a run that neither resumes nor overwrites cannot start: its name already has files in the output folder
    (a finished adapter would be replaced, a second run mixed into its logs). None when it can."""
    if config.resume_from_checkpoint or config.overwrite_run:
        return None
    existing = layout.run_files(config.logging_dir)
    if not existing:
        return None
    steps = layout.adapter_steps()
    shown = f"adapters at steps {', '.join(map(str, steps))}" if steps else ", ".join(str(p) for p in existing[:3])
    return (f"the run {layout.run!r} already has files in {layout.output_dir} ({shown}). Continue it with "
            "--resume_from_checkpoint latest, start it anew with --overwrite_run (removes them), or train under "
            "another --wandb_run_name")


def remove_run_files(layout: RunLayout, config, accelerator) -> None:
    """--overwrite_run: the main process removes the run's earlier files (under the run lock); the others wait."""
    if accelerator.is_main_process:
        removed = layout.run_files(config.logging_dir)
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
            try:
                path.parent.rmdir()  # a step's folder that held this run's adapter alone
            except OSError:
                pass
        if removed:
            logger.info("--overwrite_run: removed %d folder(s) of the earlier run %r", len(removed), layout.run)
    accelerator.wait_for_everyone()


def compatibility_settings(config, family) -> dict:
    """The run's values of COMPATIBILITY_SETTINGS (the learning rate as the optimizer uses it)."""
    values = config.as_dict()
    values["unet_target_modules"] = list(family.denoiser_target_modules)  # the key older checkpoints have
    values["text_encoder_target_modules"] = list(family.text_encoder_target_modules) if config.train_text_encoder else []
    return {key: values[key] for key in COMPATIBILITY_SETTINGS}


def _file_sizes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def save_checkpoint(accelerator, layout: RunLayout, state: TrainState, settings: dict, total_limit=None) -> Path:
    """accelerate save_state on every process (each saves its RNG state), then the TrainState; atomically.

    All processes write into one temporary folder; the main process renames it once everything is there.
    """
    final = layout.checkpoint(state.global_step)
    try:
        with atomic_folder(final, shared=True, owner=accelerator.is_main_process) as partial:
            accelerator.wait_for_everyone()  # the main process made the folder
            accelerator.save_state(str(partial))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                record = {"train_state": asdict(state), "settings": settings, "files": _file_sizes(partial)}
                (partial / STATE_FILE).write_text(json.dumps(record, indent=2))
    except WRITE_ERRORS as error:
        raise _write_failed(final, error) from None
    accelerator.wait_for_everyone()
    if total_limit and accelerator.is_main_process:
        for old in complete_checkpoints(layout)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
            logger.info("Removed %s (--checkpoints_total_limit %d)", old, total_limit)
    return final


def _checkpoint_problem(folder: Path):
    """Why a checkpoint folder cannot be resumed from, or None when it is complete."""
    try:
        record = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return f"{STATE_FILE} is missing or unreadable"
    for name, size in record.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or truncated"
    return None


def complete_checkpoints(layout: RunLayout) -> list[Path]:
    """The run's complete checkpoint folders, oldest first; incomplete ones are skipped with a warning."""
    complete = []
    for folder in layout.checkpoint_folders():
        problem = _checkpoint_problem(folder)
        if problem:
            logger.warning("Skipping checkpoint %s: %s", folder, problem)
        else:
            complete.append(folder)
    return complete


def find_resume_checkpoint(resume_from, layout: RunLayout):
    """The folder --resume_from_checkpoint names, the run's newest complete one for "latest", or None.

    A name such as checkpoint-400 is looked up in the run's checkpoint folder first, then as a path."""
    if resume_from == "latest":
        found = complete_checkpoints(layout)
        if found:
            return found[-1]
        logger.info("No checkpoint of run %r in %s: starting from the beginning", layout.run, layout.checkpoints)
        if legacy := layout.legacy_checkpoints():
            logger.warning("%s holds checkpoint folders of the layout before runs had their own (%s); they may belong "
                           "to any subject, so 'latest' does not use them: pass one with --resume_from_checkpoint PATH",
                           layout.output_dir, ", ".join(p.name for p in legacy))
        return None
    folder = next((f for f in (layout.checkpoints / resume_from, Path(resume_from)) if f.is_dir()), None)
    if folder is None:
        raise UserError(f"--resume_from_checkpoint {resume_from}: no such folder (nor in {layout.checkpoints})")
    problem = _checkpoint_problem(folder)
    if problem:
        raise UserError(f"--resume_from_checkpoint {folder} cannot be used: {problem}")
    return folder


def read_checkpoint(folder: Path, settings: dict) -> TrainState:
    """The TrainState of a checkpoint, after checking it was written with compatible settings."""
    record = json.loads((Path(folder) / STATE_FILE).read_text())
    saved = record["settings"]
    differing = [key for key in settings if saved.get(key) != settings[key]]
    if differing:
        details = "; ".join(f"--{key}: checkpoint {saved.get(key)!r}, now {settings[key]!r}" for key in differing)
        raise UserError(
            f"cannot resume from {folder}: it was written with different settings ({details}). Use the settings "
            "it was written with, or start a new run under another --wandb_run_name"
        )
    return TrainState(**record["train_state"])


def adapter_state_dict(accelerator, model) -> dict:
    """What save_adapters takes a model's weights from, called on every process. Under FSDP, the trained weights
    alone (BOFT's and any trained bias) made whole from their shards (a collective), the sharded base left as it is;
    otherwise accelerate's state dict (under DeepSpeed it gathers the weights)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return accelerator.get_state_dict(model)
    from utils.boft.peft_seam import ADAPTER_WEIGHT_MARK

    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return {name: (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).cpu()
            for name, tensor in model.state_dict().items() if ADAPTER_WEIGHT_MARK in name or name in trained}


def register_adapter_hooks(accelerator, adapter_name: str, model_names: dict) -> None:
    """Make save_state/load_state store only the adapters, as safetensors, instead of pickling whole models (under
    FSDP accelerate saves and loads the sharded models itself, base included, and the hooks see none).

    `model_names` maps id(unwrapped model) to its folder name ("unet", "text_encoder", ...).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    def name_of(model):
        return model_names[id(accelerator.unwrap_model(model))]

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process and weights:  # no weights: FSDP saved the models already
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(
                    Path(output_dir, name_of(model)), selected_adapters=[adapter_name]
                )
        weights.clear()

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            path = Path(input_dir, name_of(model), adapter_name, "adapter_model.safetensors")
            result = set_peft_model_state_dict(accelerator.unwrap_model(model), load_file(path), adapter_name)
            if result.unexpected_keys:
                raise UserError(f"{path} holds weights this model does not have: {result.unexpected_keys[:3]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
