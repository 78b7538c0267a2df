
import numpy as np
import torch
from PIL import Image

from tests.helpers import make_config
from utils.families.stable_diffusion import StableDiffusion
from utils.run.class_images import (
    class_image_name,
    generate_class_images,
    generate_indices,
    generation_dtype,
    missing_class_indices,
    share_of,
)


def test_missing_indices_count_user_images_and_skip_taken_names(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "mine.png")
    Image.new("RGB", (8, 8)).save(tmp_path / class_image_name(1))
    (tmp_path / "notes.txt").write_text("not an image")
    assert missing_class_indices(tmp_path, 4) == [0, 2]
    assert missing_class_indices(tmp_path, 2) == []


def test_fp16_on_cpu_falls_back_with_a_warning(recwarn):
    assert generation_dtype("fp16", "cpu") == torch.float32
    assert "not supported on a CPU" in str(recwarn.pop().message)
    assert generation_dtype(None, "cpu") == torch.float32
    assert generation_dtype(None, "cuda") == torch.float16
    assert generation_dtype("bf16", "cpu") == torch.bfloat16


class FakeAccelerator:
    """One process on its own: the barriers are no-ops."""

    def __init__(self, index, count):
        self.process_index, self.num_processes = index, count
        self.is_main_process = self.is_local_main_process = index == 0
        self.device = torch.device("cpu")

    def wait_for_everyone(self):
        pass


def test_processes_split_the_work_and_reruns_generate_nothing(tmp_path, tiny_model):
    args = make_config(pretrained_model_name_or_path=tiny_model, with_prior_preservation=True, resolution=32,
                       class_data_dir=tmp_path / "class", num_class_images=5, class_prompt="a photo of toy",
                       sample_batch_size=2, class_inference_steps=3, class_scheduler="dpm")
    family = StableDiffusion()
    (tmp_path / "class").mkdir()
    plan = missing_class_indices(args.class_data_dir, 5)
    shares = [share_of(plan, rank, 2) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == plan == list(range(5))
    for share in shares:  # what each of two processes does after both planned
        generate_indices(args, family, share, torch.device("cpu"), show_progress=False)
    names = sorted(p.name for p in (tmp_path / "class").iterdir())
    assert names == [class_image_name(i) for i in range(5)]
    assert generate_class_images(args, family, FakeAccelerator(0, 1)) == 0
    # The same index gives the same image on a rerun: delete one and regenerate it.
    first = np.asarray(Image.open(tmp_path / "class" / class_image_name(3)))
    (tmp_path / "class" / class_image_name(3)).unlink()
    assert generate_class_images(args, family, FakeAccelerator(0, 1)) == 1
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "class" / class_image_name(3))))
