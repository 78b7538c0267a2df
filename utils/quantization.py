"""Frozen base weights held quantized (--base_quantization nf4|int8), so that the big denoisers fit the GPUs people
own: bitsandbytes' 4-bit NormalFloat (QLoRA's, blocks of 64 with double-quantized scales) or 8-bit LLM.int8()
layers in place of the Linear layers of the denoiser and of the text encoders that are never trained (T5, Qwen3).

BOFT rotates a layer's input side, y = s * (x R) W^T, so on a quantized layer the rotation runs on the activation
and the quantized kernel does the rest: its weight is never dequantized in training (utils/boft/peft_seam.py).
Each weight is quantized as it reaches the accelerator, one layer at a time, so the full-precision model never
needs to fit there; bitsandbytes' kernels run on CUDA and, for these two formats, on the CPU. What stays in full
precision: convolutions, embeddings, norms, and the layers a model keeps in fp32 (`_keep_in_fp32_modules`, as
diffusers' and transformers' quantizers keep them). A quantized base cannot take a merge: merging is done on the
full-precision base (utils.inference --merge, utils.export), which the adapters fit unchanged.
"""

from utils.errors import UserError

KINDS = ("nf4", "int8")  # torch and bitsandbytes load only when a model is quantized: the flags read this
NF4_BLOCK = 64  # weights per 4-bit block: one 8-bit scale each, double-quantized in groups of 256
NF4_SCALE_GROUP = 256


def quantized_weight_bytes(kind: str, out_features: int, in_features: int) -> int:
    """What one layer's weight takes quantized, scales included (nf4: 4-bit codes, an 8-bit scale per block, an
    fp32 scale per 256 blocks and the 256-entry fp32 table of the second quantization; int8: 8-bit weights and an
    fp32 scale per output row)."""
    n = out_features * in_features
    if kind == "int8":
        return n + 4 * out_features
    blocks = -(-n // NF4_BLOCK)
    return -(-n // 2) + blocks + 4 * -(-blocks // NF4_SCALE_GROUP) + 4 * NF4_SCALE_GROUP


def missing_backend(kind: str | None) -> str | None:
    """Why --base_quantization `kind` cannot be used here, asked before anything loads (bitsandbytes' metadata,
    without importing it), or None."""
    from utils import quiet

    if kind and not quiet.bitsandbytes_installed():
        return f"--base_quantization {kind} needs bitsandbytes: pip install bitsandbytes (or drop the flag)"
    return None


def import_backend(kind: str):
    """bitsandbytes for --base_quantization `kind` (a UserError naming what to install when it cannot load)."""
    from utils import quiet

    return quiet.import_bitsandbytes(f"--base_quantization {kind}")


def is_quantized(module) -> bool:
    """A bitsandbytes quantized Linear (checked without importing bitsandbytes where it was never used)."""
    return type(module).__module__.startswith("bitsandbytes") and type(module).__name__ in ("Linear4bit",
                                                                                           "Linear8bitLt")


def _kept_in_full_precision(model) -> tuple:
    return tuple(getattr(model, "_keep_in_fp32_modules", None) or ())


def quantizable_layers(model) -> dict:
    """{name: Linear} of the layers --base_quantization quantizes in `model`."""
    import torch

    kept = _kept_in_full_precision(model)
    return {name: module for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and not any(part in kept for part in name.split("."))}


def quantized_bytes(model, kind: str) -> int:
    """What the quantizable layers' weights take once quantized (a meta-device model will do)."""
    return sum(quantized_weight_bytes(kind, layer.out_features, layer.in_features)
               for layer in quantizable_layers(model).values())


def _quantized_layer(bnb, linear, kind: str, compute_dtype, device):
    import torch

    weight = linear.weight.data.to(device)
    bias = linear.bias is not None
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False, quant_type="nf4",
                                         blocksize=NF4_BLOCK, compress_statistics=True)
        # bitsandbytes repacks a 4-bit weight in place the first time it runs in eval mode on an AVX-512 CPU (for
        # its CPU kernel), which needs widths in multiples of 64 and leaves a layout the training forward does not
        # take back: the generic kernel keeps one layout from validation to training
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = torch.nn.Parameter(linear.bias.data.to(device, compute_dtype), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes a weight when it moves to a device


def quantize(model, kind: str, compute_dtype, device) -> int:
    """Replace the quantizable Linear layers of `model` (frozen) by quantized ones on `device`; returns how many."""
    bnb = import_backend(kind)
    layers = quantizable_layers(model)
    for name, linear in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized_layer(bnb, linear, kind, compute_dtype, device))
    model.requires_grad_(False)
    return len(layers)


def quantized_part(family, part: str) -> bool:
    """Whether --base_quantization holds this part of the family's models quantized: the denoiser, and the text
    encoders the family never trains (T5, Qwen3)."""
    return part == family.denoiser_part or part not in family.trainable_text_encoders


def quantize_base(family, models: dict, kind: str, compute_dtype, device) -> str:
    """Quantize the frozen base of a run or pipeline (`models`: {part: model}, the denoiser and the text encoders)
    where quantized_part says. Returns what was done, for the log."""
    counts = {part: quantize(model, kind, compute_dtype, device) for part, model in models.items()
              if quantized_part(family, part)}
    return f"--base_quantization {kind}: " + ", ".join(f"{n} Linear layers of the {part.replace('_', ' ')}"
                                                       for part, n in counts.items())


def quantize_pipeline(family, pipeline, kind: str, compute_dtype, device) -> str:
    """quantize_base on a diffusers pipeline's denoiser and text encoders."""
    models = {name: module for name, module in pipeline.components.items()
              if name == family.denoiser_part or (name.startswith("text_encoder") and module is not None)}
    return quantize_base(family, models, kind, compute_dtype, device)


def merge_refused() -> UserError:
    return UserError("cannot merge an adapter into a quantized base: load the base in full precision (without "
                     "--base_quantization), merge there, then export (python -m utils.export)")
