"""Model families: what differs between Stable Diffusion 1.x/2.x, SDXL, FLUX.1, SD3 and FLUX.2 [klein], behind one
abstract interface.

The trainer, class images, validation, inference, evaluation and export ask a `ModelFamily` for everything that
depends on the model: its components and how they load, the layers BOFT wraps (and which text encoders it may
train), the flags only it reads, how prompts become the denoiser's conditioning, the training maths (an
`Objective`: the timestep draw, how the posterior's latents are normalised and noised, the target and its loss
weight, the forward call), the sampling scheduler and its defaults, the pipeline class, the default resolution, the
step's activations for --dry_run, and the export key maps. A family is one file here (stable_diffusion.py: SD 1.x
and 2.x; stable_diffusion_xl.py: SDXL's two text encoders and size-and-crop conditioning; flux.py: FLUX.1's
rectified-flow transformer, with its single-file layout in flux_layout.py; stable_diffusion_3.py: SD3's MMDiT and
three text encoders, its layout in sd3_layout.py; flux2_klein.py: FLUX.2 [klein]'s transformer over normalised
patchified latents and Qwen3, its layout within) plus its tests; the DDPM families share their maths (diffusion.py),
the flow-matching ones theirs and their pipelines' sampling, loading and export (flow_matching.py), and the
single-file layouts' machinery (transformer_layout.py). `family_of` picks a family from the
pipeline class named in the model's model_index.json, never from its name.
"""

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from utils import quiet
from utils.errors import UserError


@dataclass
class Components:
    """The pipeline parts a training run uses, by their pipeline names (text encoders and tokenizers: one for SD
    1.x/2.x, two for SDXL)."""

    vae: object
    denoiser: object  # the model trained on the noisy latents: the UNet of SD 1.x/2.x and SDXL
    noise_scheduler: object
    text_encoders: dict = field(default_factory=dict)
    tokenizers: dict = field(default_factory=dict)


class TrainingTerms(NamedTuple):
    """What one batch gives the denoiser and the loss: its input, its timestep argument, the target it regresses
    and, where the family's objective weights examples (flow matching's weighting schemes), their loss weights."""

    model_input: object
    timesteps: object
    target: object
    weight: object = None


class Objective(ABC):
    """A family's training maths over one run's components: how each example's timestep is drawn, how latents
    become the denoiser's input and target, and the forward call (utils/run/loss.py runs them)."""

    @abstractmethod
    def draw_timestep(self, generator):
        """One example's timestep (or its index in the schedule) from its own generator (see utils/run/dataset.py)."""

    @abstractmethod
    def terms(self, mean, std, latent_eps, noise, timesteps) -> TrainingTerms:
        """The batch's TrainingTerms: latents from the VAE posterior's mean and std with `latent_eps`, normalised as
        the family's VAE needs, noised with `noise` at the drawn `timesteps`."""

    @abstractmethod
    def predict(self, denoiser, model_input, timesteps, conditioning: dict):
        """The denoiser's forward call: its prediction of the target, shaped like it."""


# Flags that only some families read: given for another family they are a usage error, not silently ignored.
FAMILY_FLAGS = ("tokenizer_name", "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale",
                "max_sequence_length", "precondition_outputs")


