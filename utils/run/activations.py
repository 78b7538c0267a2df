"""Activation memory of a training step, counted without a GPU or weights (the --dry_run plan's last line).

The frozen denoiser, built on PyTorch's meta device, runs one forward pass of the family's training step
(`ModelFamily.meta_step`: the shapes of its input and conditioning) with the gradient flowing back through every
block; each tensor autograd keeps for the backward pass is counted once, but for the frozen weights themselves
(counted as weights). Attention is counted as the GPU's flash and memory-efficient kernels keep it (its query, key,
value, output and per-row log-sum-exp, in their dtype), not as PyTorch's math attention, which the meta device would
otherwise take, keeps it (fp32 copies and the N x N probabilities). A BOFT layer keeps one more tensor the
size of its input (the rotated input, or the input itself for the rotated weight's gradient), which a frozen
linear layer does not: counted from the inputs each targeted layer sees. With gradient checkpointing the count is
what stays saved between blocks; the backward pass then recomputes one block at a time, adding about one block's
activations at the peak.
"""

from contextlib import contextmanager
from unittest import mock

import torch

from utils.boft.shapes import targeted_linears


class FlashAttentionOnMeta(torch.autograd.Function):
    """Scaled-dot-product attention keeping for backward what flash attention keeps; shapes only (meta tensors)."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out


@contextmanager
def flash_attention_on_meta():
    def attention(query, key, value, *args, **kwargs):
        return FlashAttentionOnMeta.apply(query, key, value)

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", attention):
        yield


def saved_activation_bytes(model, layers, step, checkpointing: bool) -> int:
    """Bytes autograd keeps from `step()` (a forward call of `model` on meta tensors), the model's own weights
    excluded, plus the inputs the BOFT-wrapped `layers` keep."""
    weights = {id(parameter) for parameter in model.parameters()}
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    model.train()
    saved, layer_inputs = {}, []

    def pack(tensor):
        if id(tensor if tensor._base is None else tensor._base) not in weights:  # a weight, or a view of one
            saved[id(tensor)] = (tensor, tensor.numel() * tensor.element_size())  # held: ids stay unique
        return tensor

    hooks = [layer.register_forward_hook(lambda _, inputs, __: layer_inputs.append(inputs[0].numel() *
                                                                                  inputs[0].element_size()))
             for layer in layers]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), flash_attention_on_meta():
            step()
    finally:
        for hook in hooks:
            hook.remove()
    boft_inputs = 0 if checkpointing else sum(layer_inputs)  # checkpointed blocks keep only their inputs
    return sum(size for _, size in saved.values()) + boft_inputs


def activation_bytes(family, denoiser, resolution: int, rows: int, dtype, config) -> dict:
    """{gradient checkpointing off / on: bytes} for `rows` examples a step at `resolution`, the frozen weights in
    `dtype`, of the meta-device `denoiser` (it is cast in place: the plan reads only its shapes afterwards)."""
    denoiser.requires_grad_(False).to(dtype)
    modules = dict(denoiser.named_modules())
    layers = [modules[name] for name in targeted_linears(denoiser, family.denoiser_target_modules)]
    counts = {}
    for checkpointing in (False, True):
        step = family.meta_step(denoiser, resolution, rows, dtype, config)
        counts[checkpointing] = saved_activation_bytes(denoiser, layers, step, checkpointing)
    return counts
