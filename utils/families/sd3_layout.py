"""SD3's transformer in Stability AI's own single-file layout (sd3.5_medium.safetensors and the like), as
SD3Transformer2DModel.from_single_file and ComfyUI's diffusion-model loader read it (transformer_layout.py).

Stability keeps each joint block's image and text q, k, v as one `qkv` layer (`x_block.attn`, `context_block.attn`;
SD3.5 Medium's second image attention `x_block.attn2`), the rest renamed; the final norm's scale and shift halves
are swapped, and so are those of the last block's text norm (that block only reads the text: no text output
projection, no text MLP).
"""

from utils.families.transformer_layout import Layout, block_count, present

TOP_LEVEL = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "proj_out": "final_layer.linear",
}
JOINT_BLOCK = {
    "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
    "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
}
JOINT_BLOCK_FUSED = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                     "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                     "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}


def _blocks(state: dict) -> list:
    blocks = []
    for i in range(block_count(state, "transformer_blocks.")):
        ours = f"transformer_blocks.{i}."
        fused = {theirs: parts for theirs, parts in JOINT_BLOCK_FUSED.items() if f"{ours}{parts[0]}.weight" in state}
        blocks.append((ours, f"joint_blocks.{i}.", present(state, ours, JOINT_BLOCK), fused))
    return blocks


def _swapped(state: dict) -> tuple:
    last = block_count(state, "transformer_blocks.") - 1
    return "final_layer.adaLN_modulation.1", f"joint_blocks.{last}.context_block.adaLN_modulation.1"


STABILITY = Layout(top_level=TOP_LEVEL, blocks=_blocks, swapped=_swapped, tensors={"pos_embed.pos_embed": "pos_embed"})
