"""BOFT adapters: block-shape checks, every butterfly factor count, and the fast forward against peft and the math."""

import copy

import pytest
import torch
from peft import BOFTConfig, get_peft_model

import peft.tuners.boft.layer as peft_boft
from tests.helpers import counting_inverses
from utils.boft import peft_seam, rotation, shapes
from utils.boft.shapes import BoftSettings
from utils.errors import UserError
from utils.families.stable_diffusion import UNET_TARGET_MODULES


@pytest.mark.parametrize(
    "in_features, block_num, block_size, factors, fits",
    [(320, 8, 0, 1, True), (320, 7, 0, 1, False), (320, 0, 40, 1, True), (320, 8, 0, 2, True),
     (320, 8, 0, 4, True), (320, 8, 0, 5, False), (96, 0, 6, 2, True), (96, 0, 5, 1, False)],
)
def test_block_shape_rules(in_features, block_num, block_size, factors, fits):
    assert shapes.block_shape_fits(in_features, block_num, block_size, factors) is fits


def test_a_block_number_that_divides_no_layer_lists_layers_and_working_values():
    layers = {"down.attn1.to_q": 320, "mid.attn2.to_k": 768, "up.attn1.to_out.0": 640}
    with pytest.raises(UserError) as error:
        shapes.check_block_shape(layers, 7, 0, 1, "UNet")
    message = str(error.value)
    assert "--boft_block_num=7" in message and "down.attn1.to_q" in message and "[320, 640, 768]" in message
    assert "64" in message.split("fit every targeted layer")[1]


def test_the_tiny_unet_targets_are_found(tiny_model):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    layers = shapes.targeted_linears(unet, UNET_TARGET_MODULES)
    assert layers and all(name.split(".")[-1] in ("to_q", "to_k", "to_v", "0") for name in layers)


def test_peft_falling_back_to_one_factor_is_refused(monkeypatch):
    monkeypatch.setattr(peft_boft, "_FBD_CUDA", None)
    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: None)  # what peft sees when its kernel fails to build
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(32, 32)),
                           BOFTConfig(boft_block_num=8, boft_block_size=0, boft_n_butterfly_factor=2, target_modules=["0"]))
    with pytest.raises(UserError, match="built 1 butterfly factor"):
        peft_seam.check_butterfly_factors(model, "default", 2)


@pytest.mark.parametrize("factors", [1, 2, 3, 4])
def test_every_factor_count_is_built_and_saved_with_its_shape(factors, tmp_path):
    from peft import PeftModel

    model = peft_seam.add_boft_adapter(torch.nn.Sequential(torch.nn.Linear(64, 64)), ["0"],
                                  BoftSettings(16, 0, factors), "subject", "toy")
    assert model.base_model.model[0].boft_R["subject"].shape == (factors, 16, 4, 4)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(torch.nn.Sequential(torch.nn.Linear(64, 64)), tmp_path / "subject",
                                       adapter_name="subject")
    assert loaded.base_model.model[0].boft_R["subject"].shape == (factors, 16, 4, 4)


def random_boft_layer(in_features=64, out_features=48, block_num=8, factors=1, dropout=0.0, bias=True):
    peft_seam.install()
    base = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=bias))
    config = BOFTConfig(boft_block_num=block_num, boft_block_size=0, boft_n_butterfly_factor=factors,
                        boft_dropout=dropout, target_modules=["0"], init_weights=False)
    return get_peft_model(base, config).base_model.model[0]


def dense_rotation(layer, adapter="default"):
    """R = B_{m-1} ... B_0 with B_i = P_i BD(Q_i) P_i^T, from the definition, with dense matrices."""
    boft_r = layer.boft_R[adapter]
    m, d, h, _ = boft_r.shape
    rotation = torch.eye(d * h)
    for i in range(m):
        skew = 0.5 * (boft_r[i] - boft_r[i].transpose(1, 2))
        eye = torch.eye(h).expand(d, h, h)
        q = (eye - skew) @ torch.linalg.inv(eye + skew)
        permutation = layer.boft_P[i]
        rotation = permutation @ torch.block_diag(*q) @ permutation.T @ rotation
    return rotation


