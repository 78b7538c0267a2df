"""Where a run's files go, and how to find them again: the one place that knows an output folder's layout.

Several subjects (runs) share one output folder; everything a run writes lives under its run name, so one run
never overwrites, resumes from or prunes another's files:

    OUTPUT_DIR/
      unet/{step}/{run}/                     the denoiser's adapters (stock peft folders), every --checkpointing_steps
                                             and at the end (a transformer-based family's: transformer/{step}/{run}/)
      text_encoder/{step}/{run}/             with --train_text_encoder (and text_encoder_2/ for SDXL)
      checkpoints/{run}/checkpoint-{step}/   full training state, for --resume_from_checkpoint
      checkpoints/{run}/run.lock             held while the run trains (utils/run/lock.py)
      validation/{run}/{step}/               validation images
      eval/{run}/{step}/                     utils.evaluate's generated images and scores
      eval/base/class/{key}/                 the base model's class images, one set per class prompt and settings
      sweep/                                 utils.sweep's table of every subject's scores (not a run's)
      logs/{run}/                            tensorboard events, wandb files
      hub/{run}/README.md                    the model card pushed with --push_to_hub
      latent_cache/                          VAE latents keyed by model and image content (shared, safe to share)
"""

from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError

# The denoiser's folder: a UNet's, or a diffusion transformer's; a run's adapters are found by it.
DENOISER_PARTS = ("unet", "transformer")
ADAPTER_PARTS = (*DENOISER_PARTS, "text_encoder", "text_encoder_2", "text_encoder_3")  # SDXL has two encoders
CHECKPOINT_PREFIX = "checkpoint-"


def step_of_checkpoint(folder: Path) -> int:
    """The step of a checkpoint-{step} folder, -1 for any other name."""
    suffix = Path(folder).name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if Path(folder).name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else -1


def check_run_name(name: str) -> str | None:
    """Why `name` cannot name a run's folders, or None: it must be one path component."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name.strip() != name:
        return (f"the run name {name!r} (--wandb_run_name) must be a plain folder name: no slashes, not empty, "
                "no leading or trailing spaces")
    if name == "base":
        return f"the run name {name!r} is reserved (eval/base holds the base model's images); choose another"
    return None


@dataclass(frozen=True)
class RunLayout:
    output_dir: Path
    run: str

    def __post_init__(self):
        object.__setattr__(self, "output_dir", Path(self.output_dir))

    # adapters ----------------------------------------------------------------------------------------------------
    def adapter(self, part: str, step: int) -> Path:
        return self.output_dir / part / str(step) / self.run

    @property
    def denoiser_part(self) -> str:
        """The folder the denoiser's adapters of this output folder are in (unet/ when there is none yet)."""
        return next((part for part in DENOISER_PARTS if (self.output_dir / part).is_dir()), DENOISER_PARTS[0])

    def adapter_steps(self, part: str | None = None) -> list[int]:
        root = self.output_dir / (part or self.denoiser_part)
        if not root.is_dir():
            return []
        return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / self.run).is_dir())

    def adapters_at(self, step: int) -> dict:
        """{part: folder} of the adapters saved at `step` (the text encoder only where it was trained)."""
        folders = {part: self.adapter(part, step) for part in ADAPTER_PARTS}
        return {part: folder for part, folder in folders.items() if (folder / "adapter_config.json").is_file()}

    def resolve_adapters(self, step="latest") -> tuple[int, dict]:
        """(step, {part: folder}) for a step or "latest"; a UserError listing what exists when there is none."""
        denoiser_root = self.output_dir / self.denoiser_part
        if not denoiser_root.is_dir():
            raise UserError(f"{self.output_dir} holds no {'/ or '.join(DENOISER_PARTS)}/ adapters (it holds: "
                            f"{_listing(self.output_dir)})")
        steps = self.adapter_steps()
        if not steps:
            names = sorted({a.name for s in denoiser_root.iterdir() if s.is_dir() for a in s.iterdir() if a.is_dir()})
            raise UserError(f"no adapter named {self.run!r} in {denoiser_root} (adapters there: {', '.join(names) or 'none'})")
        if str(step) == "latest":
            step = steps[-1]
        elif not str(step).isdigit():
            raise UserError(f"step {step!r} is not a number; give one of {', '.join(map(str, steps))} or latest")
        elif int(step) not in steps:
            raise UserError(f"adapter {self.run!r} has no step {step} in {denoiser_root} (steps: {', '.join(map(str, steps))})")
        return int(step), self.adapters_at(int(step))

    # training state ----------------------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.output_dir / "checkpoints" / self.run

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step}"

    def checkpoint_folders(self) -> list[Path]:
        """This run's checkpoint-{step} folders, oldest first (complete or not)."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir() if p.is_dir() and step_of_checkpoint(p) >= 0]
        return sorted(found, key=step_of_checkpoint)

    def legacy_checkpoints(self) -> list[Path]:
        """checkpoint-{step} folders at the top of the output folder, written before runs had their own."""
        return sorted((p for p in self.output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and step_of_checkpoint(p) >= 0),
                      key=step_of_checkpoint)

    @property
    def lock_file(self) -> Path:
        return self.checkpoints / "run.lock"

    # what a run shows --------------------------------------------------------------------------------------------
    def validation(self, step: int) -> Path:
        return self.output_dir / "validation" / self.run / str(step)

    def evaluation(self, step: int) -> Path:
        return self.output_dir / "eval" / self.run / str(step)

    def evaluated_steps(self) -> list[int]:
        """The steps utils.evaluate generated images of, oldest first."""
        root = self.output_dir / "eval" / self.run
        return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir()) if root.is_dir() else []

    @property
    def evaluation_plot(self) -> Path:
        return self.output_dir / "eval" / self.run / "scores_by_step.png"

    def base_class_images(self, key: str) -> Path:
        """The base model's class-prompt images made with the settings `key` names (shared by runs that match)."""
        return self.output_dir / "eval" / "base" / "class" / key

    def logs(self, logging_dir="logs") -> Path:
        """--logging_dir (relative to the output folder, or absolute) / run."""
        return self.output_dir / logging_dir / self.run

    @property
    def model_card(self) -> Path:
        return self.output_dir / "hub" / self.run / "README.md"

    def uploaded_patterns(self) -> list[str]:
        """What --push_to_hub uploads of the output folder: this run's adapters and validation images."""
        return [f"{part}/*/{self.run}/**" for part in ADAPTER_PARTS] + [f"validation/{self.run}/**"]

    @property
    def latent_cache(self) -> Path:
        return self.output_dir / "latent_cache"

    # a run's own files -------------------------------------------------------------------------------------------
    def run_files(self, logging_dir="logs") -> list[Path]:
        """Everything of this run in the output folder (not the shared cache, class images or the run lock): what a
        rerun would overwrite or mix with."""
        found = [self.adapter(part, step) for part in ADAPTER_PARTS for step in self.adapter_steps(part)]
        found += self.checkpoint_folders()
        found += [folder for folder in (self.output_dir / "validation" / self.run, self.output_dir / "eval" / self.run,
                                        self.logs(logging_dir), self.model_card.parent) if folder.exists()]
        return found


def sweep_folder(output_dir) -> Path:
    """Where utils.sweep writes the table of all the subjects trained into an output folder."""
    return Path(output_dir) / "sweep"


def _listing(folder: Path) -> str:
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return ", ".join(entries) if entries else "nothing"
