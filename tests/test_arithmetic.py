"""benchmarks/arithmetic.py: BOFT's extra multiply-adds, counted from a layer's shape and the rows it sees."""

import torch
from peft import BOFTConfig, get_peft_model

from benchmarks.arithmetic import (counted_floor, extra_multiply_adds, inverse_multiply_adds, lower_bound,
                                   measured_inverse_seconds, with_measured_inverse)
from tests.helpers import counting_inverses
from utils.boft import peft_seam


def boft_model(block_num=8):
    peft_seam.install()
    config = BOFTConfig(boft_block_num=block_num, boft_block_size=0, boft_n_butterfly_factor=2, target_modules=["0"])
    return get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 48)), config)


def test_the_cheaper_side_and_the_cayley_transform_are_counted():
    layer = boft_model().base_model.model[0]  # 2 factors of 8 blocks of 8
    on_activations, cayley = 3 * 2 * 10 * 64 * 8, 3 * 2 * 8 * 8**3
    assert extra_multiply_adds(layer, rows=10) == on_activations + cayley
    layer = boft_model(block_num=2).base_model.model[0]  # blocks of 32: with many rows the weight side is cheaper
    on_weight, cayley = 2 * 2 * 48 * 64 * 32 + 10_000 * 48 * 64, 3 * 2 * 2 * 32**3
    assert extra_multiply_adds(layer, rows=10_000) == on_weight + cayley


def test_the_floor_is_counted_with_the_rows_each_layer_saw():
    model = boft_model()
    x = torch.randn(3, 5, 64, requires_grad=True)

    def floor_step():
        with model.disable_adapter():
            model(x).sum().backward()

    flops, extra = counted_floor(floor_step, model)
    assert flops == 2 * 15 * 64 * 48 * 2  # forward and the input's gradient, 15 rows
    assert extra == extra_multiply_adds(model.base_model.model[0], rows=15)
    assert lower_bound(flops, extra) == 1 + 2 * extra / flops


def test_accumulated_micro_batches_share_the_cayley_inverse():
    layer = boft_model().base_model.model[0]
    rotation = 3 * 2 * 10 * 64 * 8
    inverse, backward = 2 * 8 * 8**3, 2 * 2 * 8 * 8**3  # per factor and block: the inverse once a step
    assert extra_multiply_adds(layer, rows=10, micro_batches=4) == rotation + backward + inverse / 4


def test_the_second_bound_puts_the_measured_inverse_in_place_of_its_multiply_adds(monkeypatch):
    model = boft_model()  # 2 factors of 8 blocks of 8
    assert inverse_multiply_adds(model) == 2 * 8 * 8**3
    calls = counting_inverses(monkeypatch)
    assert measured_inverse_seconds(model, repeats=3) > 0
    assert calls == [16] * 4  # every block of every factor of the layer, once a repeat and once untimed
    floor_flops, floor_seconds, macs = 10**9, 2.0, 10**6
    at_floor_speed = 2 * macs / floor_flops * floor_seconds
    assert with_measured_inverse(1.1, floor_flops, floor_seconds, macs, at_floor_speed) == 1.1
    assert abs(with_measured_inverse(1.1, floor_flops, floor_seconds, macs, at_floor_speed + 0.2) - 1.2) < 1e-12


def test_operation_count_tells_views_from_operations_that_compute():
    from benchmarks.boft_step import operation_count

    x = torch.randn(4, 6)

    def step():
        with torch.autograd.profiler.record_function("as an optimizer marks its step"):  # two marks: no kernel
            y = x.view(6, 4).t().transpose(0, 1)  # three views: no kernel
            return (y * 2).sum()  # two that compute

    assert operation_count(step) == (7, 2)
