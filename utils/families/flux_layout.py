"""FLUX.1's transformer in Black Forest Labs' own single-file layout (flux1-dev.safetensors), as
FluxTransformer2DModel.from_single_file and ComfyUI's diffusion-model loader read it (transformer_layout.py).

BFL keeps each double block's image and text q, k, v as one `qkv` layer, and each single block's q, k, v and MLP
input as one `linear1`; its RMSNorms' weights are `scale`s; the final norm's scale and shift halves are swapped.
"""

from utils.families.transformer_layout import Layout, block_count

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
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
}
DOUBLE_BLOCK_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                      "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE_BLOCK = {"norm.linear": "modulation.lin", "proj_out": "linear2", "attn.norm_q": "norm.query_norm",
                "attn.norm_k": "norm.key_norm"}
SINGLE_BLOCK_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def _blocks(state: dict) -> list:
    return ([(f"transformer_blocks.{i}.", f"double_blocks.{i}.", DOUBLE_BLOCK, DOUBLE_BLOCK_FUSED)
             for i in range(block_count(state, "transformer_blocks."))]
            + [(f"single_transformer_blocks.{i}.", f"single_blocks.{i}.", SINGLE_BLOCK, SINGLE_BLOCK_FUSED)
               for i in range(block_count(state, "single_transformer_blocks."))])


BFL = Layout(top_level=TOP_LEVEL, blocks=_blocks, swapped=lambda state: ("final_layer.adaLN_modulation.1",),
             scale_layers=("query_norm", "key_norm"))