class ModelFamily(ABC):
    """The interface; see stable_diffusion.py for the first implementation. A family that lacks a member fails when
    it is defined (a class attribute) or instantiated (a method), naming what is missing."""

    REQUIRED_ATTRIBUTES = ("name", "pipeline_class_names", "component_folders", "denoiser_part", "denoiser_label",
                           "denoiser_target_modules", "trainable_text_encoders", "text_encoder_target_modules",
                           "default_resolution", "resolution_multiple", "accepted_flags", "kohya_prefixes")
    name: str  # as users know it, for messages
    pipeline_class_names: tuple[str, ...]  # model_index.json _class_name values of this family
    component_folders: tuple[str, ...]  # sub-folders a pipeline folder of this family must have
    denoiser_part: str  # the denoiser's folder in a pipeline and in a run's output ("unet", or "transformer")
    denoiser_label: str  # as users know it, for messages ("UNet")
    denoiser_target_modules: tuple[str, ...]  # Linear layers of the denoiser that get BOFT adapters
    trainable_text_encoders: tuple[str, ...]  # the text encoders --train_text_encoder puts BOFT on (FLUX: not T5)
    text_encoder_target_modules: tuple[str, ...]  # ... of each of them
    default_resolution: int
    resolution_multiple: int  # what the VAE's downsampling and the denoiser's patches divide
    accepted_flags: tuple[str, ...]  # which of FAMILY_FLAGS this family reads
    kohya_prefixes: dict  # part -> kohya's adapter key prefix, as the web UIs read it ("lora_unet", "lora_te", ...)
    takes_negative_prompt = True  # its pipeline's classifier-free guidance reads a negative prompt
    launcher_recipe: tuple[str, ...] = ()  # flags train_dreambooth.sh adds for this family (utils/recipe.py)
    vae_overflows_in_fp16 = False  # the VAE stays fp32 under mixed precision unless another VAE is given
    vae_class_name = "AutoencoderKL"  # the diffusers class of its vae/ (and of a replacement VAE)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        missing = [name for name in cls.REQUIRED_ATTRIBUTES if not hasattr(cls, name)]
        if missing:
            raise TypeError(f"model family {cls.__name__} does not define {', '.join(missing)}")

    def check_flags(self, flags, resolution: int) -> None:
        """Flags this family cannot honour, as a UserError, before anything loads; families add their own checks."""
        for name in FAMILY_FLAGS:
            if getattr(flags, name) is not None and name not in self.accepted_flags:
                takers = [f.name for f in _families() if name in f.accepted_flags]
                takers = " and ".join([", ".join(takers[:-1]), takers[-1]] if len(takers) > 2 else takers)
                raise UserError(f"--{name} applies to {takers}; {self.name} does not read it: drop the flag")
        if problem := self.resolution_problem(resolution, "trains"):
            raise UserError(problem)

    def resolution_problem(self, resolution: int, verb: str) -> str | None:
        """Why the family cannot train or generate (`verb`) at `resolution` px, or None."""
        multiple = self.resolution_multiple
        if resolution % multiple:
            return (f"{self.name} {verb} at resolutions that are multiples of {multiple}; got {resolution}: use "
                    f"{max(multiple, resolution // multiple * multiple)}")
        return None

    # --- loading -------------------------------------------------------------------------------------------------
    @abstractmethod
    def load(self, source: str, revision=None, tokenizer_name=None, vae_name=None, dtype=None) -> Components:
        """The components from pretrained weights, the denoiser and text encoders in `dtype` (the frozen weights'
        training dtype; None: as stored); `vae_name` (--pretrained_vae_model_name_or_path) replaces the VAE."""

    @abstractmethod
    def empty_models(self, source: str, revision=None) -> tuple[object, dict]:
        """(denoiser, {part: text encoder}) built from their configs on the meta device: shapes, no weights."""

    # --- text ----------------------------------------------------------------------------------------------------
    @abstractmethod
    def prompt_ids(self, components: Components, prompts: dict, config) -> dict:
        """The token ids a dataset row carries for each prompt, by dataset part (0: instance, 1: class); a prompt
        longer than the text encoder reads is named in a warning. `config`: the run's RunConfig (where the family
        reads its own flags, as --max_sequence_length)."""

    @abstractmethod
    def conditioning(self, components: Components, prompts: dict, trained: bool, device, dtype, config):
        """A callable batch -> the denoiser's conditioning keyword arguments for the prompts by dataset part. Frozen
        text encoders run here, once per prompt; trained ones (components holds them as prepared) every step."""

    # --- the training maths (diffusion.py for the DDPM families, flow_matching.py for the flow-matching ones) -----
    @abstractmethod
    def objective(self, components: Components, config) -> "Objective":
        """The training maths of a run (RunConfig `config`) over its loaded components."""

    @abstractmethod
    def meta_step(self, denoiser, resolution: int, rows: int, dtype, config):
        """A forward call of the meta-device `denoiser` on inputs of one training step's shapes: what
        utils/run/activations.py counts for --dry_run."""

    # --- generating ----------------------------------------------------------------------------------------------
    @abstractmethod
    def sampling_scheduler(self, scheduler_config):
        """The scheduler to sample with (validation, class images with --class_scheduler dpm, inference), from the
        training scheduler's config."""

    def generation_arguments(self, config) -> dict:
        """Keyword arguments of the family's pipeline that make validation and class images see prompts as the
        run trains on them (FLUX: --max_sequence_length); none for Stable Diffusion."""
        return {}

    def sampling_defaults(self, pipeline) -> tuple[int, float]:
        """(denoising steps, guidance scale) generating with this pipeline when the user gives neither."""
        return 25, 7.5

    @abstractmethod
    def pipeline(self, components: Components, scheduler):
        """A generation pipeline over components in memory (validation)."""

    @abstractmethod
    def load_pipeline(self, source: str, revision=None, dtype=None, vae_name=None):
        """The family's generation pipeline from pretrained weights (class images, inference)."""

    # --- export --------------------------------------------------------------------------------------------------
    @abstractmethod
    def single_file_tensors(self, state_of, pipeline) -> dict:
        """The merged model in the layout of the family's own single-file checkpoints (--format checkpoint);
        `state_of(part)` gives a part's merged diffusers state dict."""

    def difference_tensors(self, changes: dict, state_of) -> dict:
        """LyCORIS "full" tensors for ComfyUI and the web UIs (--format comfyui): merged - base of each changed
        weight (`.diff`) and trained bias (`.diff_b`), under kohya's names; `changes`: {part: {name: (base,
        merged)}}, `state_of(part)`: a part's state dict (for the shapes of what did not change)."""
        from utils.original_layout import kohya_name

        tensors = {}
        for part, changed in changes.items():
            for name, (base, merged) in changed.items():
                module, kind = name.rsplit(".", 1)
                key = f"{kohya_name(self.kohya_prefixes[part], module)}.{'diff_b' if kind == 'bias' else 'diff'}"
                tensors[key] = merged.float() - base.float()
        return tensors

    def lora_keys(self, part: str, module: str) -> tuple[str, str, str | None]:
        """(down, up, alpha) keys of one layer's LoRA in the file --format lora writes: kohya's names, as the web
        UIs and diffusers' load_lora_weights read them for Stable Diffusion."""
        from utils.original_layout import kohya_name

        key = kohya_name(self.kohya_prefixes[part], module)
        return f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"

    @abstractmethod
    def base_model_version(self, pipeline) -> str:
        """kohya's ss_base_model_version of this model, for adapter files' metadata."""


