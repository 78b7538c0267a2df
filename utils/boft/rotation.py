"""The rotation maths of BOFT in plain PyTorch, with no knowledge of peft: the block-diagonal operation, the
Cayley map, butterfly permutations applied as gathers of half-block chunks, and rows @ R or rows @ R^T computed factor
by factor, or in runs of factors each one block-diagonal product, without ever forming the dense n x n rotation.
utils/boft/peft_seam.py applies these to peft's layers."""

import functools
import itertools
import math

import torch

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



class ColumnPermutation:
    """z -> z[:, index] for z of shape (n, in). peft's butterfly permutations move whole chunks of columns (half a
    block); such an index is applied as a gather of chunks, three to eight times faster than a gather of single
    columns and up to four times faster than the equal reshape-transpose copy."""

    def __init__(self, index):
        self.index, self._inverse = index, None
        self.chunk = largest_chunk(index)
        self.chunk_index = index.view(-1, self.chunk)[:, 0] // self.chunk

    def __call__(self, z):
        if self.chunk == 1:
            return z.index_select(1, self.index)
        return z.view(z.shape[0], -1, self.chunk).index_select(1, self.chunk_index).view(z.shape[0], -1)

    def inverse(self):
        if self._inverse is None:
            self._inverse = ColumnPermutation(torch.argsort(self.index))
        return self._inverse

    def then(self, other):
        """z -> other(self(z)) as one permutation (None: the identity)."""
        return _gather(self.index[other.index])


def joined_permutations(steps):
    """A plan's steps with each factor's permutation after and the next factor's before joined into one gather:
    the two move the columns in a row, so m + 1 gathers a rotation (and as many in its backward) instead of 2m."""
    joined = []
    for i, before, after in steps:
        if joined and joined[-1][2] is not None:
            previous, previous_before, previous_after = joined[-1]
            joined[-1] = (previous, previous_before, None)
            before = previous_after if before is None else previous_after.then(before)
        joined.append((i, before, after))
    return joined


def largest_chunk(index) -> int:
    """The largest c such that `index` moves aligned runs of c consecutive columns together (1: none)."""
    columns = len(index)
    for chunk in (c for c in range(columns, 1, -1) if columns % c == 0):
        runs = index.view(-1, chunk)
        ramp = torch.arange(chunk, device=index.device).expand_as(runs)
        if bool((runs[:, 0] % chunk == 0).all()) and torch.equal(runs - runs[:, :1], ramp):
            return chunk
    return 1


# Devices whose batched matmul writes a strided `out` directly (CPU BLAS, cuBLAS); elsewhere the product is copied.
STRIDED_OUT_DEVICES = ("cpu", "cuda")


def batched_product_into(a, b, out):
    """torch.bmm(a, b) written into `out`, which may be strided (a transposed view) where the device's batched
    matmul writes it directly, else copied into it."""
    if out.device.type in STRIDED_OUT_DEVICES:
        torch.bmm(a, b, out=out)
    else:
        out.copy_(torch.bmm(a, b))


def block_product(rows, blocks):
    """rows (n, D*H) times the block-diagonal matrix of `blocks` (D, H, H), written straight into row layout:
    one strided batched matmul, no transposed copies."""
    n = rows.shape[0]
    d, h, _ = blocks.shape
    out = rows.new_empty(n, d, h)
    batched_product_into(rows.view(n, d, h).transpose(0, 1), blocks, out.transpose(0, 1))
    return out.view(n, d * h)


