"""Names outside diffusers: the original Stable Diffusion checkpoint layout and kohya's adapter keys.

Single-file checkpoints (what AUTOMATIC1111, Forge and ComfyUI load, and diffusers' `from_single_file`) use the
layout of the original code: CompVis' ldm for SD 1.x/2.x, Stability's sgm for SDXL. Adapters for those tools use
kohya's names: `lora_unet_` (or `lora_te_`, `lora_te1_`, `lora_te2_`) and the diffusers module path with dots as
underscores, which both web UIs and diffusers' kohya loader map onto their models.

The mapping is built from the diffusers models themselves (their blocks, counted as the original code numbers
them), not from a table of one architecture, so it covers every UNet and VAE of these families at any size.
"""

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Modules named alike in both layouts inside a block (attention: norm, proj_in, transformer_blocks, proj_out).
UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled-text-and-size embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_TOP_LEVEL = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def unet_modules(unet) -> dict[str, tuple[str, dict]]:
    """diffusers module path -> (original module path, renames inside it) for every UNet module with weights."""
    modules = {name: (original, {}) for name, original in UNET_TOP_LEVEL.items()}
    index = 1  # input_blocks.0 is conv_in
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            modules[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{index + j}.0", UNET_RESNET)
            if getattr(block, "attentions", None):
                modules[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{index + j}.1", {})
        index += len(block.resnets)
        if block.downsamplers:
            modules[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", {})
            index += 1
    modules["mid_block.resnets.0"] = ("middle_block.0", UNET_RESNET)
    modules["mid_block.attentions.0"] = ("middle_block.1", {})
    modules["mid_block.resnets.1"] = ("middle_block.2", UNET_RESNET)
    index = 0
    for i, block in enumerate(unet.up_blocks):
        attentions = bool(getattr(block, "attentions", None))
        for j in range(len(block.resnets)):
            modules[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{index + j}.0", UNET_RESNET)
            if attentions:
                modules[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{index + j}.1", {})
        index += len(block.resnets)
        if block.upsamplers:  # in the block of the last resnet, after its attention
            modules[f"up_blocks.{i}.upsamplers.0"] = (f"output_blocks.{index - 1}.{2 if attentions else 1}", {})
    return modules


def vae_modules(vae) -> dict[str, tuple[str, dict]]:
    modules = {name: (original, {}) for name, original in VAE_TOP_LEVEL.items()}
    for i, block in enumerate(vae.encoder.down_blocks):
        modules.update({f"encoder.down_blocks.{i}.resnets.{j}": (f"encoder.down.{i}.block.{j}", VAE_RESNET)
                        for j in range(len(block.resnets))})
        if block.downsamplers:
            modules[f"encoder.down_blocks.{i}.downsamplers.0"] = (f"encoder.down.{i}.downsample", {})
    count = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):  # the original numbers the decoder's levels bottom-up
        modules.update({f"decoder.up_blocks.{i}.resnets.{j}": (f"decoder.up.{count - 1 - i}.block.{j}", VAE_RESNET)
                        for j in range(len(block.resnets))})
        if block.upsamplers:
            modules[f"decoder.up_blocks.{i}.upsamplers.0"] = (f"decoder.up.{count - 1 - i}.upsample", {})
    for coder in ("encoder", "decoder"):
        modules[f"{coder}.mid_block.resnets.0"] = (f"{coder}.mid.block_1", VAE_RESNET)
        modules[f"{coder}.mid_block.resnets.1"] = (f"{coder}.mid.block_2", VAE_RESNET)
        modules[f"{coder}.mid_block.attentions.0"] = (f"{coder}.mid.attn_1", VAE_ATTENTION)
    return modules


def rename(name: str, modules: dict) -> str:
    """A diffusers parameter name in the original layout: its longest mapped module prefix replaced, then the
    renames inside that module; names under no mapped module are the same in both layouts."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in modules:
            original, inner = modules[prefix]
            rest = ".".join(parts[cut:])
            for old, new in inner.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            return f"{original}.{rest}"
    return name


def unet_to_original(state: dict, unet) -> dict:
    modules = unet_modules(unet)
    return {UNET_PREFIX + rename(name, modules): tensor for name, tensor in state.items()}


def vae_to_original(state: dict, vae) -> dict:
    """The VAE in the original layout; its mid-block attention projections are 1x1 convolutions there."""
    modules = vae_modules(vae)
    converted = {}
    for name, tensor in state.items():
        original = rename(name, modules)
        if ".mid.attn_1." in original and original.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        converted[VAE_PREFIX + original] = tensor
    return converted


def text_model_name(name: str) -> str:
    """A CLIP text encoder's parameter or module name as checkpoints and kohya's keys spell it, under `text_model.`
    (transformers 5 dropped that level from CLIPTextModel; CLIPTextModelWithProjection keeps it)."""
    return name if name.startswith(("text_model.", "text_projection")) else f"text_model.{name}"


def clip_to_original(state: dict, prefix: str) -> dict:
    """OpenAI CLIP text encoders (SD 1.x, SDXL's first) keep transformers' names under a prefix."""
    return {prefix + text_model_name(name): tensor for name, tensor in state.items()}


def open_clip_to_original(state: dict, prefix: str) -> dict:
    """OpenCLIP text encoders (SD 2.x, SDXL's second) in open_clip's names: one fused query-key-value projection
    per layer, the projection transposed."""
    converted = {}
    state = {text_model_name(name): tensor for name, tensor in state.items()}
    layers = sorted({int(n.split(".")[3]) for n in state if n.startswith("text_model.encoder.layers.")})
    for i in layers:
        source, target = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            converted[f"{target}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{source}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for old, new in OPEN_CLIP_LAYER.items():
                converted[f"{target}{new}.{kind}"] = state[f"{source}{old}.{kind}"]
    converted[prefix + "token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    converted[prefix + "positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    converted[prefix + "ln_final.weight"] = state["text_model.final_layer_norm.weight"]
    converted[prefix + "ln_final.bias"] = state["text_model.final_layer_norm.bias"]
    if "text_projection.weight" in state:
        converted[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    return converted


TEXT_ENCODER_CONVERTERS = {"clip": clip_to_original, "open_clip": open_clip_to_original}


def kohya_name(prefix: str, module_path: str) -> str:
    """kohya's key of a module: `lora_unet_down_blocks_1_attentions_0_..._to_q`, `lora_te_text_model_encoder_...`."""
    if prefix.startswith("lora_te"):
        module_path = text_model_name(module_path)
    return f"{prefix}_{module_path.replace('.', '_')}"


def stable_diffusion_single_file(state_of, pipeline, text_encoders: dict) -> dict:
    """The merged UNet, VAE and text encoders ({part: (key prefix, "clip" or "open_clip")}) in the original layout."""
    tensors = unet_to_original(state_of("unet"), pipeline.unet)
    tensors.update(vae_to_original(state_of("vae"), pipeline.vae))
    for part, (prefix, naming) in text_encoders.items():
        tensors.update(TEXT_ENCODER_CONVERTERS[naming](state_of(part), prefix))
    return tensors
