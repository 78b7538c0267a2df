"""Every contact with peft's BOFT internals, in one guarded module.

peft's BOFT compiles a CUDA kernel for its block-diagonal operation and, where that fails (any CPU, mps, a CUDA
machine without a compiler), silently builds one butterfly factor instead of the number asked for; its forward also
builds the dense in x in rotation every step. `install()` gives peft the operation in plain PyTorch
(utils/boft/rotation.py), and `use_fast_forward` routes BOFT Linear layers through a structured forward and merge
that never form the dense rotation; parameters, parameterization and files stay peft's own.

Nothing is patched at import. Each entry point (the trainer, utils.inference, utils.evaluate, the notebook, the
benchmarks) calls `install()`, which first recognises peft by version and by structure; on anything it does not
recognise (another version, a moved module, a renamed attribute) it warns once and leaves stock peft in place, and
`use_fast_forward` then changes nothing.
"""

import types
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from utils.boft.rotation import (
    BatchOrder,
    BlocksInOrder,
    ColumnPermutation,
    Plan,
    ScaleSideBySide,
    ScaleShift,
    TorchBlockDiagonal,
    cayley,
    cayley_together,
    cheaper_side,
    joined_permutations,
    rotate_rows,
    scaled_identity,
    side_by_side_plan,
    skew_inverse,
)
from utils.boft.shapes import BoftSettings, check_adapter_shape
from utils.errors import UserError
from utils.quantization import is_quantized, merge_refused

# peft minor versions whose BOFT internals this module was written against (requirements.txt pins the same range).
RECOGNISED_PEFT_VERSIONS = ("0.21",)
_PEFT_NAMES = ("_FBD_CUDA", "get_fbd_cuda", "FastBlockDiag", "Linear", "MultiplicativeDropoutLayer")
_PEFT_LINEAR_METHODS = ("forward", "merge", "unmerge", "block_butterfly_perm")
_PEFT_LAYER_ATTRIBUTES = ("boft_R", "boft_s", "boft_dropout", "block_butterfly_perm", "base_layer", "merged_adapters")
# Where adapter weights differ from the base model's parameters in a peft state dict.
ADAPTER_WEIGHT_MARK = "boft_"

_installed = None  # None: install() not called yet; then whether the integration is in place


def _peft_layer_module():
    import peft.tuners.boft.layer as layer_module

    return layer_module


def recognition_problem(version: str, layer_module) -> str | None:
    """Why this peft cannot take the integration (version or structure), or None when it can."""
    minor = ".".join(version.split(".")[:2])
    if minor not in RECOGNISED_PEFT_VERSIONS:
        return f"peft {version} is not a version utils/boft/peft_seam.py knows ({', '.join(RECOGNISED_PEFT_VERSIONS)})"
    if layer_module is None:
        return "peft has no peft.tuners.boft.layer module"
    missing = [name for name in _PEFT_NAMES if not hasattr(layer_module, name)]
    linear = getattr(layer_module, "Linear", None)
    missing += [f"Linear.{name}" for name in _PEFT_LINEAR_METHODS if linear is not None and not hasattr(linear, name)]
    return f"peft {version}'s BOFT internals lack {', '.join(missing)}" if missing else None


def install() -> bool:
    """Put the integration in place when peft is recognised; otherwise warn once and keep stock peft. Idempotent."""
    global _installed
    if _installed is not None:
        return _installed
    import peft

    try:
        layer_module = _peft_layer_module()
    except ImportError:
        layer_module = None
    problem = recognition_problem(peft.__version__, layer_module)
    if problem:
        warnings.warn(f"{problem}; using stock peft (slower, and more than one butterfly factor needs its CUDA "
                      "kernel)", stacklevel=2)
        _installed = False
        return False
    if not isinstance(layer_module._FBD_CUDA, TorchBlockDiagonal):
        layer_module._FBD_CUDA = TorchBlockDiagonal()
    _installed = True
    return True


