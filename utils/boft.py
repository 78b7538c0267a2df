"""BOFT adapters: which layers they wrap, which block shapes fit them, and putting them on a model with peft."""

import math

import torch

from utils.errors import UserError

UNET_TARGET_MODULES = ["to_q", "to_v", "to_k", "query", "value", "key", "to_out.0", "add_k_proj", "add_v_proj"]
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "v_proj"]
MAX_SUGGESTIONS = 8


def targeted_linears(model, targets) -> dict[str, int]:
    """Names and in_features of the Linear layers a peft config with these target names would wrap."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            found[name] = module.in_features
    return found


def block_shape_fits(in_features: int, block_num: int, block_size: int, n_butterfly_factor: int) -> bool:
    """peft's rules for one layer: blocks tile in_features, and each extra butterfly factor halves evenly."""
    extra_factors = n_butterfly_factor - 1
    if block_num:
        if in_features % block_num:
            return False
        block_size = in_features // block_num
    else:
        if in_features % block_size:
            return False
        block_num = in_features // block_size
    if extra_factors:
        if block_num % 2 or block_size % 2 or block_num % 2**extra_factors:
            return False
        if extra_factors > int(math.log2(block_num)):
            return False
    return True


def _fitting_values(in_features_all, n_butterfly_factor, by_number: bool) -> list[int]:
    smallest = min(in_features_all)
    fitting = []
    for value in range(1, smallest + 1):
        shape = (value, 0) if by_number else (0, value)
        if all(block_shape_fits(n, *shape, n_butterfly_factor) for n in in_features_all):
            fitting.append(value)
    return fitting


def check_block_shape(layers: dict[str, int], block_num, block_size, n_butterfly_factor, model_name: str) -> None:
    """Raise a UserError listing the layers the block shape does not fit, and the values that fit them all."""
    if not layers:
        raise UserError(f"no layer of the {model_name} matches the BOFT target modules; is this a Stable Diffusion model?")
    bad = {n: f for n, f in layers.items() if not block_shape_fits(f, block_num, block_size, n_butterfly_factor)}
    if not bad:
        return
    by_number = bool(block_num)
    flag = "--boft_block_num" if by_number else "--boft_block_size"
    value = block_num or block_size
    widths = sorted(set(bad.values()))
    examples = ", ".join(list(bad)[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    fitting = _fitting_values(set(layers.values()), n_butterfly_factor, by_number)
    advice = (
        f"values of {flag} that fit every targeted layer with --boft_n_butterfly_factor={n_butterfly_factor}: "
        + ", ".join(map(str, fitting[-MAX_SUGGESTIONS:]))
        if fitting
        else "no value fits every layer with this many butterfly factors; lower --boft_n_butterfly_factor"
    )
    raise UserError(
        f"{flag}={value} with --boft_n_butterfly_factor={n_butterfly_factor} does not fit {len(bad)} targeted "
        f"layer(s) of the {model_name} with in_features {widths} ({examples}); {advice}"
    )


def boft_config(args, targets):
    from peft import BOFTConfig

    return BOFTConfig(
        boft_block_num=args.boft_block_num,
        boft_block_size=args.boft_block_size,
        boft_n_butterfly_factor=args.boft_n_butterfly_factor,
        boft_dropout=args.boft_dropout,
        bias=args.boft_bias,
        target_modules=list(targets),
    )


def check_butterfly_factors(peft_model, adapter_name: str, n_butterfly_factor: int) -> None:
    """peft silently builds fewer butterfly factors when its CUDA kernel is missing: refuse to train that."""
    for name, module in peft_model.named_modules():
        weights = getattr(module, "boft_R", {})
        if adapter_name in weights and weights[adapter_name].shape[0] != n_butterfly_factor:
            raise UserError(
                f"peft built {weights[adapter_name].shape[0]} butterfly factor(s) for {name} instead of the "
                f"{n_butterfly_factor} asked for (its CUDA block-diagonal kernel could not be built here). "
                "Use --boft_n_butterfly_factor=1 (plain OFT) or a machine where the kernel builds"
            )


def add_boft_adapter(model, targets, args, adapter_name: str, model_name: str):
    """Wrap `model` with a trainable BOFT adapter after checking the block shape fits; return the PeftModel."""
    from peft import get_peft_model

    layers = targeted_linears(model, targets)
    check_block_shape(layers, args.boft_block_num, args.boft_block_size, args.boft_n_butterfly_factor, model_name)
    peft_model = get_peft_model(model, boft_config(args, targets), adapter_name=adapter_name)
    check_butterfly_factors(peft_model, adapter_name, args.boft_n_butterfly_factor)
    return peft_model


def trainable_parameter_summary(peft_model, model_name: str) -> str:
    trainable, total = peft_model.get_nb_trainable_parameters()
    return f"{model_name}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%)"