def outputs_and_grads(layer, x, forward):
    layer.zero_grad()
    x = x.clone().requires_grad_()
    y = forward(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return y.detach(), x.grad, layer.boft_R["default"].grad.clone(), layer.boft_s["default"].grad.clone()


def assert_close(got, expected, rtol=1e-5):
    for a, b in zip(got, expected):
        scale = b.abs().max().clamp_min(1e-6)
        assert (a - b).abs().max() / scale < rtol, (a - b).abs().max() / scale


@pytest.mark.parametrize("side", ["weight", "activation"])
@pytest.mark.parametrize("tokens", [3, 257])
def test_fast_forward_matches_stock_peft_for_one_factor(side, tokens):
    layer = random_boft_layer()
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(1))
    stock = outputs_and_grads(layer, x, lambda v: peft_boft.Linear.forward(layer, v))
    fast = outputs_and_grads(layer, x, lambda v: peft_seam.boft_linear(layer, v, "default", side))
    assert_close(fast, stock)


@pytest.mark.parametrize("side", ["weight", "activation"])
@pytest.mark.parametrize("factors, block_num", [(2, 8), (3, 8), (4, 16)])
def test_fast_forward_matches_the_dense_product_of_factors(side, factors, block_num):
    layer = random_boft_layer(block_num=block_num, factors=factors)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    weight, bias = layer.base_layer.weight, layer.base_layer.bias

    def reference(v):
        return (v @ dense_rotation(layer) @ weight.T) * layer.boft_s["default"].view(-1) + bias

    assert_close(outputs_and_grads(layer, x, lambda v: peft_seam.boft_linear(layer, v, "default", side)),
                 outputs_and_grads(layer, x, reference))
    # peft's own forward, now given the block-diagonal operation, computes the same thing
    assert_close(outputs_and_grads(layer, x, lambda v: peft_boft.Linear.forward(layer, v)),
                 outputs_and_grads(layer, x, reference))


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("factors, block_num, length", [(2, 8, 2), (3, 8, 3), (4, 16, 2), (4, 16, 4)])
def test_factors_in_runs_rotate_and_differentiate_as_factor_by_factor(factors, block_num, length, transpose,
                                                                        monkeypatch):
    layer = random_boft_layer(block_num=block_num, factors=factors)
    boft_r = layer.boft_R["default"]
    plan = peft_seam.rotation_plan(layer, boft_r, transpose)
    rows = torch.randn(3, 100, 64, generator=torch.Generator().manual_seed(7))

    def rotated(run_length: int):
        monkeypatch.setattr(rotation, "run_length", lambda *arguments: run_length)
        x, r = rows.clone().requires_grad_(), boft_r.detach().clone().requires_grad_()
        y = rotation.rotate_rows(x, rotation.cayley(r), plan)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        return y.detach(), x.grad, r.grad

    assert_close(rotated(length), rotated(1))


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("factors, block_num", [(2, 8), (3, 16), (4, 16)])
def test_runs_of_factors_are_block_diagonal_in_their_components(factors, block_num, transpose):
    """peft's butterfly factor i mixes within aligned groups of H * 2^i: a run of k consecutive factors is one
    block-diagonal matrix of blocks H * 2^(k-1) wide once its columns are gathered by component (all of them
    together: the aligned groups, no gather)."""
    layer = random_boft_layer(block_num=block_num, factors=factors)
    block_size = 64 // block_num
    blocks, plan = rotation.cayley(layer.boft_R["default"]), peft_seam.rotation_plan(layer, layer.boft_R["default"],
                                                                                       transpose)
    dense = dense_rotation(layer).T if transpose else dense_rotation(layer)
    for length in range(2, factors + 1):
        runs = plan.runs(length)
        if factors % length:
            assert runs is None
            continue
        assert runs.group == block_size * 2 ** (length - 1)
        with torch.no_grad():
            run_blocks = runs.blocks(blocks)
        assert run_blocks.shape == (factors // length, 64 // runs.group, runs.group, runs.group)
        product = torch.eye(64)
        for r, before, after in runs.steps:
            product = before(product) if before is not None else product
            product = product @ torch.block_diag(*run_blocks[r])
            product = after(product) if after is not None else product
        assert_close([product], [dense])
    whole = plan.runs(factors)
    assert all(move is None for _, *moves in whole.steps for move in moves)


def test_factors_are_grouped_only_where_it_clearly_pays():
    def length(width, block_size, factors, rows):
        layer = random_boft_layer(width, 8, block_num=width // block_size, factors=factors)
        plan = peft_seam.rotation_plan(layer, layer.boft_R["default"], False)
        return rotation.run_length(plan, factors, block_size, rows)

    assert length(320, 40, 1, 10**6) == 1  # one factor is a block product already
    assert length(3072, 32, 2, 2176) == 2 and length(3072, 32, 4, 2176) == 2  # FLUX.1 at 512 px: in pairs
    assert length(1536, 32, 4, 512) == 2  # SD3.5 Medium at 256 px: four factors of 32 as two of 64
    assert length(320, 40, 2, 2048) == 2  # SD 1.5's widest activations at 256 px
    assert length(3072, 32, 2, 8) == 1  # fewer rows than the probe that builds the blocks
    assert length(1280, 160, 4, 128) == 1  # 320-wide blocks cost more than they save at 128 rows


@pytest.mark.parametrize("in_features, out_features, factors", [(2048, 640, 1), (1280, 1280, 2), (768, 768, 1)])
def test_sdxl_widths_fast_forward_and_merge_match_stock_peft(in_features, out_features, factors):
    """SDXL's cross-attention keys read 2048-wide text states; its layers are 640 and 1280 wide, its text encoders
    768 and 1280: the block-shape rules, the fast forward on either side and merging cover them."""
    layer = random_boft_layer(in_features, out_features, block_num=8, factors=factors)
    x = torch.randn(2, 7, in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stock = peft_boft.Linear.forward(layer, x)
        for side in ("weight", "activation"):
            assert_close([peft_seam.boft_linear(layer, x, "default", side)], [stock], rtol=1e-4)
        layer.merge()
        assert_close([layer(x)], [stock], rtol=1e-4)


@pytest.mark.parametrize("side", ["weight", "activation"])
def test_dropout_matches_peft_under_the_same_random_state(side):
    layer = random_boft_layer(factors=2, dropout=0.5)
    layer.train()
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    stock = outputs_and_grads(layer, x, lambda v: peft_boft.Linear.forward(layer, v))
    torch.manual_seed(5)
    fast = outputs_and_grads(layer, x, lambda v: peft_seam.boft_linear(layer, v, "default", side))
    assert_close(fast, stock)
    torch.manual_seed(6)
    assert not torch.allclose(peft_seam.boft_linear(layer, x, "default", side), fast[0])  # dropout is really active


def test_the_dropout_masks_of_many_layers_drawn_together_are_each_layers_own():
    """Layers of several shapes, dropping some blocks, none (too few blocks for its p) or not drawing (evaluating):
    one mask for all, from the same draws in the same order, as the layers' masks one after another."""
    peft_seam.install()
    shapes = [(2, 8), (1, 4), (4, 8), (2, 6), (1, 8)]
    dropouts = [peft_boft.MultiplicativeDropoutLayer(p) for p in (0.5, 0.1, 0.25, 0.5, 0.5)]
    dropouts[3].eval()
    torch.manual_seed(7)
    masks = [peft_seam.dropout_mask(dropout, m, d) for dropout, (m, d) in zip(dropouts, shapes)]
    next_layered = torch.randint(0, 2**30, (1,))
    expected = torch.cat([torch.zeros(m * d, dtype=torch.bool) if mask is None else mask.view(-1)
                          for mask, (m, d) in zip(masks, shapes)])
    torch.manual_seed(7)
    draws = [peft_seam.dropout_draws(dropout, m, d) for dropout, (m, d) in zip(dropouts, shapes)]
    assert torch.equal(torch.randint(0, 2**30, (1,)), next_layered)  # the same random numbers drawn
    assert torch.equal(peft_seam.dropout_masks_together(draws, shapes), expected)
    assert expected.sum() == 4 + 2 + 4
    assert peft_seam.dropout_masks_together([draws[1], None], shapes[1:3]) is None  # nothing dropped


@pytest.mark.parametrize("factors", [1, 2, 4])
def test_the_rotation_is_orthogonal(factors):
    layer = random_boft_layer(block_num=16, factors=factors)
    eye = torch.eye(64)
    with torch.no_grad():
        r = rotation.rotate_rows(eye, *_blocks_and_permutations(layer))
    assert (r.T @ r - eye).abs().max() < 1e-5


def _blocks_and_permutations(layer):
    boft_r = layer.boft_R["default"]
    return rotation.cayley(boft_r), peft_seam.rotation_plan(layer, boft_r, False)


def test_cayley_equals_peft_s():
    layer = random_boft_layer(factors=2)
    boft_r = layer.boft_R["default"]
    m, d, h, _ = boft_r.shape
    expected = layer.cayley_batch(boft_r.view(m * d, h, h)).view(m, d, h, h)
    assert (rotation.cayley(boft_r) - expected).abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("side", ["weight", "activation"])
def test_half_precision_runs_and_stays_close(dtype, side):
    layer = random_boft_layer(factors=2)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = peft_seam.boft_linear(layer, x, "default", side)
        half = copy.deepcopy(layer)
        half.base_layer.to(dtype)
        got = peft_seam.boft_linear(half, x.to(dtype), "default", side)
    assert got.dtype == dtype
    assert (got.float() - expected).abs().max() / expected.abs().max() < 3e-2


@pytest.mark.parametrize("out_features, tokens", [(320, 4096), (320, 319), (1280, 128), (768, 768)])
def test_generating_rotates_the_side_with_fewer_rows(out_features, tokens):
    # Without training both sides pay the same per element rotated: out*in on the weight, tokens*in on the inputs.
    # (Which side training picks depends on the tuned ELEMENT_OVERHEAD: benchmarks/boft_step.py measures it.)
    side = rotation.cheaper_side(out_features, 320, tokens, 2, 40, training=False)
    assert side == ("weight" if out_features <= tokens else "activation")


def test_training_charges_the_weight_side_for_the_rotated_weights_gradient():
    sides = {tokens: rotation.cheaper_side(320, 320, tokens, 1, 40, training=True) for tokens in (320, 10**6)}
    assert rotation.cheaper_side(320, 320, 320, 1, 40, training=False) == "weight"
    assert sides[320] == "activation"  # equal rows: the weight side's extra product decides


def test_use_fast_forward_routes_the_unet_and_merging_still_works(tiny_model):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    settings = BoftSettings(8, 0, 2)
    fast = peft_seam.add_boft_adapter(copy.deepcopy(unet), UNET_TARGET_MODULES, settings, "a", "UNet")
    stock = peft_seam.add_boft_adapter(unet, UNET_TARGET_MODULES, BoftSettings(8, 0, 2, impl="peft"), "a", "UNet")
    stock.load_state_dict(fast.state_dict())
    for parameter in fast.parameters():
        if parameter.requires_grad:
            parameter.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    stock.load_state_dict(fast.state_dict())
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32))
    with torch.no_grad():
        expected = stock(*inputs).sample
        assert (fast(*inputs).sample - expected).abs().max() < 1e-4
        merged = fast.merge_and_unload()
        assert (merged(*inputs).sample - expected).abs().max() < 1e-4


@pytest.mark.parametrize("factors, block_num", [(2, 8), (4, 8), (3, 16)])
def test_butterfly_permutations_move_chunks_of_half_a_block_and_equal_the_gather(factors, block_num):
    layer = random_boft_layer(in_features=64, block_num=block_num, factors=factors)
    z = torch.randn(5, 64)
    steps = peft_seam.rotation_plan(layer, layer.boft_R["default"], transpose=False).steps
    # a factor's permutation after and the next one's before are one gather
    assert sum(p is not None for _, before, after in steps for p in (before, after)) <= factors + 1
    for _, before, after in steps:
        for permutation in (p for p in (before, after) if p is not None):
            assert permutation.chunk % (64 // block_num // 2) == 0  # peft's permutations all move half-blocks
            assert torch.equal(permutation(z), z[:, permutation.index])
            assert torch.equal(permutation.inverse()(permutation(z)), z)


def test_an_unstructured_permutation_falls_back_to_a_gather():
    index = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    permutation = rotation.ColumnPermutation(index)
    z = torch.randn(3, 64)
    assert permutation.chunk == 1
    assert torch.equal(permutation(z), z[:, index]) and torch.equal(permutation.inverse()(permutation(z)), z)


@pytest.mark.parametrize("factors", [1, 2])
def test_gradients_come_back_in_the_activations_layout(factors):
    layer = random_boft_layer(factors=factors)
    x = torch.randn(2, 33, 64, requires_grad=True)
    peft_seam.boft_linear(layer, x, "default", "activation").square().sum().backward()
    assert x.grad.is_contiguous()  # a transposed gradient would make every later layer's backward copy it


def test_the_copying_block_product_for_other_devices_computes_the_same(monkeypatch):
    layer = random_boft_layer(factors=2)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(7))
    strided = outputs_and_grads(layer, x, lambda v: peft_seam.boft_linear(layer, v, "default", "activation"))
    monkeypatch.setattr(rotation, "STRIDED_OUT_DEVICES", ())
    assert_close(outputs_and_grads(layer, x, lambda v: peft_seam.boft_linear(layer, v, "default", "activation")), strided)


def test_blocks_in_a_batch_order_run_factor_by_factor_and_give_each_layer_its_gradient_laid_out():
    """Three layers' blocks (m, D) = (2, 3), (1, 4), (2, 3) in runs [[0, 2], [1]]: the run of two is one (2, 6)
    slice, factor 0 of both layers then factor 1; the gradients come back to each layer's parameters contiguous
    (autograd then hands them to .grad without a copy) and equal to those through the plain order."""
    generator = torch.Generator().manual_seed(11)
    parameters = [torch.randn(*shape, 5, 5, generator=generator).requires_grad_() for shape in ((2, 3), (1, 4), (2, 3))]
    order = rotation.BatchOrder([[0, 2], [1]], [(2, 3), (1, 4), (2, 3)], torch.device("cpu"))
    batch = rotation.BlocksInOrder.apply(order, *parameters)
    runs, layers = order.split(batch)
    a, b, c = (p.detach() for p in parameters)
    assert torch.equal(runs[0], torch.stack([torch.cat([a[0], c[0]]), torch.cat([a[1], c[1]])]))
    assert torch.equal(runs[1], b)
    assert all(torch.equal(got, p) for got, p in zip(layers, parameters))
    assert torch.equal(batch, torch.cat([p.reshape(-1, 5, 5) for p in parameters])[order.source])
    weights = torch.randn(batch.shape, generator=generator)
    (batch * weights).sum().backward()
    in_layer_order = weights[torch.argsort(order.source)].split([6, 4, 6])
    for parameter, expected in zip(parameters, in_layer_order):
        assert parameter.grad.is_contiguous() and torch.equal(parameter.grad, expected.view(parameter.shape))
    alone = rotation.BatchOrder([[0], [1]], [(2, 3), (1, 4)], torch.device("cpu"))
    assert alone.back is None  # layers alone keep their parameters' order: no gather either way


def _fast_layer(**settings):
    layer = random_boft_layer(**settings)
    layer._fast_boft = True  # as use_fast_forward marks the layers it routes
    return layer


@pytest.mark.parametrize("side", ["weight", "activation"])
def test_the_rotation_cache_inverts_once_per_parameter_state_and_changes_no_gradient(side, monkeypatch):
    """Gradient accumulation: micro-batches share one Cayley inverse; outputs and accumulated gradients are
    bit-identical to computing it every micro-batch."""
    plain, cached = _fast_layer(factors=2), _fast_layer(factors=2)
    cached.load_state_dict(plain.state_dict())
    cache = peft_seam.RotationCache(torch.nn.Sequential(cached))
    calls = counting_inverses(monkeypatch)
    micro_batches = [torch.randn(5, 64, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    for layer in (plain, cached):
        for x in micro_batches:
            peft_seam.boft_linear(layer, x, "default", side).square().sum().backward()
    assert calls == [16] * (len(micro_batches) + 1)  # 2 x 8 blocks every micro-batch without the cache, once with it
    assert torch.equal(plain.boft_R["default"].grad, cached.boft_R["default"].grad)
    assert torch.equal(plain.boft_s["default"].grad, cached.boft_s["default"].grad)
    x = micro_batches[0]
    with torch.no_grad():
        cached.boft_R["default"].add_(0.1)  # an optimizer step in place: the version counter moves
        plain.boft_R["default"].add_(0.1)
        assert torch.equal(peft_seam.boft_linear(cached, x, "default", side),
                           peft_seam.boft_linear(plain, x, "default", side))
        cached.boft_R["default"].data += 0.1  # a write torch does not count (bitsandbytes' kernels): clear()
        plain.boft_R["default"].data += 0.1
        cache.clear()
        assert torch.equal(peft_seam.boft_linear(cached, x, "default", side),
                           peft_seam.boft_linear(plain, x, "default", side))


def test_the_rotation_cache_inverts_every_layer_at_once_one_batch_per_block_size(monkeypatch):
    layers = [_fast_layer(factors=2), _fast_layer(factors=1), _fast_layer(block_num=4)]  # blocks of 8, 8 and 16
    cache = peft_seam.RotationCache(torch.nn.ModuleList(layers))
    one_by_one = [rotation.skew_inverse(layer.boft_R["default"].detach().flatten(0, 1)) for layer in layers]
    calls = counting_inverses(monkeypatch)
    together = [cache.inverse(layer, "default", layer.boft_R["default"]) for layer in layers]
    assert sorted(calls) == [4, 16 + 8]  # the first layer's miss inverted all three
    assert all(torch.equal(a, b) for a, b in zip(together, one_by_one))
    with torch.no_grad():
        layers[1].boft_R["default"].add_(0.1)
    cache.inverse(layers[0], "default", layers[0].boft_R["default"])
    assert sorted(calls) == [4, 16 + 8]  # still current
    cache.inverse(layers[1], "default", layers[1].boft_R["default"])
    assert calls[-1] == 8  # only the changed layer again


def test_the_rotation_cache_inverts_only_the_adapter_in_use(monkeypatch):
    """Several subjects loaded for generation: a forward with one active inverts its blocks alone."""
    layers = [_fast_layer(factors=2), _fast_layer(factors=2)]
    for layer in layers:
        layer.update_layer("other", BOFTConfig(boft_block_num=8, boft_block_size=0, boft_n_butterfly_factor=2,
                                               boft_dropout=0.0, target_modules=["0"], init_weights=False))
    cache = peft_seam.RotationCache(torch.nn.ModuleList(layers))
    calls = counting_inverses(monkeypatch)
    cache.inverse(layers[0], "default", layers[0].boft_R["default"])
    assert calls == [2 * 16]  # both layers' "default" (2 factors x 8 blocks each), not "other"
    cache.inverse(layers[1], "other", layers[1].boft_R["other"])
    assert calls == [2 * 16, 2 * 16]
    cache.inverse(layers[1], "default", layers[1].boft_R["default"])
    assert len(calls) == 2  # still current


def test_folding_generates_as_merged_and_puts_the_very_weights_back():
    layer = _fast_layer(factors=2)
    layer.eval()
    model = torch.nn.Sequential(layer)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(8))
    weight = layer.base_layer.weight
    address, before = weight.data_ptr(), weight.detach().clone()
    with torch.no_grad():
        unfolded = peft_seam.fast_boft_forward(layer, x)
        with peft_seam.folded(model):
            assert layer.merged and not torch.equal(weight, before)
            folded = peft_seam.fast_boft_forward(layer, x)
        assert not layer.merged and weight.data_ptr() == address and torch.equal(weight, before)
        assert_close([folded], [unfolded], rtol=1e-5)
        peft_seam.structured_merge(layer)
        assert torch.equal(peft_seam.fast_boft_forward(layer, x), folded)  # folded is merged, exactly
    fresh = _fast_layer(factors=2).eval()
    kept = fresh.base_layer.weight.detach().clone()
    with pytest.raises(RuntimeError), peft_seam.folded(torch.nn.Sequential(fresh)):
        raise RuntimeError  # an error while generating still puts the weights back
    assert not fresh.merged and torch.equal(fresh.base_layer.weight, kept)


def _tiny_unet_with_boft(tiny_model, factors, checkpointing):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    if checkpointing:
        unet.enable_gradient_checkpointing()
    model = peft_seam.add_boft_adapter(unet, UNET_TARGET_MODULES, BoftSettings(8, 0, factors, dropout=0.5), "a",
                                       "UNet")
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    return model.train()


# The sides a test puts layers on: all on one, or (mixed) the square layers on the weight side and the others on
# the activations, so that the weight side's runs and the layers alone share their block size's batch.
SIDES = {"weight": lambda *shape: "weight", "activation": lambda *shape: "activation",
         "mixed": lambda out, in_, *rest: "weight" if out == in_ else "activation"}


@pytest.mark.parametrize("side", sorted(SIDES))
@pytest.mark.parametrize("factors, checkpointing", [(1, False), (2, True)])
def test_rotations_computed_together_train_as_layer_by_layer(tiny_model, factors, checkpointing, side, monkeypatch):
    """Dropout on: the same random numbers in the same order (the UNet calls its middle block before the up
    blocks it registers first), outputs and gradients as layer by layer, and with gradient checkpointing the
    recomputed blocks take the forward's rotations."""
    monkeypatch.setattr(peft_seam, "cheaper_side", SIDES[side])
    plain = _tiny_unet_with_boft(tiny_model, factors, checkpointing)
    together = _tiny_unet_with_boft(tiny_model, factors, checkpointing)
    rotations = peft_seam.RotationCache(together, together=True)
    forward = next(m for m in together.modules() if hasattr(m, "boft_R")).__dict__["_forward_rotations"]
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32))
    for step in range(3):  # the first forward records the order the layers are called in
        results = []
        for model in (plain, together):
            torch.manual_seed(step)
            model.zero_grad()
            output = model(*inputs).sample
            output.square().mean().backward()
            results.append((output.detach(), *[p.grad for p in model.parameters() if p.requires_grad]))
        assert_close(results[1], results[0], rtol=1e-6 if factors == 1 else 1e-5)
        assert (forward._entries is not None) == (step > 0)
        rotations.clear()
    assert len(forward.order) == sum(1 for m in together.modules() if hasattr(m, "boft_R"))
    torch.manual_seed(3)
    with torch.no_grad():
        assert not torch.allclose(together(*inputs).sample, results[1][0])  # the dropout draws really differ