def _families() -> list[ModelFamily]:
    from utils.families.flux import Flux
    from utils.families.flux2_klein import Flux2Klein
    from utils.families.stable_diffusion import StableDiffusion
    from utils.families.stable_diffusion_3 import StableDiffusion3
    from utils.families.stable_diffusion_xl import StableDiffusionXL

    return [StableDiffusion(), StableDiffusionXL(), Flux(), StableDiffusion3(), Flux2Klein()]


def load_vae(source: str, revision=None, vae_name=None, dtype=None, class_name="AutoencoderKL"):
    """The pipeline's own VAE, or a replacement (a folder or hub id holding one at its top level), of the family's
    VAE class `class_name`."""
    import diffusers

    vae_class = getattr(diffusers, class_name)
    if vae_name:
        return vae_class.from_pretrained(vae_name, dtype=dtype)
    return vae_class.from_pretrained(source, subfolder="vae", revision=revision, dtype=dtype)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, at the time of the call."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def read_config(name_or_path: str, filename: str, revision, what: str, flag: str, layout: str) -> dict:
    """`filename` (JSON) of a local folder or a hub id, the only file fetched, for the model `flag` names; UserErrors
    say how to fix. `what`: "model", "VAE"; `layout`: what the folder should be."""
    folder = Path(name_or_path)
    if folder.is_dir():
        if not (folder / filename).is_file():
            raise UserError(f"the {what} folder {name_or_path} has no {filename}: pass {layout}")
        return json.loads((folder / filename).read_text())
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"the {what} folder {name_or_path} does not exist")
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(name_or_path, filename, revision=revision)).read_text())
    except Exception as error:  # huggingface_hub raises many types here; all mean "cannot reach this model"
        reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if hub_offline() else type(error).__name__
        raise UserError(
            f"cannot load the {what} {name_or_path} ({reason}). Download it once with network access "
            f"(`hf download {name_or_path}`), or pass a local folder in diffusers layout to {flag}"
        ) from None


