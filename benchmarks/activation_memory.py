"""Activation memory of a training step at the real architectures' sizes, counted on the meta device without a
GPU or weights (utils/run/activations.py, what --dry_run prints for a run's own resolution and batch).

    python -m benchmarks.activation_memory                  # SD 1.5 at 512 px, SD 2.1 at 768, SDXL at 1024
    python -m benchmarks.activation_memory --arch flux-dev  # FLUX.1 [dev] at 512 and 1024 px, 512 T5 tokens
Batch 2: one instance and one class image, the launcher's recipe with prior preservation; bf16 weights.
"""

import argparse
from types import SimpleNamespace

import torch

from benchmarks.sd_architectures import ARCHITECTURES
from utils.run.activations import activation_bytes

GB = 2**30
RESOLUTIONS = {"sd15": (512,), "sd21": (768,), "sdxl": (1024,), "flux-dev": (512, 1024)}


def meta_denoiser(arch: str):
    """(family, the frozen denoiser of `arch` on the meta device)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from benchmarks.flux_architecture import FLUX_DEV_TRANSFORMER
    from utils.families.flux import Flux
    from utils.families.stable_diffusion import StableDiffusion
    from utils.families.stable_diffusion_xl import StableDiffusionXL

    with init_empty_weights():
        if arch == "flux-dev":
            return Flux(), FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
        family = StableDiffusionXL() if arch == "sdxl" else StableDiffusion()
        return family, UNet2DConditionModel(**ARCHITECTURES[arch][0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["sd15", "sd21", "sdxl"], choices=list(RESOLUTIONS))
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"bf16 activations kept for backward, batch {args.batch}, BOFT on the attention projections, attention "
          "matrices excluded")
    print("| arch | px | gradient checkpointing off | on |")
    print("|---|---|---|---|")
    for arch in args.arch:
        family, denoiser = meta_denoiser(arch)
        for resolution in RESOLUTIONS[arch]:
            counted = activation_bytes(family, denoiser, resolution, args.batch, torch.bfloat16,
                                       SimpleNamespace(max_sequence_length=None))
            print(f"| {arch} | {resolution} | {counted[False] / GB:.2f} GB | {counted[True] / GB:.2f} GB |")


if __name__ == "__main__":
    main()