def _boft_stack(layers: int, dropout=0.1):
    peft_seam.install()
    config = BOFTConfig(boft_block_num=8, boft_block_size=0, boft_n_butterfly_factor=2, boft_dropout=dropout,
                        target_modules=[str(i) for i in range(layers)], init_weights=False)
    model = get_peft_model(torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(layers)]), config)
    peft_seam.use_fast_forward(model)
    return model.train(), peft_seam.RotationCache(model, together=True)


def test_layers_rotating_their_weights_together_add_one_kernel_each(monkeypatch):
    """What BOFT adds to a step beyond a group's few dozen operations, per layer: the rotated weight's gradient, one
    product. Each layer's parameters take their share of the batched gradients as their .grad, not a copy of it
    (the Cayley map's gradient is laid out as the parameters are). Every computing ATen operation is a kernel
    launch on a GPU. (Dropout adds its random draws on the host, in peft's order, which launch nothing.) The
    group's own, one block size and one weight shape at two factors: 25 (the Cayley map and its inverse, the
    factors' products and gathers forward and backward, the scales, the weights side by side, AdamW)."""
    from benchmarks.boft_step import operation_count

    monkeypatch.setattr(peft_seam, "cheaper_side", lambda *shape: "weight")
    # Where a run of factors would pay on time, the weights still rotate factor by factor: fewer launches.
    monkeypatch.setattr(rotation, "run_length", lambda *arguments: 2)
    added = {}
    for layers in (4, 8):
        model, rotations = _boft_stack(layers, dropout=0.0)
        x = torch.randn(16, 64)

        def step():
            model(x.clone().requires_grad_()).square().mean().backward()
            model.zero_grad(set_to_none=True)  # as the trainer does
            rotations.clear()

        step()  # records the order
        step()  # builds the side-by-side plans, once
        with model.disable_adapter():
            floor = operation_count(step)[1]
        added[layers] = operation_count(step)[1] - floor
    assert added[8] - added[4] <= 1 * 4, added
    assert added[4] - 4 <= 25, added


