import errno
import json
import logging

import pytest
import torch

from tests.helpers import make_config
from utils import atomic
from utils.atomic import atomic_folder
from utils.errors import UserError
from utils.families.stable_diffusion import StableDiffusion
from utils.layout import RunLayout
from utils.run import checkpoints


def write_checkpoint(root, step, settings=None, content=b"weights"):
    with atomic_folder(root / f"checkpoint-{step}") as tmp:
        (tmp / "optimizer.bin").write_bytes(content)
        record = {"train_state": {"seed": 1, "global_step": step, "epoch": 0, "batches_done_in_epoch": step},
                  "settings": settings or {"boft_block_num": 8}, "files": {"optimizer.bin": len(content)}}
        (tmp / checkpoints.STATE_FILE).write_text(json.dumps(record))
    return root / f"checkpoint-{step}"


def test_latest_is_the_newest_complete_checkpoint_and_truncated_ones_are_skipped(tmp_path, caplog):
    layout = RunLayout(tmp_path, "dog")
    for step in (2, 10, 4):
        write_checkpoint(layout.checkpoints, step)
    assert checkpoints.find_resume_checkpoint("latest", layout).name == "checkpoint-10"
    (layout.checkpoint(10) / "optimizer.bin").write_bytes(b"wei")  # truncated
    layout.checkpoint(12).mkdir()  # never finished (no state file)
    assert checkpoints.find_resume_checkpoint("latest", layout).name == "checkpoint-4"
    assert "Skipping checkpoint" in caplog.text and "checkpoint-10" in caplog.text and "checkpoint-12" in caplog.text


def test_each_run_sees_only_its_own_checkpoints(tmp_path, caplog):
    dog, cat = RunLayout(tmp_path, "dog"), RunLayout(tmp_path, "cat")
    write_checkpoint(dog.checkpoints, 2)
    write_checkpoint(cat.checkpoints, 4)
    assert checkpoints.find_resume_checkpoint("latest", dog) == dog.checkpoint(2)
    assert checkpoints.find_resume_checkpoint("checkpoint-2", dog) == dog.checkpoint(2)
    with pytest.raises(UserError, match="no such folder"):
        checkpoints.find_resume_checkpoint("checkpoint-4", dog)
    assert checkpoints.complete_checkpoints(cat) == [cat.checkpoint(4)]


def test_latest_without_checkpoints_starts_fresh_and_points_at_old_layout_ones(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    layout = RunLayout(tmp_path, "dog")
    assert checkpoints.find_resume_checkpoint("latest", layout) is None
    assert "starting from the beginning" in caplog.text and "layout before" not in caplog.text
    old = write_checkpoint(tmp_path, 6)  # written by a version that kept checkpoints at the top
    assert checkpoints.find_resume_checkpoint("latest", layout) is None
    assert "checkpoint-6" in caplog.text and "--resume_from_checkpoint PATH" in caplog.text
    assert checkpoints.find_resume_checkpoint(str(old), layout) == old


def test_a_named_incomplete_checkpoint_is_refused(tmp_path):
    layout = RunLayout(tmp_path, "dog")
    layout.checkpoint(3).mkdir(parents=True)
    with pytest.raises(UserError, match="cannot be used"):
        checkpoints.find_resume_checkpoint(str(layout.checkpoint(3)), layout)
    with pytest.raises(UserError, match="no such folder"):
        checkpoints.find_resume_checkpoint("checkpoint-9", layout)


def test_a_failed_save_leaves_nothing_half_written_and_the_previous_checkpoint_intact(tmp_path):
    layout = RunLayout(tmp_path, "dog")
    previous = write_checkpoint(layout.checkpoints, 2)

    with pytest.raises(OSError, match="No space left on device"), atomic_folder(layout.checkpoint(4)) as tmp:
        (tmp / "optimizer.bin").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in layout.checkpoints.iterdir()) == ["checkpoint-2"]
    assert checkpoints.find_resume_checkpoint("latest", layout) == previous


def test_incompatible_settings_are_named(tmp_path):
    folder = write_checkpoint(tmp_path, 2, settings={"boft_block_num": 8, "pretrained_model_name_or_path": "a"})
    with pytest.raises(UserError) as error:
        checkpoints.read_checkpoint(folder, {"boft_block_num": 4, "pretrained_model_name_or_path": "a"})
    assert "--boft_block_num: checkpoint 8, now 4" in str(error.value)
    assert checkpoints.read_checkpoint(folder, {"boft_block_num": 8}).global_step == 2


def test_compatibility_settings_cover_shape_targets_model_and_the_scaled_learning_rate():
    config = make_config(num_processes=2, scale_lr=True, learning_rate=1e-4, train_batch_size=2)
    settings = checkpoints.compatibility_settings(config, StableDiffusion())
    assert settings["unet_target_modules"] == list(StableDiffusion.denoiser_target_modules)
    assert settings["text_encoder_target_modules"] == [] and settings["learning_rate"] == 4e-4
    assert settings["num_processes"] == 2 and set(checkpoints.COMPATIBILITY_SETTINGS) == set(settings)


def test_a_disk_that_fills_while_an_adapter_is_saved_leaves_the_previous_files(tmp_path):
    from safetensors import SafetensorError

    layout = RunLayout(tmp_path, "dog")

    class Adapter:
        def __init__(self, fail):
            self.fail = fail

        def save_pretrained(self, folder, selected_adapters, state_dict):
            (folder / selected_adapters[0]).mkdir(parents=True)
            (folder / selected_adapters[0] / "adapter_model.safetensors").write_bytes(b"half" if self.fail else b"w")
            if self.fail:
                raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    checkpoints.save_adapters({"unet": Adapter(fail=False)}, layout, 2)
    with pytest.raises(UserError, match=r"could not write .*unet/4/dog: .*No space left on device"):
        checkpoints.save_adapters({"unet": Adapter(fail=True)}, layout, 4)
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == ["2"]  # no step 4, no hidden partial folder
    assert (layout.adapter("unet", 2) / "adapter_model.safetensors").read_bytes() == b"w"


def test_saved_folders_get_the_permissions_of_the_umask(tmp_path):
    import stat

    from safetensors.torch import save_file

    with atomic_folder(tmp_path / "adapter") as folder:
        save_file({"w": torch.zeros(1)}, folder / "adapter_model.safetensors")
        assert stat.S_IMODE((folder / "adapter_model.safetensors").stat().st_mode) == 0o600  # safetensors' own mode
    umask = atomic._current_umask()
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "adapter" / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~umask


def test_a_step_whose_adapters_could_not_be_written_leaves_no_checkpoint_to_resume_from(monkeypatch):
    """Disk full while the adapters of step 3 are saved: no checkpoint-3 may exist, else a resume would continue at
    step 4 and step 3's adapters would never be written."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    import train_dreambooth

    saved_states = []
    monkeypatch.setattr(checkpoints, "save_checkpoint", lambda *args: saved_states.append(args))

    def disk_full():
        raise UserError("could not write unet/3/dog: No space left on device")

    run = SimpleNamespace(last_checkpoint=2, state=SimpleNamespace(global_step=3), timer=lambda _: nullcontext(),
                          save_adapters=disk_full)
    with pytest.raises(UserError, match="No space left"):
        train_dreambooth.DreamBoothRun.save_checkpoint(run)
    assert saved_states == [] and run.last_checkpoint == 2
