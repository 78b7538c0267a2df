"""BOFT adapters: which layers they wrap, which block shapes fit them, and putting them on a model with peft."""

import math
import types
import warnings

import torch
import torch.nn.functional as F

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
    install_block_diagonal()
    peft_model = get_peft_model(model, boft_config(args, targets), adapter_name=adapter_name)
    check_butterfly_factors(peft_model, adapter_name, args.boft_n_butterfly_factor)
    if args.boft_impl == "fast" and peft_internals_recognised():
        use_fast_forward(peft_model)
    return peft_model


def trainable_parameter_summary(peft_model, model_name: str) -> str:
    trainable, total = peft_model.get_nb_trainable_parameters()
    return f"{model_name}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%)"


# ---------------------------------------------------------------------------------------------------------------
# peft integration. Everything that touches peft's BOFT internals lives below: a plain-PyTorch stand-in for its
# compiled block-diagonal kernel (so every butterfly factor count works on every device), and a structured forward
# that never builds the dense in x in rotation. Both keep peft's parameters, parameterization and files unchanged.
# ---------------------------------------------------------------------------------------------------------------

_PEFT_NAMES = ("_FBD_CUDA", "get_fbd_cuda", "FastBlockDiag", "Linear", "MultiplicativeDropoutLayer")
_PEFT_LAYER_ATTRIBUTES = ("boft_R", "boft_s", "boft_dropout", "block_butterfly_perm", "base_layer", "merged_adapters")


class TorchBlockDiagonal:
    """peft's `fbd_cuda` contract in plain PyTorch: blocks (N, D, H, H) <-> block-diagonal (N, D*H, D*H)."""

    @staticmethod
    def forward(blocks):
        n, d, h, _ = blocks.shape
        dense = blocks.new_zeros(n, d, h, d, h)
        dense.diagonal(dim1=1, dim2=3).copy_(blocks.permute(0, 2, 3, 1))
        return [dense.view(n, d * h, d * h)]

    @staticmethod
    def backward(grad_dense, blocks):
        n, d, h, _ = blocks.shape
        return [grad_dense.reshape(n, d, h, d, h).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()]


def _peft_layer_module():
    import peft.tuners.boft.layer as layer_module

    return layer_module


def peft_internals_recognised() -> bool:
    layer_module = _peft_layer_module()
    return all(hasattr(layer_module, name) for name in _PEFT_NAMES)


def install_block_diagonal() -> bool:
    """Give peft the block-diagonal operation so it never falls back to one butterfly factor. Idempotent."""
    if not peft_internals_recognised():
        warnings.warn("this peft version's BOFT internals are not the ones utils/boft.py knows; using stock peft")
        return False
    layer_module = _peft_layer_module()
    if not isinstance(layer_module._FBD_CUDA, TorchBlockDiagonal):
        layer_module._FBD_CUDA = TorchBlockDiagonal()
    return True


