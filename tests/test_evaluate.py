"""The DreamBooth metrics on tiny random DINO and CLIP models loaded through from_pretrained; generate and score."""

import csv
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.helpers import REPO, assert_quiet, cli_env
from utils.evaluate import Embedder, mean_cosine, score_folder, score_images


@pytest.fixture(scope="module")
def embedder(metric_models):
    return Embedder(*map(str, metric_models), device="cpu")


def photos(count, seed):
    generator = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(48, 48, 3, generator=generator) * 255).byte().numpy()) for _ in range(count)]


def generated_folder(root, prompt_images):
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.txt").write_text("\n".join(prompt_images) + "\n")
    for index, images in enumerate(prompt_images.values()):
        (root / f"{index:03d}").mkdir()
        for k, image in enumerate(images):
            image.save(root / f"{index:03d}" / f"{k:02d}.png")
    return root


def test_identical_images_score_one(embedder):
    image = photos(1, 0)
    rows = score_images(embedder, image, {"a qwe toy": image})
    assert rows[0]["dino"] == pytest.approx(1, abs=1e-5) and rows[0]["clip_i"] == pytest.approx(1, abs=1e-5)
    copies = image * 3
    rows = score_images(embedder, copies, {"a qwe toy": copies})
    assert rows[-1]["dino"] == pytest.approx(1, abs=1e-5) and rows[-1]["clip_i"] == pytest.approx(1, abs=1e-5)


def test_scores_are_symmetric_and_below_one_for_different_images(embedder):
    a, b = photos(3, 1), photos(2, 2)
    forward = score_images(embedder, a, {"p": b})[0]
    backward = score_images(embedder, b, {"p": a})[0]
    assert forward["dino"] == pytest.approx(backward["dino"], abs=1e-6)
    assert forward["clip_i"] == pytest.approx(backward["clip_i"], abs=1e-6)
    assert forward["dino"] < 0.9999 and mean_cosine(embedder.clip_images(a), embedder.clip_images(b)) < 0.9999


