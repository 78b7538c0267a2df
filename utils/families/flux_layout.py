"""FLUX.1's transformer in Black Forest Labs' own single-file layout (flux1-dev.safetensors), as
FluxTransformer2DModel.from_single_file and ComfyUI's diffusion-model loader read it.

The layouts differ by names and by fusion: BFL keeps each double block's image and text q, k, v as one `qkv`
layer, and each single block's q, k, v and MLP input as one `linear1`; the final norm's scale and shift halves are
swapped. `to_original` writes a diffusers state dict in BFL's layout; `fused_differences` does the same for weight
differences (the tensors ComfyUI adds at strength 1), where a fused layer's difference is its parts' stacked, with
zeros for a part the adapter did not change.
"""

import torch

TOP_LEVEL = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "proj_out": "final_layer.linear",
}
DOUBLE_BLOCK = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
}
DOUBLE_BLOCK_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                      "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
DOUBLE_BLOCK_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                      "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE_BLOCK = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
SINGLE_BLOCK_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
SINGLE_BLOCK_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
SWAPPED_HALVES = "final_layer.adaLN_modulation.1"  # diffusers' (scale, shift) is BFL's (shift, scale)


def _count(state: dict, prefix: str) -> int:
    return len({name.split(".")[1] for name in state if name.startswith(prefix)})


def _blocks(state: dict):
    return ([(f"transformer_blocks.{i}.", f"double_blocks.{i}.", DOUBLE_BLOCK, DOUBLE_BLOCK_NORMS, DOUBLE_BLOCK_FUSED)
             for i in range(_count(state, "transformer_blocks."))]
            + [(f"single_transformer_blocks.{i}.", f"single_blocks.{i}.", SINGLE_BLOCK, SINGLE_BLOCK_NORMS,
                SINGLE_BLOCK_FUSED) for i in range(_count(state, "single_transformer_blocks."))])


def layer_map(state: dict) -> tuple[dict, dict]:
    """({diffusers layer: BFL layer} for layers kept whole, norms included, {BFL fused layer: its diffusers parts})
    of the transformer whose diffusers state dict is `state`."""
    whole, fused = dict(TOP_LEVEL), {}
    for ours, theirs, renamed, norms, fusions in _blocks(state):
        whole.update({ours + a: theirs + b for a, b in {**renamed, **norms}.items()})
        fused.update({theirs + b: tuple(ours + a for a in parts) for b, parts in fusions.items()})
    return whole, fused


def _norm_key(key: str) -> str:
    """RMSNorm weights are BFL's `scale`."""
    return key.removesuffix(".weight") + ".scale"


def _by_bfl_layer(tensors: dict, state: dict) -> dict:
    """{(BFL layer, "weight" or "bias"): tensor} for `tensors`, diffusers-named tensors of (or shaped like) the
    transformer's state dict `state`: a whole layer's as it is, a fused layer's its parts' stacked in order, zeros
    for a part `tensors` lacks."""
    whole, fused = layer_map(state)
    out = {}
    for ours, theirs in whole.items():
        for kind in ("weight", "bias"):
            if f"{ours}.{kind}" in tensors:
                out[theirs, kind] = tensors[f"{ours}.{kind}"]
    for theirs, parts in fused.items():
        for kind in ("weight", "bias"):
            names = [f"{part}.{kind}" for part in parts]
            given = [tensors[name] for name in names if name in tensors]
            if given:
                out[theirs, kind] = torch.cat([tensors[name] if name in tensors else
                                               torch.zeros_like(state[name], dtype=given[0].dtype) for name in names])
    return out


def to_original(state: dict) -> dict:
    """The transformer's diffusers state dict in BFL's layout; every tensor is placed exactly once."""
    whole, fused = layer_map(state)
    parts = {f"{part}.{kind}" for layer_parts in fused.values() for part in layer_parts for kind in ("weight", "bias")}
    if missing := parts - set(state):
        raise KeyError(f"a fused layer's part is missing: {sorted(missing)[:5]}")
    if left := set(state) - parts - {f"{ours}.{kind}" for ours in whole for kind in ("weight", "bias")}:
        raise KeyError(f"no Black Forest Labs name for {sorted(left)[:5]}")
    norms = {v for block in (DOUBLE_BLOCK_NORMS, SINGLE_BLOCK_NORMS) for v in block.values()}
    out = {}
    for (layer, kind), tensor in _by_bfl_layer(state, state).items():
        key = f"{layer}.{kind}"
        out[_norm_key(key) if layer.endswith(tuple(norms)) else key] = tensor
    for kind in ("weight", "bias"):
        key = f"{SWAPPED_HALVES}.{kind}"
        scale, shift = out[key].chunk(2)
        out[key] = torch.cat([shift, scale])
    return out


def fused_differences(changes: dict, state: dict, prefix: str) -> dict:
    """`.diff` and `.diff_b` tensors under BFL's names (after `prefix`) for changed transformer tensors
    {diffusers name: (base, merged)} of the transformer whose state dict is `state`: a fused layer's difference
    stacks its parts', zeros where a part is unchanged."""
    differences = {name: merged.float() - base.float() for name, (base, merged) in changes.items()}
    suffix = {"weight": "diff", "bias": "diff_b"}
    return {f"{prefix}{layer}.{suffix[kind]}": difference
            for (layer, kind), difference in _by_bfl_layer(differences, state).items()}