def read_model_index(name_or_path: str, revision=None) -> dict:
    """model_index.json of a local pipeline folder or a hub id."""
    return read_config(name_or_path, "model_index.json", revision, "model", "--pretrained_model_name_or_path",
                       "a pipeline folder in diffusers layout (as written by save_pretrained)")


def check_vae(vae_name, family: ModelFamily) -> None:
    """A replacement VAE (--pretrained_vae_model_name_or_path; None: the model's own) is of the family's VAE class."""
    if vae_name is None:
        return
    wanted = family.vae_class_name
    class_name = read_config(vae_name, "config.json", None, "VAE", "--pretrained_vae_model_name_or_path",
                             f"a folder holding an {wanted} (its config.json and weights)").get("_class_name")
    if class_name != wanted:
        found = class_name or "model of no named class"
        raise UserError(f"--pretrained_vae_model_name_or_path {vae_name} holds a {found}, not an {wanted} (the VAE "
                        f"{family.name} decodes with)")


def family_of(name_or_path: str, revision=None) -> ModelFamily:
    """The family of a pipeline (local folder or hub id), after checking its folder has the family's components.
    Every tool asks this before it loads a model, so the dependencies' model-loading bars go off here."""
    quiet.hide_loading_bars()
    return read_family(name_or_path, revision)


def read_family(name_or_path: str, revision=None) -> ModelFamily:
    """family_of without importing the model libraries (for utils/recipe.py, which loads no model)."""
    class_name = read_model_index(name_or_path, revision).get("_class_name")
    for family in _families():
        if class_name in family.pipeline_class_names:
            if Path(name_or_path).is_dir():
                missing = [f for f in family.component_folders if not (Path(name_or_path) / f).is_dir()]
                if missing:
                    raise UserError(
                        f"the model folder {name_or_path} has no {', '.join(f + '/' for f in missing)} sub-folder: "
                        "pass a pipeline folder in diffusers layout (as written by save_pretrained)"
                    )
            return family
    supported = "; ".join(f"{f.name} ({', '.join(f.pipeline_class_names)})" for f in _families())
    raise UserError(f"{name_or_path} is a {class_name or 'pipeline of no named class'}; this trainer supports {supported}")


def weight_dtype(mixed_precision):
    """The dtype frozen weights take under accelerate's mixed precision setting."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def vae_dtype(family, mixed_precision, vae_replaced: bool):
    """The VAE's dtype in training: the mixed-precision one, but fp32 for a family whose VAE overflows in fp16
    (SDXL's) unless another VAE was given."""
    import torch

    return torch.float32 if family.vae_overflows_in_fp16 and not vae_replaced else weight_dtype(mixed_precision)


def cast_frozen(model, dtype):
    """Frozen weights take the mixed-precision dtype; trainable (adapter) parameters are fp32 (peft creates them in
    the dtype of the weights they adapt, which a base loaded in bf16 has). Quantized weights (integer codes) stay."""
    import torch

    for parameter in model.parameters():
        if not parameter.is_floating_point():
            continue
        parameter.data = parameter.data.to(torch.float32 if parameter.requires_grad else dtype)


def enable_xformers(unet) -> str | None:
    """xformers attention where it works (CUDA and the package); otherwise a warning and PyTorch SDPA stays."""
    import torch
    from diffusers.utils.import_utils import is_xformers_available

    if not (torch.cuda.is_available() and is_xformers_available()):
        return "xformers needs CUDA and the xformers package; using PyTorch scaled-dot-product attention"
    try:
        unet.enable_xformers_memory_efficient_attention()
    except Exception as error:  # a wheel built for another torch fails here; SDPA is the safe fallback
        return f"xformers failed ({error}); using PyTorch scaled-dot-product attention"
    return None
