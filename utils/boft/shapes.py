"""Which Linear layers BOFT adapters wrap, which block shapes fit them, and how many parameters the adapters add.

Plain PyTorch: models built on the meta device will do, so all of this runs before any weight is loaded.
"""

import math
from dataclasses import dataclass

import torch

from utils.errors import UserError

MAX_SUGGESTIONS = 8


@dataclass(frozen=True)
class BoftSettings:
    """The adapter's shape and training options, as the --boft_* flags give them."""

    block_num: int
    block_size: int
    n_butterfly_factor: int
    dropout: float = 0.0
    bias: str = "none"
    impl: str = "fast"


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



def check_adapter_shape(model, targets, settings: BoftSettings, model_name: str) -> None:
    """Raise a UserError when the block shape does not fit every targeted layer of `model` (meta device will do)."""
    layers = targeted_linears(model, targets)
    check_block_shape(layers, settings.block_num, settings.block_size, settings.n_butterfly_factor, model_name)


def adapter_parameters(model, targets, settings: BoftSettings) -> int:
    """Trainable parameters a BOFT adapter would add to `model`: blocks (m x in x size), scales (out), biases."""
    total, layers = 0, targeted_linears(model, targets)
    for name, module in model.named_modules():
        if name in layers:
            size = settings.block_size or module.in_features // settings.block_num
            total += settings.n_butterfly_factor * module.in_features * size + module.out_features
            total += module.out_features if settings.bias == "boft_only" and module.bias is not None else 0
    if settings.bias == "all":
        total += sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    return total
