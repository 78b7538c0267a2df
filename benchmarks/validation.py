"""Generating with a BOFT adapter against the base pipeline: what validation and utils.evaluate pay per image.

A full-size SD 1.5 pipeline with random weights (built in memory), a BOFT adapter of the trainer's default shape
with random rotations on the UNet, DPM-Solver as in validation. Three ways to generate the same image, alternated
in one process so that drift hits all alike: the base pipeline (adapter disabled), the adapter computed at every
denoising step (its rotation applied to weights or activations), and the adapter folded into the weights for the
duration (utils/boft/peft_seam.folded, what the trainer's validation and BoftPipeline.generate do).

    python -m benchmarks.validation                      # 256 px, 10 steps, median of 3
    python -m benchmarks.validation --resolution 512 --steps 25
"""

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from benchmarks.sd_architectures import SD_VAE, build_unet
from utils.run.cpu_allocator import keep_freed_memory


def random_pipeline_with_adapter(block_num: int, n_factors: int):
    """(pipeline, the UNet's PeftModel): SD 1.5 sizes, random weights, a BOFT adapter with random rotations."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline
    from peft import BOFTConfig, get_peft_model
    from transformers import CLIPTextConfig, CLIPTextModel

    from utils.boft import peft_seam
    from utils.families.stable_diffusion import UNET_TARGET_MODULES
    from utils.testing.tiny_model import build_tiny_pipeline

    unet, text_dim = build_unet("sd15")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=text_dim, intermediate_size=4 * text_dim,
                                                num_hidden_layers=12, num_attention_heads=text_dim // 64,
                                                max_position_embeddings=77, hidden_act="quick_gelu"))
    tiny = build_tiny_pipeline(prediction_type="epsilon", seed=0)
    pipeline = StableDiffusionPipeline(**{**tiny.components, "vae": AutoencoderKL(**SD_VAE), "text_encoder": text_encoder,
                                          "unet": unet}, requires_safety_checker=False)
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    peft_seam.install()
    config = BOFTConfig(boft_block_num=block_num, boft_block_size=0, boft_n_butterfly_factor=n_factors,
                        target_modules=list(UNET_TARGET_MODULES), init_weights=False)
    peft_unet = get_peft_model(unet, config)  # injects into `unet` itself: the pipeline now runs the adapter
    peft_seam.use_fast_forward(peft_unet)
    peft_unet.eval()
    return pipeline, peft_unet


def generate_seconds(pipeline, context, resolution: int, steps: int) -> float:
    """One image, the context's entry and exit (folding the adapter, putting the weights back) included."""
    start = time.perf_counter()
    with torch.no_grad(), context():
        pipeline("a photo of qwe toy", num_inference_steps=steps, height=resolution, width=resolution,
                 generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - start


def main(argv=None):
    from utils.boft import peft_seam

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block_num", type=int, default=8)
    parser.add_argument("--factors", type=int, default=1)
    args = parser.parse_args(argv)
    keep_freed_memory()
    pipeline, peft_unet = random_pipeline_with_adapter(args.block_num, args.factors)
    ways = {
        "base pipeline (adapter disabled)": peft_unet.disable_adapter,
        "BOFT computed every denoising step": nullcontext,
        "BOFT folded into the weights (validation, BoftPipeline.generate)": lambda: peft_seam.folded(peft_unet),
    }
    times = {name: [] for name in ways}
    for round_index in range(1 + args.repeats):  # the first round is untimed
        for name, context in ways.items():
            seconds = generate_seconds(pipeline, context, args.resolution, args.steps)
            if round_index:
                times[name].append(seconds)
    base = statistics.median(times["base pipeline (adapter disabled)"])
    print(f"SD 1.5 architecture, random weights, {args.resolution} px, {args.steps} DPM-Solver steps, one image, "
          f"block_num {args.block_num}, {args.factors} factor(s), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print("| generating | s/image | x base |")
    print("|---|---|---|")
    for name, measured in times.items():
        print(f"| {name} | {statistics.median(measured):.2f} | {statistics.median(measured) / base:.2f} |")


if __name__ == "__main__":
    main()
