"""--base_quantization: bitsandbytes' nf4 and int8 layers in place of the frozen Linear layers (what they take, what
stays in full precision), fast BOFT on them (stock peft's forward and gradients, the quantized weights untouched,
merging refused), the dry run's plan, bad input, and training, exact resume and inference end to end on the tiny
FLUX.2 [klein] pipeline (bitsandbytes' CPU kernels)."""

import copy
import sys

import pytest
import torch

from tests.helpers import assert_clean_error, assert_resumes_exactly, base_args, recipe_run, run_in_process
from utils import quantization
from utils.errors import UserError

RUN = "klein_nf4"


class Block(torch.nn.Module):
    _keep_in_fp32_modules = ["kept"]

    def __init__(self):
        super().__init__()
        self.to_q, self.other, self.kept = torch.nn.Linear(32, 48), torch.nn.Linear(48, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.kept(self.other(self.to_q(x)))


def stored_bytes(layer) -> int:
    """What a bitsandbytes layer's weight holds: its codes and every scale of its quantization state."""
    weight, state = layer.weight, getattr(layer.weight, "quant_state", None)
    total = weight.numel() * weight.element_size()
    if state is not None:
        total += state.absmax.numel() * state.absmax.element_size()
        total += 4 * (state.state2.absmax.numel() + state.state2.code.numel())
    if getattr(weight, "SCB", None) is not None:
        total += weight.SCB.numel() * weight.SCB.element_size()
    return total


@pytest.mark.parametrize("kind", quantization.KINDS)
def test_the_quantizable_layers_take_what_the_plan_says_and_the_kept_ones_stay(kind, tiny_klein_model):
    from diffusers import Flux2Transformer2DModel

    block = Block()
    assert quantization.quantize(block, kind, torch.float32, "cpu") == 2
    assert type(block.kept) is torch.nn.Linear and all(quantization.is_quantized(m) for m in (block.to_q, block.other))
    transformer = Flux2Transformer2DModel.from_pretrained(tiny_klein_model, subfolder="transformer")
    planned = quantization.quantized_bytes(transformer, kind)
    full = sum(m.weight.numel() * 4 for m in quantization.quantizable_layers(transformer).values())
    quantization.quantize(transformer, kind, torch.float32, "cpu")
    layers = [m for m in transformer.modules() if quantization.is_quantized(m)]
    assert len(layers) == 23 and sum(stored_bytes(m) for m in layers) == planned
    assert planned < full / (2 if kind == "int8" else 3)  # the tiny layers' fixed scale tables included


def boft_pair(kind, bias="none"):
    """A BOFT adapter with random rotations on a quantized base, under stock peft's forward and under ours."""
    from peft import BOFTConfig, get_peft_model

    from utils.boft import peft_seam

    peft_seam.install()
    torch.manual_seed(0)
    base = Block()
    quantization.quantize(base, kind, torch.float32, "cpu")
    stock = get_peft_model(base, BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["to_q"],
                                            boft_dropout=0.0, bias=bias))
    for name, parameter in stock.named_parameters():
        if "boft_R" in name:
            parameter.data.normal_(0, 0.1)
    fast = copy.deepcopy(stock)
    assert peft_seam.use_fast_forward(fast) == 1
    return stock, fast


@pytest.mark.parametrize("kind, bias", [("nf4", "none"), ("int8", "none"), ("nf4", "boft_only")])
def test_fast_boft_on_a_quantized_base_is_stock_pefts_and_leaves_the_weights_alone(kind, bias):
    stock, fast = boft_pair(kind, bias)
    x = torch.randn(5, 32)
    expected, got = stock(x), fast(x)
    assert torch.allclose(got, expected, atol=1e-5)
    expected.square().sum().backward()
    got.square().sum().backward()
    gradients = [dict((n, p.grad) for n, p in model.named_parameters() if p.requires_grad) for model in (stock, fast)]
    # boft_R and boft_s, and with --boft_bias boft_only the quantized layer's own (full-precision) bias
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) == (3 if bias == "boft_only" else 2)
    assert all(torch.allclose(gradients[1][n], g, atol=1e-5) for n, g in gradients[0].items())
    codes = fast.base_model.model.to_q.base_layer.weight.data.clone()
    torch.optim.SGD([p for p in fast.parameters() if p.requires_grad], lr=0.1).step()
    assert torch.equal(fast.base_model.model.to_q.base_layer.weight.data, codes)
    with pytest.raises(UserError, match="cannot merge an adapter into a quantized base: load the base in full"):
        fast.merge_adapter()


def test_bitsandbytes_that_cannot_be_imported_is_named_with_the_flag(monkeypatch):
    import importlib.abc

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "bitsandbytes":
                raise ImportError("libbitsandbytes_cpu.so: cannot open shared object file")

    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Refuse(), *sys.meta_path])
    with pytest.raises(UserError, match=r"--base_quantization nf4 needs bitsandbytes, which cannot be imported here "
                                        r"\(ImportError: libbitsandbytes_cpu.so.*pip install bitsandbytes"):
        quantization.quantize(Block(), "nf4", torch.float32, "cpu")


def test_the_flag_without_bitsandbytes_is_a_usage_error(monkeypatch, capsys):
    from utils import quiet
    from utils.run.flags import parse_args

    monkeypatch.setattr(quiet, "bitsandbytes_installed", lambda: False)
    with pytest.raises(SystemExit) as stop:
        parse_args(["--pretrained_model_name_or_path=m", "--instance_data_dir=.", "--instance_prompt=x", "--use_boft",
                    "--base_quantization=int8"])
    assert stop.value.code == 2
    assert "--base_quantization int8 needs bitsandbytes: pip install bitsandbytes" in capsys.readouterr().err