def test_a_layer_called_outside_its_models_forward_rotates_by_itself():
    model, _ = _boft_stack(2)
    for _ in range(2):  # recorded, then rotated together
        model(torch.randn(3, 64))
    layer = model.base_model.model[0]
    forward = layer.__dict__["_forward_rotations"]
    assert forward._entries is not None
    assert forward.prepared(layer, "default", "weight") is None  # the forward's rotations are not reused outside it


def test_weights_side_by_side_scale_as_autograd_does_with_gradients_laid_out_as_the_parameters():
    """rotation.ScaleSideBySide against torch's own product through the transposes, and each layer's share of the
    scales' gradient contiguous (what lets autograd hand it to the layer's .grad without a copy)."""
    generator = torch.Generator().manual_seed(5)
    rows, scales = torch.randn(6, 3, 4, generator=generator), torch.randn(3, 6, generator=generator)
    grad = torch.randn(6, 3, 4, generator=generator)
    results = []
    for forward in (rotation.ScaleSideBySide.apply, lambda r, s: r * s.t().unsqueeze(-1)):
        inputs = [rows.clone().requires_grad_(), scales.clone().requires_grad_()]
        output = forward(*inputs)
        output.backward(grad)
        results.append((output.detach(), inputs[0].grad, inputs[1].grad))
    assert_close(results[0], results[1])
    assert results[0][1].is_contiguous() and all(share.is_contiguous() for share in results[0][2].unbind(0))


@pytest.mark.parametrize("strided_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_shift", [False, True])
def test_the_output_scale_differentiates_as_autograd_does(with_shift, dtype, strided_grad):
    """rotation.ScaleShift against torch's own mul / addcmul, a trained bias included, under mixed dtypes, with the
    gradient contiguous or strided (as attention's output projection receives it)."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 6, generator=generator).to(dtype)
    scale, shift = torch.randn(6, generator=generator), torch.randn(6, generator=generator) if with_shift else None
    grad = torch.randn(5, 2, 6, generator=generator).transpose(0, 1) if strided_grad else torch.randn(
        2, 5, 6, generator=generator)
    results = []
    for forward in (lambda a, s, b: rotation.ScaleShift.apply(a, s, b),
                    lambda a, s, b: a * s if b is None else torch.addcmul(b, a, s)):
        inputs = [t.clone().requires_grad_() if t is not None else None for t in (x, scale, shift)]
        output = forward(*inputs)
        output.backward(grad)
        results.append((output.detach(), *[t.grad for t in inputs if t is not None]))
    for got, expected in zip(*results):
        assert got.dtype == expected.dtype
        assert torch.allclose(got.float(), expected.float(), rtol=1e-3 if dtype == torch.float16 else 1e-6)