def boft_config(settings: BoftSettings, targets):
    from peft import BOFTConfig

    return BOFTConfig(
        boft_block_num=settings.block_num,
        boft_block_size=settings.block_size,
        boft_n_butterfly_factor=settings.n_butterfly_factor,
        boft_dropout=settings.dropout,
        bias=settings.bias,
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


def add_boft_adapter(model, targets, settings: BoftSettings, adapter_name: str, model_name: str):
    """Wrap `model` with a trainable BOFT adapter after checking the block shape fits; return the PeftModel."""
    from peft import get_peft_model

    check_adapter_shape(model, targets, settings, model_name)
    install()
    peft_model = get_peft_model(model, boft_config(settings, targets), adapter_name=adapter_name)
    check_butterfly_factors(peft_model, adapter_name, settings.n_butterfly_factor)
    if settings.impl == "fast":
        use_fast_forward(peft_model)
    return peft_model


def trainable_parameter_summary(peft_model, model_name: str) -> str:
    trainable, total = peft_model.get_nb_trainable_parameters()
    return f"{model_name}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%)"


def rotation_plan(layer, boft_r, transpose: bool):
    """How rows @ R (or rows @ R^T) is applied: a rotation.Plan, its steps a list of (factor, permutation before,
    permutation after) in the order they apply.

    R = B_{m-1} ... B_0 with B_i = P_i BD(Q_i) P_i^T, as peft builds it. Since P z = z[perm], on rows
    rows P = rows[:, perm^-1] and rows P^T = rows[:, perm]: each factor is a column permutation, a block product
    and a column permutation; identity permutations are None, and a factor's permutation after is joined with the
    next factor's before (joined_permutations). Built from the adapter's own shape rather than the
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
                after = ColumnPermutation(index)
                steps.append((i, after.inverse(), after))
        cache[key] = Plan(joined_permutations(steps if transpose else steps[::-1]), transpose, h, d * h)
    return cache[key]


def dropout_draws(dropout, n_factors: int, n_blocks: int):
    """The random numbers peft's MultiplicativeDropoutLayer draws in one call, in its order and left as tensors:
    (the factor it drops blocks of (1,), the order of the blocks (D,), how many it drops), or None when it draws
    nothing (not training). Blocks whose place in the order is below that count become the identity."""
    if not (isinstance(dropout, _peft_layer_module().MultiplicativeDropoutLayer) and dropout.training):
        return None
    factor = torch.randint(0, n_factors, (1,))
    return factor, torch.randperm(n_blocks), int(dropout.p * n_blocks)  # peft: ones then zeros, so shuffled


def dropout_mask(dropout, n_factors: int, n_blocks: int):
    """The blocks peft's MultiplicativeDropoutLayer makes the identity in this call, as an (m, D, 1, 1) bool mask
    on the CPU; None when it drops nothing (the draws are made all the same while it trains)."""
    draws = dropout_draws(dropout, n_factors, n_blocks)
    if draws is None or not draws[2]:
        return None
    factor, order, dropped = draws
    mask = torch.zeros(n_factors, n_blocks, 1, 1, dtype=torch.bool)
    mask[factor.item()] = (order < dropped).view(n_blocks, 1, 1)
    return mask


def dropout_masks_together(draws, shapes):
    """The masks of several layers' dropout_draws (None: it drew nothing), their blocks (m, D) one after another,
    as one (sum of m*D,) bool tensor on the CPU, or None when none drops a block: a few operations for all of them
    rather than a comparison and a read of the factor per layer."""
    dropping, offset = [], 0
    for layer_draws, (m, d) in zip(draws, shapes):
        if layer_draws is not None and layer_draws[2]:
            dropping.append((layer_draws, offset, d))
        offset += m * d
    if not dropping:
        return None
    factors = torch.cat([factor for (factor, _, _), _, _ in dropping])
    counts = torch.tensor([d for _, _, d in dropping])
    starts = torch.tensor([start for _, start, _ in dropping]) + factors * counts  # the dropped factor's first block
    within = torch.cat([torch.arange(d) for _, _, d in dropping])
    dropped = torch.cat([order for (_, order, _), _, _ in dropping]) < torch.tensor(
        [layer_draws[2] for layer_draws, _, _ in dropping]).repeat_interleave(counts)
    mask = torch.zeros(offset, dtype=torch.bool)
    mask[starts.repeat_interleave(counts) + within] = dropped
    return mask


def multiplicative_dropout(dropout, blocks):
    """peft's BOFT dropout of `blocks` (m, D, H, H), with one `where` instead of its mask arithmetic."""
    if not isinstance(dropout, _peft_layer_module().MultiplicativeDropoutLayer):
        return dropout(blocks)
    mask = dropout_mask(dropout, blocks.shape[0], blocks.shape[1])
    if mask is None:
        return blocks
    eye = scaled_identity(blocks.shape[2], 1.0, blocks.device, blocks.dtype)
    return torch.where(mask.to(blocks.device), eye, blocks)


def invert_together(parameters) -> list:
    """skew_inverse of each adapter's `boft_R` (m, D, H, H), flattened to (m*D, H, H): one batched inverse per block
    size and device for all of them."""
    batches = {}
    for index, boft_r in enumerate(parameters):
        batches.setdefault((boft_r.shape[2], boft_r.device), []).append(index)
    inverses = [None] * len(parameters)
    for indices in batches.values():
        blocks = [parameters[i].detach().reshape(-1, *parameters[i].shape[2:]).float() for i in indices]
        for i, inverse in zip(indices, skew_inverse(torch.cat(blocks)).split([len(b) for b in blocks])):
            inverses[i] = inverse
    return inverses


# Where a model's rotations are computed together before each forward (ForwardRotations): where every operation is
# a kernel launch of a few microseconds. On 2 CPU cores (SD 1.5, 128 px) together costs what layer by layer does
# at one factor and more at two and four (1.74 x the floor against 1.52 x, 2.87 x against 1.87 x): the
# concatenated Cayley blocks, their transposed backward, the weights side by side are memory traffic a CPU pays.
ROTATE_TOGETHER_DEVICES = ("cuda",)


class RotationCache:
    """The Cayley inverse of each fast BOFT layer's parameters, computed once while they stay the same: across the
    micro-batches of an optimizer step under gradient accumulation, across validation's denoising steps. Gradients
    still flow to the parameters every micro-batch (the backward needs only the inverse). And, per model, its
    ForwardRotations: the rotations of all its layers computed together in each forward.

    The inverses of all its layers are taken together, one batch per block size, at the first layer that needs
    one (with a model's rotations computed together, from the very batch its Cayley map takes): a batched inverse
    costs about what one layer's does on a GPU (SD 1.5's 128 layers on an H200: 2 to 5 ms a step in one call per
    block size, 35 to 88 ms layer by layer); LAPACK on a CPU inverts one block at a time either way.

    Whoever changes the parameters calls clear() (the trainer, after each optimizer step). A change made in place
    by a torch operation (loading a checkpoint) is noticed as well, by the parameter's version counter; optimizers
    that write through raw pointers (bitsandbytes) are not, hence clear()."""

    def __init__(self, *models, together: bool | None = None):
        """`together`: give each model a ForwardRotations (None: where its parameters are on a device of
        ROTATE_TOGETHER_DEVICES)."""
        self._inverses = {}  # (id(layer), adapter) -> ((its parameters' pointer, version), inverse shaped as them)
        self._layers = []
        self._forwards = []
        for model in models:
            device = next(model.parameters()).device.type
            forward = ForwardRotations(self, model) if together or (
                together is None and device in ROTATE_TOGETHER_DEVICES) else None
            for module in model.modules():
                if getattr(module, "_fast_boft", False):
                    module.__dict__["_rotation_cache"] = self
                    module.__dict__["_forward_rotations"] = forward
                    self._layers.append(module)
            self._forwards += [forward] if forward else []

    def _is_current(self, layer, adapter: str, boft_r) -> bool:
        entry = self._inverses.get((id(layer), adapter))
        return entry is not None and entry[0] == (boft_r.data_ptr(), boft_r._version)

    def inverse(self, layer, adapter: str, boft_r):
        """skew_inverse of the layer's adapter's parameters, (m * D, H, H)."""
        if not self._is_current(layer, adapter, boft_r):
            self._invert_stale(adapter)
        return self._inverses[(id(layer), adapter)][1].reshape(-1, *boft_r.shape[2:])

    def inverses_in_order(self, keys, r, order):
        """skew_inverse of `r`, several layers' blocks in a BatchOrder (keys: each layer's (layer, adapter,
        parameters)): kept ones gathered in that order in one concatenation, or, when any changed, all of them
        inverted again in one batch taken from `r` itself (each layer keeping its share for later calls)."""
        if all(self._is_current(*key) for key in keys):
            inverses = [self._inverses[(id(layer), adapter)][1] for layer, adapter, _ in keys]
            return torch.cat([inverses[j][i] for j, i in order.pieces])
        inverse = skew_inverse(r.detach().float())
        for (layer, adapter, boft_r), share in zip(keys, order.split(inverse)[1]):
            self._inverses[(id(layer), adapter)] = ((boft_r.data_ptr(), boft_r._version), share)
        return inverse

    def _invert_stale(self, adapter: str) -> None:
        """Invert, together, every layer's `adapter` whose parameters changed since its inverse (not the other
        adapters loaded beside it: another subject's blocks are inverted when it is used)."""
        stale = [(layer, adapter, layer.boft_R[adapter]) for layer in self._layers if adapter in layer.boft_R
                 and not self._is_current(layer, adapter, layer.boft_R[adapter])]
        for (layer, adapter, boft_r), inverse in zip(stale, invert_together([r for _, _, r in stale])):
            self._inverses[(id(layer), adapter)] = ((boft_r.data_ptr(), boft_r._version), inverse.view(boft_r.shape))

    def clear(self) -> None:
        self._inverses.clear()
        for forward in self._forwards:
            forward.release()


class ForwardRotations:
    """The rotations of one model's fast BOFT layers for one forward pass, computed together just before it, so
    that what BOFT launches a step grows little with its layers: per block size one Cayley map and one dropout
    `where` for every layer; per weight shape one rotation and one scaling of the weights of all the layers that
    rotate their weight, each layer's forward then a plain F.linear (its backward adds one product, the rotated
    weight's gradient).

    The model's first forward goes layer by layer and records the order its layers are called in: the dropout's
    random numbers are then drawn in that very order, as layer by layer (a model's registration order is not its
    call order: the UNet registers its up blocks before its middle block), and each layer's side (weight or
    activation) as it chose it last. The rotations stay until the next forward or clear(): recomputing a forward
    in the backward (gradient checkpointing) takes the same ones."""

    def __init__(self, cache: RotationCache, model):
        self.cache = cache
        self.order = None  # the layers in call order, once recorded; [] when a layer is called twice a forward
        self._calls = []
        self._sides = {}  # id(layer) -> the side it chose at its last call
        self._open = False
        self._entries = None  # id(layer) -> (adapter, blocks, the rotated and scaled weight or None)
        self._plans = {}  # (id of a layer's plan, how many side by side) -> their side_by_side_plan
        self._orders = {}  # the layers of a block size, each with its side -> (their BatchOrder, its weight runs)
        model.register_forward_pre_hook(self._begin)
        model.register_forward_hook(self._end)

    def _begin(self, model, args) -> None:
        """Before the model's forward: outside any region gradient checkpointing recomputes, and outside autocast
        (the rotations run in their parameters' precision, as layer by layer)."""
        self._open, self._entries = True, None
        if self.order is None:
            self._calls = []
        elif self.order:
            with torch.autocast(next(model.parameters()).device.type, enabled=False):
                self._entries = self._compute()

    def _end(self, model, args, output) -> None:
        self._open = False
        if self.order is None and self._calls:
            self.order = self._calls if len({id(layer) for layer in self._calls}) == len(self._calls) else []

    def release(self) -> None:
        self._entries = None

    def prepared(self, layer, adapter: str, side: str):
        """(blocks, the rotated and scaled weight or None) of `layer` in this forward, or None: compute them layer
        by layer (the recording forward, a call outside the model's forward, a layer the group left out)."""
        if self._open:
            self._sides[id(layer)] = side
            if self.order is None:
                self._calls.append(layer)
        elif torch._C._current_graph_task_id() < 0:
            return None  # neither in this model's forward nor recomputing it in the backward
        entry = self._entries.get(id(layer)) if self._entries is not None else None
        if entry is None or entry[0] != adapter:
            return None
        return entry[1], entry[2] if side == "weight" else None

    def _compute(self) -> dict:
        fusable = (_peft_layer_module().MultiplicativeDropoutLayer, torch.nn.Identity)
        groups = {}  # block shape, device, dtype -> [(layer, adapter, dropout draws)], drawn in call order
        for layer in self.order:
            adapter = _active_adapter(layer)
            if adapter is None or layer.merged or layer.disable_adapters:
                continue
            boft_r, dropout = layer.boft_R[adapter], layer.boft_dropout[adapter]
            if isinstance(dropout, fusable):
                m, d, h, _ = boft_r.shape
                groups.setdefault((h, boft_r.device, boft_r.dtype), []).append(
                    (layer, adapter, dropout_draws(dropout, m, d)))
        entries = {}
        for members in groups.values():
            keys = [(layer, adapter, layer.boft_R[adapter]) for layer, adapter, _ in members]
            order, weight_runs = self._order(keys)
            r = BlocksInOrder.apply(order, *(boft_r for _, _, boft_r in keys))
            dropped = dropout_masks_together([draws for _, _, draws in members], order.shapes)
            batch = cayley_together(r, self.cache.inverses_in_order(keys, r, order),
                                    None if dropped is None else dropped[order.source])
            run_blocks, layer_blocks = order.split(batch)
            for (layer, adapter, _), blocks in zip(keys, layer_blocks):
                entries[id(layer)] = (adapter, blocks, None)
            for k in weight_runs:
                self._rotate_weights([keys[j][:2] for j in order.runs[k]], run_blocks[k], entries)
        return entries

    def _order(self, keys):
        """(the BatchOrder of these layers' blocks, the runs in it that rotate their weights): the layers that
        rotate their weight in runs of one weight shape (their weights then rotate side by side), each other
        layer alone. Made once for each set of layers and sides."""
        rotates_weight = [self._sides.get(id(layer)) == "weight" and not is_quantized(layer.base_layer)
                          for layer, _, _ in keys]
        signature = tuple((id(layer), adapter, weight) for (layer, adapter, _), weight in zip(keys, rotates_weight))
        if signature not in self._orders:
            runs, weight_runs = [], {}  # weight shape -> the index of its run
            for j, ((layer, _, boft_r), weight) in enumerate(zip(keys, rotates_weight)):
                base = layer.base_layer.weight
                shape = (base.shape, base.dtype, base.device, boft_r.shape)
                if not weight:
                    runs.append([j])
                elif shape in weight_runs:
                    runs[weight_runs[shape]].append(j)
                else:
                    weight_runs[shape] = len(runs)
                    runs.append([j])
            shapes = [tuple(boft_r.shape[:2]) for _, _, boft_r in keys]
            self._orders[signature] = (BatchOrder(runs, shapes, keys[0][2].device), list(weight_runs.values()))
        return self._orders[signature]

    def _rotate_weights(self, layers, blocks, entries: dict) -> None:
        """The rotated, scaled weights of `layers` ((layer, adapter), of one weight shape), their weights side by
        side (out, L * in) through one rotation of their blocks side by side (m, L * D, H, H); each layer's
        weight a view of the result."""
        weight = layers[0][0].base_layer.weight
        side_by_side = torch.cat([layer.base_layer.weight for layer, _ in layers], dim=1).to(blocks.dtype)
        scales = torch.stack([layer.boft_s[adapter].view(-1) for layer, adapter in layers])
        # Factor by factor: fewest launches, which bound the weights' rotation where rotations go together (GPUs).
        rotated = rotate_rows(side_by_side, blocks, self._plan(*layers[0], len(layers)), fewest_operations=True)
        rotated = ScaleSideBySide.apply(rotated.view(weight.shape[0], len(layers), -1), scales)
        for (layer, adapter), layer_weight in zip(layers, rotated.to(weight.dtype).unbind(1)):
            entries[id(layer)] = (adapter, entries[id(layer)][1], layer_weight)

    def _plan(self, layer, adapter: str, copies: int):
        plan = rotation_plan(layer, layer.boft_R[adapter], True)
        key = (id(plan), copies)  # rotation_plan keeps each plan for its layer's life
        if key not in self._plans:
            self._plans[key] = side_by_side_plan(plan, copies)
        return self._plans[key]


def layer_blocks(layer, adapter: str):
    """The Cayley blocks of a layer's adapter (from its RotationCache when it has one), dropout applied."""
    boft_r = layer.boft_R[adapter]
    cache = layer.__dict__.get("_rotation_cache")
    a_inverse = cache.inverse(layer, adapter, boft_r) if cache is not None else None
    return multiplicative_dropout(layer.boft_dropout[adapter], cayley(boft_r, a_inverse))


def boft_linear(layer, x, adapter: str, side: str, prepared=None):
    """y = s * (x R) W^T + b, peft's BOFT Linear, with R applied on the weight or on the activations (always on
    the activations over a quantized base, whose own kernel then multiplies by its weight). `prepared`: the
    layer's (blocks, rotated and scaled weight or None) from its ForwardRotations, if computed there."""
    base = layer.base_layer
    weight, bias = base.weight, base.bias
    boft_r, boft_s = layer.boft_R[adapter], layer.boft_s[adapter]
    blocks, effective = prepared if prepared is not None else (layer_blocks(layer, adapter), None)
    if side == "weight":  # W_eff = diag(s) W R^T
        if effective is None:
            rotated = rotate_rows(weight.to(blocks.dtype), blocks, rotation_plan(layer, boft_r, True))
            effective = (rotated * boft_s.view(-1, 1)).to(weight.dtype)
        return F.linear(x, effective, bias).to(x.dtype)
    rotated_x = rotate_rows(x, blocks.to(x.dtype), rotation_plan(layer, boft_r, False))
    if is_quantized(base):  # its kernel adds the bias, which the scale must not touch
        result = base(rotated_x) if bias is None else base(rotated_x) - bias
    else:
        result = F.linear(rotated_x, weight)
    result = ScaleShift.apply(result, boft_s.view(-1), bias)
    return result.to(x.dtype)


def _active_adapter(layer) -> str | None:
    active = [name for name in layer.active_adapters if name in layer.boft_R]
    return active[0] if len(active) == 1 else None


def fast_boft_forward(layer, x, *args, **kwargs):
    """peft's BOFT Linear forward without the dense rotation; peft's own for what it does not cover."""
    adapter = _active_adapter(layer)
    if layer.disable_adapters or layer.merged or adapter is None or args or kwargs:
        return _peft_layer_module().Linear.forward(layer, x, *args, **kwargs)
    m, _, h, _ = layer.boft_R[adapter].shape
    training = torch.is_grad_enabled() and any(r.requires_grad for r in layer.boft_R.values())
    side = "activation" if is_quantized(layer.base_layer) else cheaper_side(
        layer.out_features, layer.in_features, x.numel() // layer.in_features, m, h, training)
    rotations = layer.__dict__.get("_forward_rotations")
    return boft_linear(layer, x, adapter, side, rotations.prepared(layer, adapter, side) if rotations else None)


def merged_weight(layer, adapter: str):
    """diag(s) W R^T, peft's merged weight, with the rotation applied to W's rows, in the weight's dtype."""
    weight, boft_r = layer.base_layer.weight, layer.boft_R[adapter]
    rotated = rotate_rows(weight.float(), cayley(boft_r.float()), rotation_plan(layer, boft_r, True))
    return (layer.boft_s[adapter].float() * rotated).to(weight.dtype)


class Fold:
    """Each fast BOFT layer of `models` computing with its active adapter folded into its weight (as merged), so
    that generating costs what the base model costs, until `restore()` puts the very weights back, bit for bit. The
    merged weight is written into the weight's own storage, one layer at a time; the original waits in CPU memory,
    so that on an accelerator a fold takes no second copy of the adapted weights there. For generating: nothing
    may train while folded. A quantized layer is not folded (its forward rotates its input)."""

    @torch.no_grad()
    def __init__(self, *models):
        self.kept = []  # (layer, its original weight on the CPU)
        for model in models:
            for layer in model.modules():
                adapter = _active_adapter(layer) if getattr(layer, "_fast_boft", False) else None
                if adapter is None or layer.merged or layer.disable_adapters or is_quantized(layer.base_layer):
                    continue
                weight = layer.base_layer.weight
                merged = merged_weight(layer, adapter)
                self.kept.append((layer, weight.detach().to("cpu", copy=True)))
                weight.copy_(merged)
                layer.merged_adapters.append(adapter)

    @torch.no_grad()
    def restore(self) -> None:
        for layer, original in reversed(self.kept):
            layer.base_layer.weight.copy_(original)
            layer.merged_adapters.pop()
        self.kept = []


@contextmanager
def folded(*models):
    """A Fold of `models` for the duration (validation); the weights are put back even when generating fails."""
    fold = Fold(*models)
    try:
        yield
    finally:
        fold.restore()


@torch.no_grad()
def structured_merge(layer, safe_merge: bool = False, adapter_names=None) -> None:
    """peft's BOFT merge (W <- diag(s) W R^T), with the rotation applied to W's rows instead of built densely."""
    from peft.tuners.tuners_utils import check_adapters_to_merge

    if is_quantized(layer.base_layer):
        raise merge_refused()
    weight = layer.base_layer.weight
    for name in check_adapters_to_merge(layer, adapter_names):
        if name not in layer.boft_R:
            continue
        merged = merged_weight(layer, name)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        weight.copy_(merged)
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
        weight.copy_(rotate_rows(unscaled, blocks, rotation_plan(layer, boft_r, False)).to(weight.dtype))


def use_fast_forward(peft_model) -> int:
    """Route every BOFT layer over a plain or quantized (bitsandbytes) Linear through fast_boft_forward and
    structured_merge; return how many (none when peft was not recognised: stock peft stays)."""
    if not install():
        return 0
    layer_class = _peft_layer_module().Linear
    count = 0
    for module in peft_model.modules():
        base = module.get_base_layer() if isinstance(module, layer_class) else None
        if type(base) is torch.nn.Linear or is_quantized(base):
            if all(hasattr(module, a) for a in _PEFT_LAYER_ATTRIBUTES):
                module.forward = types.MethodType(fast_boft_forward, module)
                module.merge = types.MethodType(structured_merge, module)
                module.unmerge = types.MethodType(structured_unmerge, module)
                module._fast_boft = True
                count += 1
    return count


# --- inference: adapters loaded for generation ----------------------------------------------------------------------


def load_for_inference(model, folder, adapter_name: str):
    """Load the adapter saved in `folder` onto `model` (a plain model, or a PeftModel holding other adapters) for
    generation: (the PeftModel, {parameter name: trained bias}). Trained biases are returned rather than written:
    peft keeps them in the base layers, one adapter's at a time (utils/inference.py switches them)."""
    from peft import BOFTConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    install()
    config = BOFTConfig.from_pretrained(folder)
    config.bias, config.inference_mode = "none", True
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        peft_model = model
    else:
        peft_model = PeftModel(model, config, adapter_name=adapter_name)
    weights = load_file(folder / "adapter_model.safetensors")
    biases = {name: weights.pop(name) for name in list(weights) if ADAPTER_WEIGHT_MARK not in name}
    result = set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name)
    parameters = dict(peft_model.named_parameters())
    if result.unexpected_keys or set(biases) - set(parameters):
        raise UserError(f"{folder} holds weights this model does not have: were the adapters trained on another "
                        "base model?")
    for name, parameter in peft_model.named_parameters():
        if ADAPTER_WEIGHT_MARK in name:  # the Cayley transform needs fp32; frozen weights keep the pipeline's dtype
            parameter.data = parameter.data.float()
    peft_model.eval()
    use_fast_forward(peft_model)
    return peft_model, biases


def is_merged(peft_model) -> bool:
    """Whether any BOFT layer of the model has an adapter merged into its weights."""
    return any(getattr(m, "merged", False) for m in peft_model.modules() if hasattr(m, "boft_R"))


def adapted_weight_names(peft_model, adapter_name: str) -> list[str]:
    """The weights (named as in the plain model) that merging `adapter_name` rotates: those of its BOFT layers."""
    return [f"{name}.weight" for name, module in peft_model.get_base_model().named_modules()
            if hasattr(module, "boft_R") and adapter_name in module.boft_R]


def base_state_dict(peft_model) -> dict:
    """The state dict of the model under peft's layers, with their names (no adapter weights, no `base_layer`)."""
    return {
        key.replace(".base_layer", ""): value
        for key, value in peft_model.get_base_model().state_dict().items()
        if not any(f".{name}." in key for name in ("boft_R", "boft_s"))
    }