@pytest.fixture(scope="module")
def flux_dev_configs(tmp_path_factory):
    from benchmarks.flux_architecture import save_flux_configs

    return save_flux_configs(tmp_path_factory.mktemp("flux-configs") / "flux-dev")


@pytest.mark.e2e
@pytest.mark.parametrize("kind, weights, encoders", [("nf4", "5.88", "4.34"), ("int8", "11.25", "5.97")])
def test_the_plan_counts_flux_dev_quantized(flux_dev_configs, subject, tmp_path, kind, weights, encoders):
    """FLUX.1 [dev] at 1024 px: 22.32 GB of bf16 weights become 5.88 (nf4) or 11.25 (int8); T5 (its `wo` layers
    kept, as transformers keeps them) and CLIP-L, 9.34 GB, become 4.34 or 5.97 while they encode."""
    result = run_in_process(base_args(flux_dev_configs, subject, tmp_path / "out", resolution=None, dry_run=True,
                                      mixed_precision="bf16", base_quantization=kind, boft_block_num=0,
                                      boft_block_size=32))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"weights {weights} GB (bf16, the transformer Linear layers in {kind})" in result.stdout
    assert f"the frozen text encoders ({encoders} GB) leave it" in result.stdout


# --- end to end ---------------------------------------------------------------------------------------------------
def quantized_args(model, subject, root, output_dir, **extra):
    from tests.test_flux2_klein import klein_args

    return klein_args(model, subject, root, output_dir, **{"wandb_run_name": RUN, "base_quantization": "nf4", **extra})


@pytest.fixture(scope="module")
def nf4_run(tiny_klein_model, subject, tmp_path_factory):
    """klein's recipe run on an nf4 base: class images from the quantized pipeline, a checkpoint at step 2 of 3,
    validation at the end."""
    return recipe_run(tmp_path_factory, "nf4_run", lambda root: quantized_args(tiny_klein_model, subject, root,
                                                                               root / "out"))


@pytest.mark.e2e
def test_an_nf4_run_resumes_exactly(nf4_run, tiny_klein_model, subject, tmp_path):
    out = tmp_path / "out"
    assert_resumes_exactly(nf4_run, out, quantized_args(tiny_klein_model, subject, nf4_run, out, validation_prompt=None,
                                                        resume_from_checkpoint="latest"), ("transformer",), RUN)


@pytest.mark.e2e
def test_resuming_with_another_quantization_is_refused(nf4_run, tiny_klein_model, subject, tmp_path):
    import shutil

    shutil.copytree(nf4_run / "out" / "checkpoints", tmp_path / "out" / "checkpoints")
    result = run_in_process(quantized_args(tiny_klein_model, subject, nf4_run, tmp_path / "out",
                                           resume_from_checkpoint="latest", base_quantization="int8"))
    assert_clean_error(result, "--base_quantization: checkpoint 'nf4', now 'int8'")


@pytest.mark.e2e
def test_nf4_adapters_load_with_stock_peft_on_the_full_precision_base_and_export(nf4_run, tiny_klein_model, tmp_path):
    from diffusers import Flux2Transformer2DModel
    from peft import PeftModel
    from safetensors.torch import load_file

    from tests.test_export import run_export
    from utils.boft import peft_seam

    peft_seam.install()
    folder = nf4_run / "out" / "transformer" / "3" / RUN
    transformer = PeftModel.from_pretrained(Flux2Transformer2DModel.from_pretrained(tiny_klein_model,
                                                                                    subfolder="transformer"), folder)
    saved = load_file(folder / "adapter_model.safetensors")
    loaded = {n: p for n, p in transformer.named_parameters() if "boft_R" in n}
    assert len(loaded) == 13 and all(torch.equal(p, saved[n.replace(".default", "")]) for n, p in loaded.items())
    exported = run_export(tiny_klein_model, nf4_run / "out", RUN, "comfyui", tmp_path / "c.safetensors")
    assert exported.is_file()  # merged on the full-precision base the export loads


@pytest.mark.e2e
def test_inference_on_an_nf4_base_generates_and_refuses_to_merge(nf4_run, tiny_klein_model, tmp_path, capsys):
    import subprocess

    from tests.helpers import cli_env
    from utils import inference

    common = ["--pretrained_model_name_or_path", str(tiny_klein_model), "--output_dir", str(nf4_run / "out"),
              "--adapter_name", RUN, "--prompt", "a qwe toy", "--resolution", "64", "--num_inference_steps", "2",
              "--base_quantization", "nf4", "--out", str(tmp_path / "q.png")]
    result = subprocess.run([sys.executable, "-m", "utils.inference", *common], capture_output=True, text=True,
                            env=cli_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "q.png").is_file()
    for flag in (["--merge"], ["--save_merged", str(tmp_path / "merged")]):  # refused before anything loads
        with pytest.raises(SystemExit) as stop:
            inference.main(common + flag)
        assert stop.value.code == 2 and "cannot merge an adapter into a quantized base" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


@pytest.mark.e2e
def test_an_int8_stable_diffusion_unet_trains(tiny_model, subject, tmp_path):
    result = run_in_process(base_args(tiny_model, subject, tmp_path / "out", base_quantization="int8"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--base_quantization int8: 80 Linear layers of the unet" in result.stderr
    assert (tmp_path / "out" / "unet" / "2" / "dreambooth_boft" / "adapter_model.safetensors").is_file()
