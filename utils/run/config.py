"""The run's configuration: the checked flags, frozen once, with every value derived from them computed here.

`RunConfig` has a field for every flag of utils/run/flags.py (lists become tuples), and the derived values the
run uses: the run name, the seed, the validation prompts, the resolution (the model family's default when not given),
the examples per epoch, the optimizer steps and the learning rate after --scale_lr. Nothing changes it afterwards
(it is a frozen dataclass); the flag values that a derived value replaces stay visible as `base_learning_rate` and
`max_train_steps_flag`.
"""

import dataclasses
import hashlib
import math

from utils.boft.shapes import BoftSettings
from utils.run.flags import build_parser, split_validation_prompts

# A field per flag destination (--cache_latents and --no_cache_latents share one), in the parser's order.
FLAG_NAMES = tuple(dict.fromkeys(action.dest for action in build_parser()._actions if action.dest != "help"))
_Flags = dataclasses.make_dataclass("_Flags", [(name, object) for name in FLAG_NAMES], frozen=True)


@dataclasses.dataclass(frozen=True)
class TimestepSampling:
    """How a flow-matching family draws training timesteps (diffusers' flags and defaults)."""

    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29


def run_seed(seed, run_name: str) -> int:
    """--seed, or a seed derived from the run name: the same on every run and every process."""
    if seed is not None:
        return seed
    return int(hashlib.sha256(run_name.encode()).hexdigest()[:8], 16)


def training_resolution(flags, family) -> int:
    """--resolution, or the model family's default."""
    return flags.resolution or family.default_resolution


def class_images_used(present: int, unreadable: int, num_class_images: int) -> int:
    """Class images the dataset will hold: the folder is filled up to --num_class_images files (unreadable ones
    count as present and are skipped), and at most --num_class_images are used."""
    return min(num_class_images, max(present, num_class_images) - unreadable)


@dataclasses.dataclass(frozen=True)
class RunConfig(_Flags):
    """Every flag (as parsed and checked) and the derived values, read-only."""

    run_name: str  # --wandb_run_name: names the adapters and the run's folders
    seed: int  # --seed, or derived from the run name
    resolution: int  # --resolution, or the model family's default
    validation_prompts: tuple  # --validation_prompt split into prompts
    num_processes: int
    num_examples: int  # per epoch: instance images, or class images when there are more of them
    max_train_steps: int  # optimizer steps: --max_train_steps, or epochs x optimizer steps per epoch
    max_train_steps_flag: object  # as given (None: from --num_train_epochs)
    base_learning_rate: float  # --learning_rate as given
    learning_rate: float  # what the optimizer uses: base, times processes x accumulation x batch with --scale_lr

    @classmethod
    def from_flags(cls, flags, family, num_processes: int, num_examples: int) -> "RunConfig":
        values = {name: tuple(v) if isinstance(v, list) else v for name, v in vars(flags).items() if name in FLAG_NAMES}
        batches = math.ceil(num_examples / (flags.train_batch_size * num_processes))  # per process and epoch
        steps = flags.max_train_steps or flags.num_train_epochs * math.ceil(batches / flags.gradient_accumulation_steps)
        scale = flags.gradient_accumulation_steps * flags.train_batch_size * num_processes if flags.scale_lr else 1
        values.update(
            run_name=flags.wandb_run_name,
            seed=run_seed(flags.seed, flags.wandb_run_name),
            resolution=training_resolution(flags, family),
            validation_prompts=tuple(split_validation_prompts(flags.validation_prompt)),
            num_processes=num_processes,
            num_examples=num_examples,
            max_train_steps=steps,
            max_train_steps_flag=flags.max_train_steps,
            base_learning_rate=flags.learning_rate,
            learning_rate=flags.learning_rate * scale,
        )
        return cls(**values)

    @property
    def boft(self) -> BoftSettings:
        return BoftSettings(self.boft_block_num, self.boft_block_size, self.boft_n_butterfly_factor, self.boft_dropout,
                            self.boft_bias, self.boft_impl)

    @property
    def timestep_sampling(self) -> TimestepSampling:
        given = {name: getattr(self, name) for name in ("weighting_scheme", "logit_mean", "logit_std", "mode_scale")}
        return TimestepSampling(**{name: value for name, value in given.items() if value is not None})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
