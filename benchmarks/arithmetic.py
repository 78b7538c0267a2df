"""The lower bound that arithmetic sets on a BOFT step's time: its extra multiply-adds over the frozen step's.

The frozen step (the floor) is counted by PyTorch's FLOP counter. What BOFT adds, per wrapped layer with `rows`
input rows (tokens x batch), m butterfly factors and blocks of size b = in / blocks, on the cheaper side:
- on the activations: each factor rotates the input forward, and the backward needs the input's gradient and the
  blocks' gradient, three products of rows x in x b;
- on the weight: each factor rotates W (out x in x b) and takes the blocks' gradient from W's (the same size), and
  the rotated weight's gradient is a full rows x out x in product the frozen step does not compute;
- the Cayley transform of each block and factor: an inverse and the two products of its backward, about 3 b^3;
  under gradient accumulation of k micro-batches, the inverse is taken once per optimizer step (b^3 / k per
  micro-batch) while the backward's two products run every micro-batch.
Scales, biases and permutations move data without multiplying and are left out: an implementation gets below the
bound only if its multiply-adds run faster than the frozen step's.

The second bound (`with_measured_inverse`) replaces the inverse's share by the time this machine takes for it, all
layers' blocks inverted together as the trainer does: an exact inverse of small blocks does not run at matmul speed
(LAPACK on a CPU inverts them one at a time; cuSOLVER on a GPU has a floor of its own), so no step that computes
peft's Cayley map exactly gets below that bound either.
"""

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def boft_layers(model) -> list:
    return [module for module in model.modules() if hasattr(module, "boft_R")]


def extra_multiply_adds(layer, rows: int, micro_batches: int = 1) -> float:
    """What one BOFT layer adds to a training step (per micro-batch of `micro_batches` sharing one optimizer step),
    on the cheaper side, with `rows` input rows."""
    (boft_r,) = layer.boft_R.values()
    factors, blocks, size, _ = boft_r.shape
    inputs, outputs = layer.in_features, layer.out_features
    on_activations = 3 * factors * rows * inputs * size
    on_weight = 2 * factors * outputs * inputs * size + rows * outputs * inputs
    cayley = (2 + 1 / micro_batches) * factors * blocks * size**3
    return min(on_activations, on_weight) + cayley


def counted_floor(step, model, micro_batches: int = 1) -> tuple[int, float]:
    """(FLOPs of one floor step, BOFT's extra multiply-adds at the rows each layer saw in it)."""
    rows = {}
    hooks = [layer.register_forward_hook(lambda module, args, _: rows.__setitem__(module, args[0].numel() // module.in_features))
             for layer in boft_layers(model)]
    with FlopCounterMode(display=False) as counter:
        step()
    for hook in hooks:
        hook.remove()
    return counter.get_total_flops(), sum(extra_multiply_adds(layer, n, micro_batches) for layer, n in rows.items())


def lower_bound(floor_flops: int, extra: int) -> float:
    """The step's time over the floor's if every extra multiply-add ran as fast as the floor's do."""
    return 1 + 2 * extra / floor_flops


def inverse_multiply_adds(model) -> int:
    """One Cayley inverse of every block of every factor of every BOFT layer, counted as b^3 each."""
    return sum(r.shape[0] * r.shape[1] * r.shape[2] ** 3 for layer in boft_layers(model) for r in layer.boft_R.values())


def measured_inverse_seconds(model, repeats: int = 3) -> float:
    """Seconds this machine takes for one step's Cayley inverses, taken together as the trainer takes them."""
    from utils.boft.peft_seam import invert_together

    parameters = [r for layer in boft_layers(model) for r in layer.boft_R.values()]
    synchronize = torch.cuda.synchronize if parameters and parameters[0].is_cuda else (lambda: None)
    seconds = []
    for _ in range(repeats + 1):  # the first, untimed, loads the solver's kernels
        synchronize()
        start = time.perf_counter()
        invert_together(parameters)
        synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])


def with_measured_inverse(bound: float, floor_flops: int, floor_seconds: float, inverse_macs: int,
                          inverse_seconds: float) -> float:
    """`bound` with the inverse taking the seconds measured instead of its multiply-adds at the floor's speed; the
    floor's FLOPs and seconds are those of a whole optimizer step (all its micro-batches: one inverse)."""
    return bound + inverse_seconds / floor_seconds - 2 * inverse_macs / floor_flops