def test_results_do_not_depend_on_file_order(embedder, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    for k, image in enumerate(photos(3, 3)):
        image.save(real / f"{k}.png")
    folder = generated_folder(tmp_path / "gen", {"a qwe toy": photos(3, 4), "a red qwe toy": photos(2, 5)})
    first = score_folder(embedder, real, folder)
    for path in (real / "0.png", folder / "000" / "00.png"):  # the first file sorts last now
        path.rename(path.with_name("z" + path.name))
    second = score_folder(embedder, real, folder)
    for a, b in zip(first, second):
        assert all(a[m] == pytest.approx(b[m], abs=1e-6) for m in ("dino", "clip_i", "clip_t"))


def test_long_prompts_are_truncated_as_clip_requires(embedder):
    long_prompt = "a qwe toy " + "on a very long road " * 60
    features = embedder.clip_texts([long_prompt])
    assert features.shape[0] == 1 and torch.isfinite(features).all()
    ids = embedder.clip_processor.tokenizer(long_prompt, truncation=True, max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(embedder.clip.get_text_features(input_ids=ids).pooler_output, dim=-1)
    assert torch.allclose(features, expected, atol=1e-5)


def evaluate(*argv):
    return subprocess.run([sys.executable, "-m", "utils.evaluate", *map(str, argv)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=600)


def evaluate_here(capsys, *argv):
    """utils.evaluate's main in this process (the same code as `python -m utils.evaluate` without its imports)."""
    from utils.evaluate import main

    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


@pytest.mark.e2e
def test_generate_then_score_end_to_end(trained, tiny_model, subject, metric_models, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a qwe toy in the snow\na red qwe toy\n")
    common = ["--pretrained_model_name_or_path", tiny_model, "--output_dir", trained, "--adapter_name", "toy",
              "--num_images", 2, "--num_inference_steps", 2, "--resolution", 64]
    generated = evaluate("generate", *common, "--prompts_file", prompts, "--class_prompt", "a photo of toy")
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert_quiet(generated.stdout + generated.stderr)
    folder = trained / "eval" / "toy" / "3"  # the latest step
    assert (folder / "prompts.txt").read_text().splitlines() == ["a qwe toy in the snow", "a red qwe toy"]
    assert sorted(p.name for p in (folder / "001").iterdir()) == ["00.png", "01.png"]
    scored = evaluate_here(capsys, "score", "--instance_data_dir", subject, "--generated_dir", folder,
                           "--dino_model", metric_models[0], "--clip_model", metric_models[1])  # base images: recorded
    assert scored.returncode == 0, scored.stderr[-3000:]
    with open(folder / "scores.csv") as file:
        rows = list(csv.DictReader(file))
    assert [r["prompt"] for r in rows] == ["a qwe toy in the snow", "a red qwe toy", "overall"]
    assert all(-1 <= float(r["dino"]) <= 1 for r in rows)
    assert 0 < float(rows[-1]["prior_drift"]) <= 1 and rows[0]["prior_drift"] == ""  # one number, for the folder
    assert "Prior drift" in (folder / "scores.md").read_text() and "| overall |" in scored.stdout
    assert Image.open(folder / "grid.png").size == (3 * 128, 3 * 128)  # real row + two prompt rows


@pytest.mark.e2e
def test_every_checkpoint_scores_each_step_and_plots(trained, tiny_model, subject, metric_models, tmp_path, capsys):
    shutil.rmtree(trained / "eval", ignore_errors=True)
    result = evaluate_here(capsys, "score", "--every_checkpoint", "--pretrained_model_name_or_path", tiny_model,
                      "--output_dir", trained, "--adapter_name", "toy", "--subject_index", 27,
                      "--num_images", 1, "--num_inference_steps", 2, "--resolution", 64,
                      "--instance_data_dir", subject, "--dino_model", metric_models[0], "--clip_model", metric_models[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2:" in result.stdout and "step 3:" in result.stdout
    assert len((trained / "eval" / "toy" / "2" / "prompts.txt").read_text().splitlines()) == 25
    assert Image.open(trained / "eval" / "toy" / "scores_by_step.png").size == (640, 400)


@pytest.mark.e2e
def test_each_subject_is_scored_against_its_own_class_and_its_current_images_only(trained, tiny_model, subject,
                                                                                 metric_models, tmp_path, capsys):
    from utils.evaluate import SETTINGS_FILE, read_settings

    out = tmp_path / "out"  # two subjects of different classes in one output folder, as the launcher's recipe has
    shutil.copytree(trained, out, ignore=shutil.ignore_patterns("eval"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a qwe thing on a table\n")
    models = ["--dino_model", metric_models[0], "--clip_model", metric_models[1]]

    def generate(run, class_prompt, images=2, steps=2):
        result = evaluate_here(capsys, "generate", "--pretrained_model_name_or_path", tiny_model, "--output_dir", out,
                               "--adapter_name", run, "--prompts_file", prompts, "--class_prompt", class_prompt,
                               "--num_images", images, "--num_inference_steps", steps, "--resolution", 64)
        assert result.returncode == 0, result.stderr[-3000:]
        return out / "eval" / run / "3" if run == "toy" else next((out / "eval" / run).iterdir())

    toy, teapot = generate("toy", "a photo of toy"), generate("teapot", "a photo of teapot")
    toy_base, teapot_base = ((folder / read_settings(folder)["reference"]).resolve() for folder in (toy, teapot))
    assert toy_base != teapot_base and toy_base.parent == teapot_base.parent == out / "eval" / "base" / "class"
    assert read_settings(toy_base)["class_prompt"] == "a photo of toy"
    assert read_settings(teapot_base)["class_prompt"] == "a photo of teapot"
    wrong = evaluate_here(capsys, "score", "--instance_data_dir", subject, "--generated_dir", teapot,
                          "--class_generated_dir", toy_base, *models)
    assert wrong.returncode == 2 and "class_prompt: 'a photo of toy' there, 'a photo of teapot' here" in wrong.stderr

    toy = generate("toy", "a photo of toy", images=1, steps=1)  # other settings: the step's folder is made anew
    assert sorted(p.name for p in (toy / "000").iterdir()) == ["00.png"] and (toy / SETTINGS_FILE).is_file()
    assert len(list((out / "eval" / "base" / "class").iterdir())) == 3  # and its base images are its own
    scored = evaluate_here(capsys, "score", "--instance_data_dir", subject, "--generated_dir", toy, *models)
    assert scored.returncode == 0 and "Prior drift" in (toy / "scores.md").read_text(), scored.stderr[-3000:]
    (toy / "000" / "01.png").write_bytes((toy / "000" / "00.png").read_bytes())  # an image not made with them
    stale = evaluate_here(capsys, "score", "--instance_data_dir", subject, "--generated_dir", toy, *models)
    assert stale.returncode == 2 and "files were added or removed after generating" in stale.stderr


def test_missing_inputs_are_clear_errors(tmp_path, subject, metric_models, capsys):
    from utils.evaluate import main  # in this process: it stops before loading a model

    for models, message in ((metric_models, "has no prompts.txt"), ((tmp_path / "nope",) * 2, "--dino_model")):
        with pytest.raises(SystemExit) as stop:
            main(["score", "--instance_data_dir", str(subject), "--generated_dir", str(tmp_path),
                  "--dino_model", str(models[0]), "--clip_model", str(models[1])])
        assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.e2e
def test_generate_refuses_a_missing_step_before_any_weight_loads(trained, tiny_model, monkeypatch, capsys):
    from utils.inference import BoftPipeline

    def loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapter's step was checked")

    monkeypatch.setattr(BoftPipeline, "from_pretrained", loading)
    result = evaluate_here(capsys, "generate", "--pretrained_model_name_or_path", tiny_model, "--output_dir", trained,
                           "--adapter_name", "toy", "--step", 999, "--subject_index", 27)
    assert result.returncode == 2 and "999" in result.stderr
