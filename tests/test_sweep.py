"""utils.sweep: every subject's scores into the paper's table (mean, spread, classes, published rows, missing
subjects, settings that differ), its CSV and its pictures; the command line on an output folder."""

import csv
import json
import subprocess
import sys

import pytest
from PIL import Image

from tests.helpers import REPO, cli_env
from utils.layout import RunLayout
from utils.sweep import PUBLISHED_SD15, Subject, parse_indices, read_scores, write_report

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def evaluated(out, run, step, scores, model=SD15, **settings):
    """An evaluation folder as utils.evaluate leaves it: settings.json, one image of the first prompt, scores.csv."""
    folder = RunLayout(out, run).evaluation(step)
    (folder / "000").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(folder / "000" / "00.png")
    record = {"model": model, "revision": None, "vae": None, "scheduler": "DDIMScheduler", "resolution": 512,
              "num_inference_steps": 50, "guidance_scale": 7.5, "seed": 0, "num_images": 4, **settings}
    (folder / "settings.json").write_text(json.dumps(record))
    rows = [["prompt", "dino", "clip_i", "clip_t", "prior_drift"], ["a qwe dog", "0.1", "0.1", "0.1", ""],
            ["overall", *(str(scores.get(m, "")) for m in ("dino", "clip_i", "clip_t", "prior_drift"))]]
    with open(folder / "scores.csv", "w", newline="") as file:
        csv.writer(file).writerows(rows)
    return folder


def subject(out, index, name, class_noun):
    return Subject(index, name, class_noun, f"{name}_boft_801", out)


def test_subject_indices_take_sbatchs_array_forms():
    assert parse_indices("0-29") == list(range(30))
    assert parse_indices("5,11") == [5, 11] and parse_indices("0-2,7%4") == [0, 1, 2, 7]
    for bad in ("a", "0-29:2", ""):
        with pytest.raises(ValueError, match="0-29"):
            parse_indices(bad)


def test_the_table_averages_over_subjects_lists_classes_missing_ones_and_the_papers_rows(tmp_path):
    out = tmp_path / "out"
    evaluated(out, "dog_boft_801", 400, {"dino": 0.6, "clip_i": 0.7, "clip_t": 0.2, "prior_drift": 0.9})
    evaluated(out, "dog_boft_801", 1010, {"dino": 0.7, "clip_i": 0.8, "clip_t": 0.3, "prior_drift": 0.8})
    evaluated(out, "dog2_boft_801", 1010, {"dino": 0.5, "clip_i": 0.6, "clip_t": 0.2, "prior_drift": 0.6})
    evaluated(out, "teapot_boft_801", 1010, {"dino": 0.9, "clip_i": 0.7, "clip_t": 0.25})  # no class prompt given
    (out / "unet" / "1010" / "can_boft_801").mkdir(parents=True)  # trained, never evaluated
    subjects = [read_scores(s, "latest") for s in (subject(out, 10, "dog", "dog"), subject(out, 11, "dog2", "dog"),
                                                   subject(out, 27, "teapot", "teapot"), subject(out, 4, "can", "can"),
                                                   subject(out, 5, "candle", "candle"))]
    assert subjects[0].step == 1010 and subjects[0].scores["dino"] == 0.7  # the newest scored step
    table = write_report(subjects, out / "sweep").read_text()
    assert "3 of 5 subjects scored" in table
    assert "| ours (BOFT) | 0.700 ± 0.200 | 0.700 ± 0.100 | 0.250 ± 0.050 | 0.700 ± 0.141 |" in table
    assert "| dog | 2 | 0.600 | 0.700 | 0.250 | 0.700 |" in table and "| teapot | 1 | 0.900 |" in table
    for name, row in PUBLISHED_SD15.items():
        assert f"| {name} | {row['dino']:.3f} | {row['clip_i']:.3f} |" in table
    assert "- 4 can (can_boft_801): trained, not scored" in table and "- 5 candle (candle_boft_801): not trained" in table
    assert "Not evaluated alike" not in table
    with open(out / "sweep" / "table.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [r["kind"] for r in rows] == ["subject"] * 5 + ["mean", "std", "class", "class"]
    assert rows[5]["subjects"] == "3" and rows[5]["dino"] == "0.700" and rows[6]["clip_i"] == "0.100"
    assert rows[3]["subjects"] == "0" and rows[3]["dino"] == ""  # a missing subject keeps its row, empty
    assert Image.open(out / "sweep" / "subjects.png").text["subjects"] == "dog,dog2,teapot"
    assert Image.open(out / "sweep" / "metrics.png").size == (720, 420)


def test_other_models_get_no_published_rows_and_differing_settings_are_named(tmp_path):
    out = tmp_path / "out"
    evaluated(out, "dog_boft_801", 10, {"dino": 0.5, "clip_i": 0.5, "clip_t": 0.2}, model="my/sdxl")
    evaluated(out, "cat_boft_801", 10, {"dino": 0.5, "clip_i": 0.5, "clip_t": 0.2}, model="my/sdxl", num_images=1)
    subjects = [read_scores(subject(out, 10, "dog", "dog"), "latest"), read_scores(subject(out, 6, "cat", "cat"), 10)]
    table = write_report(subjects, out / "sweep").read_text()
    assert "(OFT paper)" not in table and "evaluated with my/sdxl" in table
    assert "- num_images: 4 for dog; 1 for cat" in table
    assert read_scores(subject(out, 10, "dog", "dog"), 20).missing == "no scores at step 20"


@pytest.mark.e2e
def test_the_command_refuses_an_unscored_folder_and_tabulates_a_scored_one(tmp_path):
    out = tmp_path / "out"

    def sweep(*argv):
        return subprocess.run([sys.executable, "-m", "utils.sweep", *argv], cwd=REPO, capture_output=True, text=True,
                              env=cli_env(OUTPUT_DIR=str(out)), timeout=120)

    empty = sweep("--subjects", "10,27")
    assert empty.returncode == 2 and "none of the 2 subject(s) has scores" in empty.stderr
    assert not (out / "sweep").exists()
    evaluated(out, "dog_boft_801", 1010, {"dino": 0.6, "clip_i": 0.7, "clip_t": 0.2, "prior_drift": 0.9})
    done = sweep("--subjects", "10,27")
    assert done.returncode == 0, done.stderr
    assert "| 10 | dog | dog | 1010 |" in done.stdout and "- 27 teapot (teapot_boft_801): not trained" in done.stdout
    assert sweep("--subjects", "31").returncode == 2 and sweep("--subjects", "x").returncode == 2
