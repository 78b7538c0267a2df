"""The peft seam: recognised by version and structure before anything is patched, installed explicitly, and
stock peft kept, with one warning, on anything it does not recognise."""

import types
import warnings

import pytest
import torch

import peft.tuners.boft.layer as peft_boft
from utils.boft import peft_seam
from utils.boft.shapes import BoftSettings


def test_this_peft_is_recognised():
    import peft

    assert peft_seam.recognition_problem(peft.__version__, peft_boft) is None
    assert peft_seam.install() is True
    assert isinstance(peft_boft._FBD_CUDA, peft_seam.TorchBlockDiagonal)


@pytest.mark.parametrize("version, module, problem", [
    ("0.30.0", peft_boft, "peft 0.30.0 is not a version"),
    ("0.21.2", None, "no peft.tuners.boft.layer module"),
    ("0.21.2", types.SimpleNamespace(Linear=peft_boft.Linear), "lack _FBD_CUDA, get_fbd_cuda"),
    ("0.21.2", types.SimpleNamespace(**{n: getattr(peft_boft, n) for n in peft_seam._PEFT_NAMES if n != "Linear"},
                                     Linear=type("Linear", (), {})), "lack Linear.forward, Linear.merge"),
])
def test_another_version_or_structure_is_named(version, module, problem):
    assert problem in peft_seam.recognition_problem(version, module)


@pytest.fixture
def unrecognised_peft(monkeypatch):
    """peft as a future version would look: the seam not installed yet, a version it does not know."""
    import peft

    monkeypatch.setattr(peft_seam, "_installed", None)
    monkeypatch.setattr(peft, "__version__", "0.99.0")
    monkeypatch.setattr(peft_boft, "_FBD_CUDA", peft_boft._FBD_CUDA)  # restored afterwards, whatever happens
    yield
    monkeypatch.setattr(peft_seam, "_installed", None)


def test_an_unrecognised_peft_keeps_stock_peft_with_one_warning(unrecognised_peft):
    before = peft_boft._FBD_CUDA
    with pytest.warns(UserWarning, match="peft 0.99.0 is not a version .* using stock peft"):
        assert peft_seam.install() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call warns no more
        assert peft_seam.install() is False
    assert peft_boft._FBD_CUDA is before  # nothing patched
    model = peft_seam.add_boft_adapter(torch.nn.Sequential(torch.nn.Linear(16, 16)), ["0"], BoftSettings(4, 0, 1),
                                       "a", "toy")
    assert peft_seam.use_fast_forward(model) == 0
    layer = model.base_model.model[0]
    assert "forward" not in layer.__dict__ and "merge" not in layer.__dict__  # peft's own methods


def test_a_moved_peft_module_warns_instead_of_raising(unrecognised_peft, monkeypatch):
    import peft

    monkeypatch.setattr(peft, "__version__", "0.21.2")

    def moved():
        raise ModuleNotFoundError("No module named 'peft.tuners.boft.layer'")

    monkeypatch.setattr(peft_seam, "_peft_layer_module", moved)
    with pytest.warns(UserWarning, match="no peft.tuners.boft.layer module"):
        assert peft_seam.install() is False


@pytest.mark.e2e
def test_importing_the_package_patches_nothing():
    import subprocess
    import sys

    # A fresh process: importing the project's modules must leave peft unimported, or at least unpatched.
    code = ("import sys, utils.boft.peft_seam, utils.boft.rotation, utils.boft.shapes, utils.inference, "
            "utils.evaluate, utils.run.plan; layer = sys.modules.get('peft.tuners.boft.layer'); "
            "print(type(getattr(layer, '_FBD_CUDA', None)).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() != "TorchBlockDiagonal"
