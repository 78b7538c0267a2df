"""Activation memory of a training step, counted without a GPU or weights: what --dry_run's plan leaves out.

The frozen UNet (bf16, the gradient flowing back to its attention projections) runs one forward pass on PyTorch's
meta device, where tensors have shapes and no data; every tensor autograd keeps for the backward pass is counted
once. Attention's N x N probability matrices are left out: the meta device takes PyTorch's math attention, while on
a GPU the flash and memory-efficient kernels of scaled-dot-product attention (and xformers) keep only per-row
statistics. A BOFT layer keeps one more tensor the size of its input (the rotated input, or the input itself for
the rotated weight's gradient), which a frozen linear layer does not: counted from the inputs each targeted layer
sees. With --gradient_checkpointing the count is what stays saved between blocks; the backward pass then
recomputes one block at a time, adding about one block's activations at the peak.

    python -m benchmarks.activation_memory                 # SD 1.5 at 512 px, SD 2.1 at 768, SDXL at 1024
Batch 2: one instance and one class image, the launcher's recipe with prior preservation.
"""

import argparse

import torch

from benchmarks.sd_architectures import ARCHITECTURES, SDXL_POOLED_DIM

GB = 2**30
RESOLUTIONS = {"sd15": 512, "sd21": 768, "sdxl": 1024}


def meta_unet(arch: str):
    """(frozen bf16 UNet on the meta device, text width, the Linear layers BOFT wraps)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from utils.boft.shapes import targeted_linears
    from utils.families.stable_diffusion import UNET_TARGET_MODULES
    from utils.families.stable_diffusion_xl import UNET_TARGET_MODULES as XL_UNET_TARGET_MODULES

    config, text_dim = ARCHITECTURES[arch]
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    unet.requires_grad_(False).to(torch.bfloat16)
    targets = targeted_linears(unet, XL_UNET_TARGET_MODULES if arch == "sdxl" else UNET_TARGET_MODULES)
    modules = dict(unet.named_modules())
    return unet, text_dim, [modules[name] for name in targets]


def is_attention_matrix(shape, token_counts) -> bool:
    return len(shape) >= 3 and shape[-2] in token_counts and (shape[-1] in token_counts or shape[-1] == 77)


def saved_activation_bytes(unet, layers, text_dim: int, resolution: int, batch: int, checkpointing: bool) -> int:
    size = resolution // 8
    token_counts = {(size >> k) ** 2 for k in range(4)}
    meta = dict(device="meta", dtype=torch.bfloat16)
    latents = torch.randn(batch, 4, size, size, **meta).requires_grad_()  # the gradient flows through every block
    context = torch.randn(batch, 77, text_dim, **meta)
    added = {}
    if unet.config.addition_embed_type == "text_time":
        added = {"added_cond_kwargs": {"text_embeds": torch.randn(batch, SDXL_POOLED_DIM, **meta),
                                       "time_ids": torch.randn(batch, 6, **meta)}}
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    saved, layer_inputs = {}, []

    def pack(tensor):
        if not is_attention_matrix(tuple(tensor.shape), token_counts):
            saved[id(tensor)] = (tensor, tensor.numel() * tensor.element_size())  # held: ids stay unique
        return tensor

    hooks = [layer.register_forward_hook(lambda _, inputs, __: layer_inputs.append(inputs[0].numel() * 2))
             for layer in layers]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        unet(latents, torch.tensor([10] * batch, device="meta"), context, **added)
    for hook in hooks:
        hook.remove()
    boft_inputs = 0 if checkpointing else sum(layer_inputs)  # checkpointed blocks keep only their inputs
    return sum(size for _, size in saved.values()) + boft_inputs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(RESOLUTIONS), choices=list(RESOLUTIONS))
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"bf16 activations kept for backward, batch {args.batch}, BOFT on the attention projections, attention "
          "matrices excluded")
    print("| arch | px | gradient checkpointing | activations GB |")
    print("|---|---|---|---|")
    for arch in args.arch:
        unet, text_dim, layers = meta_unet(arch)
        for checkpointing in (False, True):
            counted = saved_activation_bytes(unet, layers, text_dim, RESOLUTIONS[arch], args.batch, checkpointing)
            print(f"| {arch} | {RESOLUTIONS[arch]} | {'on' if checkpointing else 'off'} | {counted / GB:.2f} |")


if __name__ == "__main__":
    main()