class RotateRows(torch.autograd.Function):
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
                z = block_product(z, blocks[i].transpose(1, 2) if transpose else blocks[i])
                z = after(z) if after is not None else z
        ctx.save_for_backward(blocks, *inputs)
        ctx.steps, ctx.transpose = steps, transpose
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        blocks, *inputs = ctx.saved_tensors
        d, h = blocks.shape[1], blocks.shape[2]
        # Each factor's gradient is written straight into its place (no stack of them after: one copy less); the
        # factors the steps do not use (a run's probe goes through its own) have none.
        grad_blocks = None
        if ctx.needs_input_grad[1]:
            every_factor = len({i for i, _, _ in ctx.steps}) == blocks.shape[0]
            grad_blocks = blocks.new_empty(blocks.shape) if every_factor else blocks.new_zeros(blocks.shape)
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.contiguous()
            for k in reversed(range(len(ctx.steps))):
                (i, before, after), z = ctx.steps[k], inputs[k]
                g = after.inverse()(g) if after is not None else g
                if grad_blocks is not None:  # d(z_j q_j)/dq_j = z_j^T g_j, per block j
                    n = z.shape[0]
                    batched_product_into(z.view(n, d, h).permute(1, 2, 0), g.view(n, d, h).transpose(0, 1),
                                   grad_blocks[i].transpose(1, 2) if ctx.transpose else grad_blocks[i])
                if k == 0 and not ctx.needs_input_grad[0]:
                    g = None
                    break
                g = block_product(g, blocks[i] if ctx.transpose else blocks[i].transpose(1, 2))
                g = before.inverse()(g) if before is not None else g
        return g, grad_blocks, None, None


class Plan:
    """How rows @ R or rows @ R^T is applied: `steps`, (factor, column permutation before, column permutation
    after) in the order they apply (None: identity), and `transpose`, whether each block applies transposed; for
    rows of width `width` and factors of blocks of `block_size`. Its runs(k), the factors taken k at a time, each
    run as the one block-diagonal matrix it makes, are worked out once."""

    def __init__(self, steps, transpose: bool, block_size: int, width: int):
        self.steps, self.transpose, self.block_size, self.width = steps, transpose, block_size, width
        self._runs = {}

    def runs(self, length: int):
        """The factors in runs of `length` consecutive steps as GroupedRuns, or None where `length` does not divide
        the factors or a run's blocks would not all be of one size."""
        if length not in self._runs:
            self._runs[length] = GroupedRuns.of(self, length)
        return self._runs[length]


