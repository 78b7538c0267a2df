"""A transformer's diffusers state dict in its makers' own single-file layout, and weight differences under those
names: what diffusers' from_single_file and ComfyUI's diffusion-model loader read.

The makers' layouts (Black Forest Labs' for FLUX, flux_layout.py; Stability AI's for SD3, sd3_layout.py) differ
from diffusers' by names and by fusion: they keep an attention's q, k and v as one `qkv` layer (FLUX's single blocks
add the MLP's input to it), and some adaptive norms hold their (scale, shift) halves the other way round. A `Layout`
says which; the functions here apply it. A fused layer's difference (the tensor ComfyUI adds at strength 1) is its
parts' stacked, with zeros for a part the adapter did not change.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch

KINDS = ("weight", "bias")


@dataclass(frozen=True)
class Layout:
    top_level: dict  # diffusers layer -> original layer, outside the blocks
    # the transformer's state dict -> [(diffusers block prefix, original block prefix, {diffusers layer: original
    # layer}, {original fused layer: its diffusers parts in order})], a block's layers as they are in that state
    blocks: Callable[[dict], list]
    swapped: Callable[[dict], tuple]  # the state dict -> original layers whose two halves are diffusers' swapped
    scale_layers: tuple = ()  # original layer names ending so hold an RMSNorm's weight as `.scale`
    tensors: dict = field(default_factory=dict)  # diffusers tensor -> original tensor, for tensors of no layer


def block_count(state: dict, prefix: str) -> int:
    return len({name.split(".")[1] for name in state if name.startswith(prefix)})


def present(state: dict, block: str, layers: dict) -> dict:
    """The entries of `layers` (diffusers layer -> anything) whose layer the block `block` of `state` has."""
    return {ours: theirs for ours, theirs in layers.items() if f"{block}{ours}.weight" in state}


def layer_map(layout: Layout, state: dict) -> tuple[dict, dict]:
    """({diffusers layer: original layer} for layers kept whole, {original fused layer: its diffusers parts}) of the
    transformer whose diffusers state dict is `state`."""
    whole, fused = dict(layout.top_level), {}
    for ours, theirs, renamed, fusions in layout.blocks(state):
        whole.update({ours + a: theirs + b for a, b in renamed.items()})
        fused.update({theirs + b: tuple(ours + a for a in parts) for b, parts in fusions.items()})
    return whole, fused


def _by_original_layer(layout: Layout, tensors: dict, state: dict) -> dict:
    """{(original layer, "weight" or "bias"): tensor} for `tensors`, diffusers-named tensors of (or shaped like) the
    transformer's state dict `state`: a whole layer's as it is, a fused layer's its parts' stacked in order, zeros
    for a part `tensors` lacks."""
    whole, fused = layer_map(layout, state)
    out = {}
    for ours, theirs in whole.items():
        for kind in KINDS:
            if f"{ours}.{kind}" in tensors:
                out[theirs, kind] = tensors[f"{ours}.{kind}"]
    for theirs, parts in fused.items():
        for kind in KINDS:
            names = [f"{part}.{kind}" for part in parts]
            given = [tensors[name] for name in names if name in tensors]
            if given:
                out[theirs, kind] = torch.cat([tensors[name] if name in tensors else
                                               torch.zeros_like(state[name], dtype=given[0].dtype) for name in names])
    return out


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2)
    return torch.cat([second, first])


def to_original(layout: Layout, state: dict) -> dict:
    """The transformer's diffusers state dict in the original layout; every tensor is placed exactly once."""
    whole, fused = layer_map(layout, state)
    parts = {f"{part}.{kind}" for layer_parts in fused.values() for part in layer_parts for kind in KINDS}
    if missing := {name for name in parts if name.endswith(".weight")} - set(state):
        raise KeyError(f"a fused layer's part is missing: {sorted(missing)[:5]}")
    placed = parts | {f"{ours}.{kind}" for ours in whole for kind in KINDS} | set(layout.tensors)
    if left := set(state) - placed:
        raise KeyError(f"no original name for {sorted(left)[:5]}")
    out = {theirs: state[ours] for ours, theirs in layout.tensors.items()}
    for (layer, kind), tensor in _by_original_layer(layout, state, state).items():
        scale = kind == "weight" and layer.endswith(layout.scale_layers) and layout.scale_layers
        out[f"{layer}.{'scale' if scale else kind}"] = tensor
    for layer in layout.swapped(state):
        for name in (f"{layer}.{kind}" for kind in KINDS):
            if name in out:  # FLUX.2's layers have no biases
                out[name] = _swap_halves(out[name])
    return out


def fused_differences(layout: Layout, changes: dict, state: dict, prefix: str) -> dict:
    """`.diff` and `.diff_b` tensors under the original names (after `prefix`) for changed transformer tensors
    {diffusers name: (base, merged)} of the transformer whose state dict is `state`: a fused layer's difference
    stacks its parts', zeros where a part is unchanged."""
    differences = {name: merged.float() - base.float() for name, (base, merged) in changes.items()}
    swapped = set(layout.swapped(state))
    suffix = {"weight": "diff", "bias": "diff_b"}
    return {f"{prefix}{layer}.{suffix[kind]}": _swap_halves(difference) if layer in swapped else difference
            for (layer, kind), difference in _by_original_layer(layout, differences, state).items()}