class _ColumnPermutation:
    """z -> z[:, index] for z of shape (n, in). peft's butterfly permutations reorder chunks of half a block
    (evens, then odds); such an index is applied as a reshape-transpose copy, three times faster than a gather."""

    def __init__(self, index, chunk_shape=None):
        self.index, self.chunk_shape, self._inverse = index, chunk_shape, None

    @classmethod
    def of(cls, index, chunk: int):
        """The permutation by `index`, structured when it is a butterfly permutation with chunks of `chunk`."""
        columns = len(index)
        ramp = torch.arange(columns, device=index.device)
        candidates = [2**k for k in range(columns.bit_length())] if chunk > 0 else []
        for groups in (g for g in candidates if columns % (g * chunk) == 0):
            pairs = columns // (groups * chunk)
            for shape in ((groups, pairs // 2, 2, chunk), (groups, 2, pairs // 2, chunk)):
                if pairs % 2 == 0 and torch.equal(ramp.view(*shape).transpose(1, 2).reshape(-1), index):
                    return cls(index, shape)
        return cls(index)

    def __call__(self, z):
        if self.chunk_shape is None:
            return z.index_select(1, self.index)
        return z.view(z.shape[0], *self.chunk_shape).transpose(2, 3).reshape(z.shape[0], -1)

    def inverse(self):
        if self._inverse is None:
            inverse = torch.argsort(self.index)
            if self.chunk_shape is None:
                self._inverse = _ColumnPermutation(inverse)
            else:
                groups, first, second, chunk = self.chunk_shape
                self._inverse = _ColumnPermutation(inverse, (groups, second, first, chunk))
        return self._inverse


def _rotation_plan(layer, boft_r, transpose: bool):
    """How rows @ R (or rows @ R^T) is applied: (steps, transpose), the steps a list of (factor, permutation
    before, permutation after) in the order they apply.

    R = B_{m-1} ... B_0 with B_i = P_i BD(Q_i) P_i^T, as peft builds it. Since P z = z[perm], on rows
    rows P = rows[:, perm^-1] and rows P^T = rows[:, perm]: each factor is a column permutation, a block product
    and a column permutation; identity permutations are None. Built from the adapter's own shape rather than the
    layer's `boft_P` buffer, which peft shares between adapters, so adapters of different shapes can share a layer.
    """
    m, d, h, _ = boft_r.shape
    key = (m, d, h, boft_r.device, transpose)
    cache = layer.__dict__.setdefault("_fast_boft_plans", {})
    if key not in cache:
        steps = []
        for i in range(m):
            index = layer.block_butterfly_perm(d * h, int(d / 2**i), int(h / 2), m - 1).to(boft_r.device)
            if torch.equal(index, torch.arange(d * h, device=index.device)):
                steps.append((i, None, None))
            else:
                after = _ColumnPermutation.of(index, h // 2)
                steps.append((i, after.inverse(), after))
        cache[key] = (steps if transpose else steps[::-1], transpose)
    return cache[key]


# Devices whose batched matmul writes a strided `out` directly (CPU BLAS, cuBLAS); elsewhere the product is copied.
STRIDED_OUT_DEVICES = ("cpu", "cuda")


def _block_product(rows, blocks):
    """rows (n, D*H) times the block-diagonal matrix of `blocks` (D, H, H), written straight into row layout:
    one strided batched matmul, no transposed copies."""
    n = rows.shape[0]
    d, h, _ = blocks.shape
    per_block = rows.view(n, d, h).transpose(0, 1)
    if rows.device.type not in STRIDED_OUT_DEVICES:
        return torch.bmm(per_block, blocks).transpose(0, 1).reshape(n, d * h)
    out = rows.new_empty(n, d, h)
    torch.bmm(per_block, blocks, out=out.transpose(0, 1))
    return out.view(n, d * h)


class _RotateRows(torch.autograd.Function):
    """rows @ R or rows @ R^T for rows (n, in): block products and column permutations, with a hand-written
    backward that keeps every gradient in row layout (autograd's would transpose and copy)."""

    @staticmethod
    def forward(ctx, rows, blocks, steps, transpose):
        with torch.autocast(rows.device.type, enabled=False):
            z = rows if rows.stride(-1) == 1 else rows.contiguous()
            inputs = []
            for i, before, after in steps:
                z = before(z) if before is not None else z
                inputs.append(z)
                z = _block_product(z, blocks[i].transpose(1, 2) if transpose else blocks[i])
                z = after(z) if after is not None else z
        ctx.save_for_backward(blocks, *inputs)
        ctx.steps, ctx.transpose = steps, transpose
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        blocks, *inputs = ctx.saved_tensors
        d, h = blocks.shape[1], blocks.shape[2]
        factor_grads = {}
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.contiguous()
            for k in reversed(range(len(ctx.steps))):
                (i, before, after), z = ctx.steps[k], inputs[k]
                g = after.inverse()(g) if after is not None else g
                if ctx.needs_input_grad[1]:  # d(z_j q_j)/dq_j = z_j^T g_j, per block j
                    n = z.shape[0]
                    grad_q = torch.bmm(z.view(n, d, h).permute(1, 2, 0), g.view(n, d, h).transpose(0, 1))
                    factor_grads[i] = grad_q.transpose(1, 2) if ctx.transpose else grad_q
                if k == 0 and not ctx.needs_input_grad[0]:
                    g = None
                    break
                g = _block_product(g, blocks[i] if ctx.transpose else blocks[i].transpose(1, 2))
                g = before.inverse()(g) if before is not None else g
        grad_blocks = torch.stack([factor_grads[i] for i in range(len(blocks))]) if factor_grads else None
        return g, grad_blocks, None, None


def rotate_rows(rows, blocks, plan):
    """rows @ R or rows @ R^T, as the plan from _rotation_plan says, for rows of shape (..., in) and blocks
    (m, D, H, H) from cayley(). Nothing dense is formed."""
    steps, transpose = plan
    flat = rows.reshape(-1, rows.shape[-1])
    return _RotateRows.apply(flat, blocks, steps, transpose).view(rows.shape)


# Cost of moving one element through a factor (permutations, scaling, memory traffic), in multiply-add
# equivalents; fitted to SD 1.5's layers on a 2-core CPU (benchmarks/boft_step.py). It only decides which side is
# faster, never what is computed.
ELEMENT_OVERHEAD = 300


def cheaper_side(layer, x, n_factors: int, block_size: int) -> str:
    """"weight" or "activation": where applying the rotation is cheaper, backward included.

    Per factor, the rotation costs (passes*size + ELEMENT_OVERHEAD) per element rotated: out*in elements on the
    weight side, tokens*in on the activation side. Training counts three passes (forward, two backward) and the
    weight side pays one more tokens*out*in product for the gradient of the rotated weight.
    """
    out_features, in_features = layer.base_layer.weight.shape
    tokens = x.numel() // in_features
    training = torch.is_grad_enabled() and any(r.requires_grad for r in layer.boft_R.values())
    per_element = n_factors * ((3 if training else 1) * block_size + ELEMENT_OVERHEAD)
    weight_cost = out_features * in_features * per_element + (tokens * out_features * in_features if training else 0)
    return "weight" if weight_cost <= tokens * in_features * per_element else "activation"


class _Cayley(torch.autograd.Function):
    """Q = (I - S)(I + S)^-1 with S the skew part of R, computed as the equal 2 (I + S)^-1 - I: one inverse, and a
    backward of two matmuls, dQ = -2 A^-1 dA A^-1 with A = I + S."""

    @staticmethod
    def forward(ctx, r):
        a = (r - r.transpose(1, 2)) * 0.5
        a.diagonal(dim1=1, dim2=2).add_(1)
        a_inverse = torch.linalg.inv_ex(a)[0]  # I + S is invertible for every real skew S
        ctx.save_for_backward(a_inverse)
        q = a_inverse * 2
        q.diagonal(dim1=1, dim2=2).sub_(1)
        return q

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (a_inverse,) = ctx.saved_tensors
        t = torch.bmm(torch.bmm(a_inverse.transpose(1, 2), grad), a_inverse.transpose(1, 2))
        return t.transpose(1, 2) - t  # grad_R = (grad_A - grad_A^T) / 2 with grad_A = -2 t


def cayley(boft_r):
    """peft's Cayley map of the skew part of each block, in float32 as peft computes it. Shape (m, D, H, H)."""
    m, d, h, _ = boft_r.shape
    return _Cayley.apply(boft_r.reshape(m * d, h, h).float()).view(m, d, h, h).to(boft_r.dtype)


def multiplicative_dropout(dropout, blocks):
    """peft's MultiplicativeDropoutLayer (in one factor chosen at random, a fraction p of the blocks become the
    identity), drawing exactly its random numbers in its order, with one `where` instead of its mask arithmetic.
    When p of the blocks rounds down to none, the draws are made and the blocks returned untouched."""
    layer_class = _peft_layer_module().MultiplicativeDropoutLayer
    if not (isinstance(dropout, layer_class) and dropout.training):
        return dropout(blocks)
    n, d, h, _ = blocks.shape
    dropped = int(dropout.p * d)
    factor = torch.randint(0, n, (1,)).item()
    replaced = torch.randperm(d) < dropped  # peft: ones then zeros, shuffled by this permutation
    if not dropped:
        return blocks
    mask = torch.zeros(n, d, 1, 1, dtype=torch.bool)
    mask[factor] = replaced.view(d, 1, 1)
    eye = torch.eye(h, device=blocks.device, dtype=blocks.dtype)
    return torch.where(mask.to(blocks.device), eye, blocks)


def boft_linear(layer, x, adapter: str, side: str):
    """y = s * (x R) W^T + b, peft's BOFT Linear, with R applied on the weight or on the activations."""
    weight, bias = layer.base_layer.weight, layer.base_layer.bias
    boft_r, boft_s = layer.boft_R[adapter], layer.boft_s[adapter]
    blocks = multiplicative_dropout(layer.boft_dropout[adapter], cayley(boft_r))
    if side == "weight":  # W_eff = diag(s) W R^T
        rotated = rotate_rows(weight.to(blocks.dtype), blocks, _rotation_plan(layer, boft_r, True))
        return F.linear(x, (rotated * boft_s.view(-1, 1)).to(weight.dtype), bias).to(x.dtype)
    rotated_x = rotate_rows(x, blocks.to(x.dtype), _rotation_plan(layer, boft_r, False))
    result = F.linear(rotated_x, weight)
    result = result * boft_s.view(-1) if bias is None else torch.addcmul(bias, result, boft_s.view(-1))
    return result.to(x.dtype)


def fast_boft_forward(layer, x, *args, **kwargs):
    """peft's BOFT Linear forward without the dense rotation; peft's own for what it does not cover."""
    active = [name for name in layer.active_adapters if name in layer.boft_R]
    if layer.disable_adapters or layer.merged or len(active) != 1 or args or kwargs:
        return _peft_layer_module().Linear.forward(layer, x, *args, **kwargs)
    m, _, h, _ = layer.boft_R[active[0]].shape
    return boft_linear(layer, x, active[0], cheaper_side(layer, x, m, h))


@torch.no_grad()
def structured_merge(layer, safe_merge: bool = False, adapter_names=None) -> None:
    """peft's BOFT merge (W <- diag(s) W R^T), with the rotation applied to W's rows instead of built densely."""
    from peft.tuners.tuners_utils import check_adapters_to_merge

    weight = layer.base_layer.weight
    for name in check_adapters_to_merge(layer, adapter_names):
        if name not in layer.boft_R:
            continue
        boft_r = layer.boft_R[name]
        blocks = cayley(boft_r.float())
        rotated = rotate_rows(weight.float(), blocks, _rotation_plan(layer, boft_r, True))
        merged = layer.boft_s[name].float() * rotated
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        weight.copy_(merged.to(weight.dtype))
        layer.merged_adapters.append(name)


@torch.no_grad()
def structured_unmerge(layer) -> None:
    """Undo structured_merge: W <- diag(1/s) W' R, since R^T R = I."""
    weight = layer.base_layer.weight
    while layer.merged_adapters:
        name = layer.merged_adapters.pop()
        if name not in layer.boft_R:
            continue
        boft_r = layer.boft_R[name]
        blocks = cayley(boft_r.float())
        unscaled = weight.float() / layer.boft_s[name].float()
        weight.copy_(rotate_rows(unscaled, blocks, _rotation_plan(layer, boft_r, False)).to(weight.dtype))


def use_fast_forward(peft_model) -> int:
    """Route every plain-Linear BOFT layer through fast_boft_forward and structured_merge; return how many."""
    layer_class = _peft_layer_module().Linear
    count = 0
    for module in peft_model.modules():
        if isinstance(module, layer_class) and type(module.get_base_layer()) is torch.nn.Linear:
            if all(hasattr(module, a) for a in _PEFT_LAYER_ATTRIBUTES):
                module.forward = types.MethodType(fast_boft_forward, module)
                module.merge = types.MethodType(structured_merge, module)
                module.unmerge = types.MethodType(structured_unmerge, module)
                count += 1
    return count


def check_adapter_shapes(args, unet, text_encoder) -> None:
    """Check the block shape against every targeted layer (meta-device models will do)."""
    for model, targets, name, trained in (
        (unet, UNET_TARGET_MODULES, "UNet", True),
        (text_encoder, TEXT_ENCODER_TARGET_MODULES, "text encoder", args.train_text_encoder),
    ):
        if trained:
            layers = targeted_linears(model, targets)
            check_block_shape(layers, args.boft_block_num, args.boft_block_size, args.boft_n_butterfly_factor, name)


# Importing this module is what makes every butterfly factor count load and train with stock peft.
install_block_diagonal()