class GroupedRuns:
    """A plan's factors taken `length` at a time, each run the block-diagonal matrix it makes once its input
    columns are gathered by component (the columns it mixes together) and its output scattered back: blocks
    (runs, C, G, G) and the steps that apply them, each run a gather, a block product and a gather (None where
    the components are aligned groups already). Two consecutive factors of peft's butterfly mix columns in sets of
    2H (the first two in aligned groups, later ones in chunks spread wider), so a run of two is one product of 2H
    blocks: as many multiply-adds as the two factors take, half the products and passes over the rows, and the
    wider blocks' better rate (all m factors together are blocks of H * 2^(m-1): more multiply-adds from m = 3)."""

    def __init__(self, plan, length, group, orders):
        self.plan, self.group = plan, group
        self.orders = orders  # per run: (its input columns component by component, its output columns likewise)
        self.steps = joined_permutations([(r, _gather(inputs), _gather(torch.argsort(outputs)))
                                          for r, (inputs, outputs) in enumerate(orders)])
        # Each run's probe goes through the run's factors and ends gathered in its output order (no gather more).
        self.probe_steps = []
        for r, (_, outputs) in enumerate(orders):
            *first, (i, before, after) = plan.steps[r * length:(r + 1) * length]
            last = ColumnPermutation(outputs) if after is None else after.then(ColumnPermutation(outputs))
            self.probe_steps.append([*first, (i, before, last)])
        self._probes = {}

    @classmethod
    def of(cls, plan, length: int):
        if len(plan.steps) % length:
            return None
        orders, sizes = [], set()
        for r in range(len(plan.steps) // length):
            inputs, outputs = _components(plan.steps[r * length:(r + 1) * length], plan.block_size, plan.width)
            sizes.update(len(columns) for columns in inputs.values())
            orders.append((torch.cat(list(inputs.values())), torch.cat([outputs[c] for c in inputs])))
        if len(sizes) != 1:
            return None
        device = next((p.index.device for _, *moves in plan.steps for p in moves if p is not None), None)
        return cls(plan, length, sizes.pop(), [(i.to(device), o.to(device)) for i, o in orders])

    def blocks(self, factor_blocks):
        """The runs' blocks (runs, C, G, G) from the factors' (m, D, H, H): each run's read off by rotating G probe
        rows through its factors, row k holding a one at the k-th column of every component (which do not
        interact); gradients reach the factors through the same rotations' backward."""
        probes = self._probe(factor_blocks.device, factor_blocks.dtype)
        group = self.group
        each = [RotateRows.apply(probe, factor_blocks, steps, self.plan.transpose).view(group, -1, group).transpose(0, 1)
                for probe, steps in zip(probes, self.probe_steps)]  # [c, k, l] = M[inputs[c*G + k], outputs[c*G + l]]
        return each[0][None] if len(each) == 1 else torch.stack(each)

    def _probe(self, device, dtype):
        key = (device, dtype)
        if key not in self._probes:
            rows = torch.arange(self.plan.width, device=device) % self.group
            probes = []
            for inputs, _ in self.orders:
                probe = torch.zeros(self.group, self.plan.width, device=device, dtype=dtype)
                probe[rows, inputs.to(device)] = 1
                probes.append(probe)
            self._probes[key] = probes
        return self._probes[key]


def _gather(index):
    """The column gather z -> z[:, index], or None for the identity."""
    return None if torch.equal(index, torch.arange(len(index), device=index.device)) else ColumnPermutation(index)


def _components(steps, block_size: int, width: int):
    """The columns `steps` mix together: ({component: its input columns}, {component: its output columns}), each
    ascending, components in the order of their first input column."""
    parent = list(range(width))

    def root(column):
        while parent[column] != column:
            parent[column] = parent[parent[column]]
            column = parent[column]
        return column

    lineage = torch.arange(width)  # an input column whose component each position's value belongs to
    for _, before, after in steps:
        lineage = lineage[before.index.cpu()] if before is not None else lineage
        for block in lineage.view(-1, block_size).tolist():
            first = root(block[0])
            for column in block[1:]:
                parent[root(column)] = first
        lineage = lineage[after.index.cpu()] if after is not None else lineage
    inputs, outputs = {}, {}
    for column in range(width):
        inputs.setdefault(root(column), []).append(column)
    for position, column in enumerate(lineage.tolist()):
        outputs.setdefault(root(column), []).append(position)
    return ({c: torch.tensor(v) for c, v in inputs.items()}, {c: torch.tensor(v) for c, v in outputs.items()})


def rotate_rows(rows, blocks, plan: Plan, fewest_operations: bool = False):
    """rows @ R or rows @ R^T, as the Plan says, for rows of shape (..., in) and blocks (m, D, H, H) from cayley().
    Nothing dense is formed: the rotation is applied factor by factor or, where fewer multiply-adds at a better
    rate pay (run_length), k factors at a time, each run as the one block-diagonal matrix its factors make
    (GroupedRuns), which takes a few more operations (its probe rows' rotation). `fewest_operations`: factor by
    factor, for where launches rather than arithmetic bound the time."""
    flat = rows.reshape(-1, rows.shape[-1])
    m, _, h, _ = blocks.shape
    length = 1 if fewest_operations else run_length(plan, m, h, flat.shape[0])
    if length == 1:
        return RotateRows.apply(flat, blocks, plan.steps, plan.transpose).view(rows.shape)
    runs = plan.runs(length)
    return RotateRows.apply(flat, runs.blocks(blocks), runs.steps, False).view(rows.shape)


def side_by_side_plan(plan: Plan, copies: int) -> Plan:
    """The plan of `copies` rotations of one shape and plan applied side by side: rows (n, copies * in) times the
    block-diagonal matrix of their blocks one after another, (m, copies * D, H, H), each one's permutations moving
    columns within its own `in`. rotate_rows then rotates the weights of many layers in one product per factor,
    each product one strided batched matmul (a stack of the layers would need a copy before and after each)."""

    def tiled(permutation):
        if permutation is None:
            return None
        width = len(permutation.index)
        return ColumnPermutation(torch.cat([permutation.index + k * width for k in range(copies)]))

    steps = [(i, tiled(before), tiled(after)) for i, before, after in plan.steps]
    return Plan(steps, plan.transpose, plan.block_size, plan.width * copies)


# Cost of moving one element through a factor (permutations, scaling, memory traffic), in multiply-add
# equivalents; fitted to SD 1.5's layers on a 2-core CPU (benchmarks/boft_step.py). It only decides which side is
# faster, never what is computed.
ELEMENT_OVERHEAD = 300


# Nanoseconds to rotate one element, forward and backward, as (fixed, per unit of block size): factor by factor
# (for each factor, blocks of the block size) and in runs (for each run, blocks of the run's group); fitted on 2 CPU
# cores to single layers of SD 1.5's, FLUX.1's and SD3.5's shapes (python -m benchmarks.rotation_paths), where the
# same case measures up to a third apart from one run to the next. A run must save this fraction at least: below
# it the fit cannot tell the ways apart (at 80-wide blocks it cannot: runs pay for narrow blocks, 32 or 40 wide,
# whose products run slowest).
FACTOR_NANOSECONDS = (1.8, 0.127)
GROUPED_NANOSECONDS = (2.4, 0.065)
GROUPING_MARGIN = 0.75


def run_length(plan: Plan, n_factors: int, block_size: int, rows: int) -> int:
    """How many consecutive factors to apply as one matrix when rotating `rows` rows: 1 (factor by factor) unless
    runs of k are clearly cheaper, counting the probe rows that build each run's blocks (which go factor by
    factor). Per element every way scales with the width alike, so it does not enter."""
    per_factor = FACTOR_NANOSECONDS[0] + FACTOR_NANOSECONDS[1] * block_size
    best_length, best = 1, GROUPING_MARGIN * n_factors * per_factor
    for length in (k for k in range(2, n_factors + 1) if n_factors % k == 0):
        runs = plan.runs(length)
        if runs is None:
            continue
        per_run = GROUPED_NANOSECONDS[0] + GROUPED_NANOSECONDS[1] * runs.group + runs.group * length * per_factor / rows
        if n_factors // length * per_run < best:
            best_length, best = length, n_factors // length * per_run
    return best_length


def cheaper_side(out_features: int, in_features: int, tokens: int, n_factors: int, block_size: int,
                 training: bool) -> str:
    """"weight" or "activation": where applying the rotation to a Linear layer is cheaper, backward included.

    Per factor, the rotation costs (passes*size + ELEMENT_OVERHEAD) per element rotated: out*in elements on the
    weight side, tokens*in on the activation side. Training counts three passes (forward, two backward) and the
    weight side pays one more tokens*out*in product for the gradient of the rotated weight.
    """
    per_element = n_factors * ((3 if training else 1) * block_size + ELEMENT_OVERHEAD)
    weight_cost = out_features * in_features * per_element + (tokens * out_features * in_features if training else 0)
    return "weight" if weight_cost <= tokens * in_features * per_element else "activation"


class ScaleShift(torch.autograd.Function):
    """y = x * scale + shift for x (..., n), scale and shift (n,) (shift may be None): BOFT's output scale and the
    base layer's bias, whose backward takes one product per input and one sum each for scale and shift. (Autograd's
    for torch.addcmul also multiplies the whole of x and of the gradient by its `value` of 1: two more passes over
    every output of a layer with a bias, two more kernels on a GPU.)"""

    @staticmethod
    def forward(ctx, x, scale, shift):
        ctx.save_for_backward(x, scale)
        return x * scale if shift is None else torch.addcmul(shift, x, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        leading = tuple(range(x.dim() - 1))  # summed as they are: a strided gradient reshaped would be copied
        grad_x = grad * scale if ctx.needs_input_grad[0] else None
        grad_scale = (grad * x).sum(leading) if ctx.needs_input_grad[1] else None
        grad_shift = grad.sum(leading) if ctx.needs_input_grad[2] else None
        return grad_x, grad_scale, grad_shift


class ScaleSideBySide(torch.autograd.Function):
    """rows (n, L, in), L layers' weights side by side, each layer's rows times its own scales: scales (L, n).
    The scales' gradient is written (L, n), so that each layer's share of it is laid out as its scale is (autograd's
    would come out (n, L), strided per layer, and be copied into each .grad), and the rows' gradient keeps their
    side-by-side layout (autograd's, through the transposes that line the scales up, would be copied back into it)."""

    @staticmethod
    def forward(ctx, rows, scales):
        ctx.save_for_backward(rows, scales)
        return rows * scales.t().unsqueeze(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, scales = ctx.saved_tensors
        grad_rows = grad * scales.t().unsqueeze(-1) if ctx.needs_input_grad[0] else None
        grad_scales = None
        if ctx.needs_input_grad[1]:
            grad_scales = scales.new_empty(scales.shape)
            torch.sum(grad * rows, -1, out=grad_scales.t())
        return grad_rows, grad_scales


def skew_inverse(r):
    """(I + S)^-1 for S the skew part of each block of r (k, H, H), float32: the one inverse of the Cayley map,
    taken apart so that a caller may compute it once while the parameters stay the same."""
    with torch.no_grad():
        a = torch.add(scaled_identity(r.shape[-1], 1.0, r.device, r.dtype), r - r.transpose(1, 2), alpha=0.5)
        return torch.linalg.inv_ex(a)[0]  # I + S is invertible for every real skew S


@functools.lru_cache(maxsize=16)
def scaled_identity(size: int, value: float, device, dtype):
    """value * I (size x size), made once: what the Cayley map adds to its batches in one operation with them
    (never written to; made outside inference mode, so that autograd may use it later)."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.eye(size, device=device, dtype=dtype) * value


class Cayley(torch.autograd.Function):
    """Q = (I - S)(I + S)^-1 with S the skew part of R, computed as the equal 2 (I + S)^-1 - I from the inverse
    skew_inverse(R) gives: no other inverse, and a backward of two matmuls, dQ = -2 A^-1 dA A^-1 with A = I + S."""

    @staticmethod
    def forward(ctx, r, a_inverse):
        ctx.save_for_backward(a_inverse)
        minus_identity = scaled_identity(a_inverse.shape[-1], -1.0, a_inverse.device, a_inverse.dtype)
        return torch.add(minus_identity, a_inverse, alpha=2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (a_inverse,) = ctx.saved_tensors
        # grad_R = (grad_A - grad_A^T) / 2 with grad_A = -2 t, t = A^-T dQ A^-T: computed as u - u^T with
        # u = t^T = A^-1 dQ^T A^-1, so that the contiguous operand comes first and the result is laid out as the
        # parameters are (the transposed one first gave a transposed result, which autograd then copied into
        # every parameter's .grad: one copy per layer and step).
        u = torch.bmm(a_inverse, torch.bmm(grad.transpose(1, 2), a_inverse))
        return u - u.transpose(1, 2), None


class BatchOrder:
    """The order of a batch of several layers' blocks (layer j's parameters (m_j, D_j, H, H)): in runs, each run's
    layers (all of one m and D) factor by factor (factor 0 of each of them, then factor 1, ...), so that a run's
    blocks are one (m, L * D, H, H) slice, what the weights of L layers side by side rotate through with no gather.
    A layer alone is a run of one: its blocks as its parameters lay them out."""

    def __init__(self, runs, shapes, device):
        """`runs`: lists of layer indices, every layer in one; `shapes`: each layer's (m, D)."""
        self.runs, self.shapes = runs, shapes
        self.pieces = [(j, i) for run in runs for i in range(shapes[run[0]][0]) for j in run]  # (layer, factor)
        self.sizes = [len(run) * math.prod(shapes[run[0]]) for run in runs]  # each run's blocks
        first = list(itertools.accumulate((m * d for m, d in shapes), initial=0))
        # Where each of the batch's blocks sits when the layers' blocks go one after another (on the CPU).
        self.source = torch.cat([torch.arange(first[j] + i * shapes[j][1], first[j] + (i + 1) * shapes[j][1])
                                 for j, i in self.pieces])
        in_order = torch.equal(self.source, torch.arange(len(self.source)))
        self.back = None if in_order else torch.argsort(self.source).to(device)

    def split(self, batch) -> tuple[list, list]:
        """(each run's blocks (m, L * D, H, H), each layer's (m, D, H, H)): views of the batch from at most one
        split, whose backward is one concatenation (slices would each fill a batch-sized gradient). A layer alone
        takes its run's blocks as they are; a layer of a longer run, a strided view of them (whose backward would
        fill a run-sized gradient: only for callers that rotate it by itself)."""
        parts = batch.split(self.sizes) if len(self.runs) > 1 else [batch]
        runs = [part.view(self.shapes[run[0]][0], -1, *batch.shape[1:]) for run, part in zip(self.runs, parts)]
        layers = [None] * len(self.shapes)
        for run, blocks in zip(self.runs, runs):
            if len(run) == 1:
                layers[run[0]] = blocks
                continue
            in_run = blocks.view(blocks.shape[0], len(run), -1, *batch.shape[1:])
            for position, j in enumerate(run):
                layers[j] = in_run[:, position]
        return runs, layers


class BlocksInOrder(torch.autograd.Function):
    """Several layers' blocks as one batch (N, H, H) in a BatchOrder: one concatenation, and a backward that puts
    the gradient back in the layers' order with at most one gather, so that each layer's share is laid out as its
    parameters are (autograd then hands it to .grad without a copy)."""

    @staticmethod
    def forward(ctx, order, *parameters):
        ctx.order, ctx.shapes = order, [p.shape for p in parameters]
        return torch.cat([parameters[j][i] for j, i in order.pieces])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        in_layer_order = grad if ctx.order.back is None else grad.index_select(0, ctx.order.back)
        shares = in_layer_order.split([math.prod(shape[:2]) for shape in ctx.shapes])
        return None, *(share.view(shape) for share, shape in zip(shares, ctx.shapes))


def cayley_together(r, inverses, dropped=None):
    """cayley() of a batch of several layers' blocks (N, H, H) (BlocksInOrder) at once, from its skew_inverse:
    one Cayley map and at most one `where` for all of them. `dropped`: the blocks dropout makes the identity, a
    bool tensor (N,) on any device, or None."""
    q = Cayley.apply(r.float(), inverses).to(r.dtype)
    if dropped is not None:
        eye = scaled_identity(r.shape[-1], 1.0, q.device, q.dtype)
        q = torch.where(dropped.view(-1, 1, 1).to(q.device), eye, q)
    return q


def cayley(boft_r, a_inverse=None):
    """peft's Cayley map of the skew part of each block, in float32 as peft computes it. Shape (m, D, H, H).
    `a_inverse`: skew_inverse of these very parameters, when the caller has it."""
    m, d, h, _ = boft_r.shape
    r = boft_r.reshape(m * d, h, h).float()
    a_inverse = skew_inverse(r) if a_inverse is None else a_inverse
    return Cayley.apply(r, a_inverse).view(m, d, h, h).to(boft_r.dtype)
