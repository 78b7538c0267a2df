"""The paper's table of a sweep over the DreamBooth subjects: every subject's scores gathered, averaged, pictured.

    python -m utils.sweep [--subjects 0-29] [--output_dir DIR] [--step latest]

Each subject's run name, class and output folder come from the launcher (`./train_dreambooth.sh --subject IDX`, with
the environment that trained it: MODEL_NAME, OUTPUT_DIR, BLOCK_*), its scores from the `overall` row of
utils.evaluate's `eval/{run}/{step}/scores.csv` (the newest scored step unless --step says which). Writes, whole,
OUTPUT_DIR/sweep/:
  table.md      a row per subject; mean and standard deviation over subjects; a row per class noun; the published
                rows beside ours where the model is theirs (SD 1.5); the subjects missing and why; differing settings
  table.csv     the same numbers, one row each (kind: subject, mean, std, class)
  subjects.png  one generated image per subject (its first prompt's first image), named
  metrics.png   a bar chart of the metrics, ours (mean, with the spread over subjects) beside the published rows
Exit status 2 (nothing written) when no subject has scores yet.
"""

import argparse
import csv
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

METRICS = ("dino", "clip_i", "clip_t", "prior_drift")
LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "prior_drift": "prior drift"}
# OFT paper (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"), Table 1: SD 1.5, the 30
# subjects, 25 prompts, 4 images a prompt. Real images: DINO / CLIP-I between photos of the same subject.
PUBLISHED_SD15 = {
    "DreamBooth (OFT paper)": {"dino": 0.614, "clip_i": 0.778, "clip_t": 0.239},
    "LoRA (OFT paper)": {"dino": 0.613, "clip_i": 0.765, "clip_t": 0.237},
    "OFT (OFT paper)": {"dino": 0.632, "clip_i": 0.785, "clip_t": 0.237},
    "real images (OFT paper)": {"dino": 0.703, "clip_i": 0.864},
}
SD15_MODELS = re.compile(r"(^|/)stable-diffusion-v1-5$", re.IGNORECASE)
# What the images depend on: subjects evaluated with different values are not comparable, and the table says so.
COMPARED_SETTINGS = ("model", "revision", "vae", "scheduler", "resolution", "num_inference_steps", "guidance_scale",
                     "seed", "num_images")
TILE = 160


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m utils.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", default="0-29", help="launcher indices, as sbatch's --array: 0-29, 5,11, 0-3,7")
    parser.add_argument("--output_dir", help="the runs' output folder (default: the launcher's, OUTPUT_DIR)")
    parser.add_argument("--step", default="latest", help="the evaluated step to read: a number, or latest")
    return parser


def parse_indices(text: str) -> list[int]:
    """sbatch's --array forms without the throttle: '0-29', '5,11', '0-3,7' (a ':step' is refused)."""
    indices = []
    for part in text.split("%")[0].split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not match:
            raise ValueError(f"--subjects {text!r}: give indices as 0-29, 5,11 or 0-3,7")
        first, last = int(match[1]), int(match[2] or match[1])
        indices += range(first, last + 1)
    return sorted(set(indices))


@dataclass
class Subject:
    index: int
    name: str
    class_noun: str
    run: str
    output_dir: Path
    step: int | None = None
    scores: dict | None = None
    settings: dict | None = None
    image: Path | None = None
    missing: str | None = None  # why there are no scores


def subject_of(index: int) -> Subject:
    """The launcher's subject `index`, as the launcher names it in this environment."""
    from utils.evaluate import launcher_answer

    name, class_noun, run, _model, output_dir, _photos = launcher_answer("--subject", index).rstrip("\n").split("\t")
    return Subject(index, name, class_noun, run, Path(output_dir))


def read_scores(subject: Subject, step: str) -> Subject:
    """Fill in the subject's scores from its evaluation folder, or say why there are none."""
    from utils.evaluate import prompt_folder, read_settings
    from utils.layout import RunLayout

    layout = RunLayout(subject.output_dir, subject.run)
    evaluated = layout.evaluated_steps()
    scored = [s for s in evaluated if (layout.evaluation(s) / "scores.csv").is_file()]
    if str(step) != "latest":
        scored = [s for s in scored if str(s) == str(step)]
    if not scored:
        trained = bool(evaluated or layout.adapter_steps())
        subject.missing = (f"no scores at step {step}" if trained and str(step) != "latest" else
                           "trained, not scored" if trained else "not trained")
        return subject
    subject.step = scored[-1]
    folder = layout.evaluation(subject.step)
    with open(folder / "scores.csv", newline="") as file:
        overall = next(row for row in csv.DictReader(file) if row["prompt"] == "overall")
    subject.scores = {m: float(overall[m]) for m in METRICS if overall.get(m)}
    subject.settings = read_settings(folder) or {}
    subject.image = next(iter(sorted(prompt_folder(folder, 0).glob("*.png"))), None)
    return subject


def summarize(scored: list[Subject]) -> dict:
    """{metric: (mean, std, n)} over the subjects that have that metric."""
    summary = {}
    for metric in METRICS:
        values = [s.scores[metric] for s in scored if metric in s.scores]
        if values:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0  # the sample's; none for one subject
            summary[metric] = (statistics.fmean(values), spread, len(values))
    return summary


def by_class(scored: list[Subject]) -> dict:
    classes = {}
    for s in scored:
        classes.setdefault(s.class_noun, []).append(s)
    return {noun: summarize(members) | {"subjects": len(members)} for noun, members in sorted(classes.items())}


def differing_settings(scored: list[Subject]) -> dict:
    """{setting: {value: [subject names]}} for each setting the subjects were not evaluated alike in."""
    differing = {}
    for key in COMPARED_SETTINGS:
        values = {}
        for s in scored:
            values.setdefault(json.dumps(s.settings.get(key)), []).append(s.name)
        if len(values) > 1:
            differing[key] = values
    return differing


def published_rows(scored: list[Subject]) -> dict:
    """The published rows that match the model every subject was evaluated with (none for another model)."""
    models = {s.settings.get("model") or "" for s in scored}
    return PUBLISHED_SD15 if len(models) == 1 and SD15_MODELS.search(models.pop()) else {}


def _cell(value) -> str:
    return "" if value is None else f"{value:.3f}"


def write_markdown(path: Path, subjects: list[Subject], summary, classes, published, differing) -> None:
    scored = [s for s in subjects if s.scores]
    header = "| " + " | ".join(LABELS[m] for m in METRICS) + " |"
    rule = "|---" * len(METRICS) + "|"
    lines = [f"# DreamBooth sweep: {len(scored)} of {len(subjects)} subjects scored", "",
             "| # | subject | class | step " + header, "|---|---|---|---" + rule]
    lines += [f"| {s.index} | {s.name} | {s.class_noun} | {s.step} | "
              + " | ".join(_cell(s.scores.get(m)) for m in METRICS) + " |" for s in scored]
    lines += ["", f"Over the {len(scored)} subjects (mean ± standard deviation):", "", "| rows " + header, "|---" + rule]
    lines.append("| ours (BOFT) | " + " | ".join(
        f"{summary[m][0]:.3f} ± {summary[m][1]:.3f}" if m in summary else "" for m in METRICS) + " |")
    lines += [f"| {name} | " + " | ".join(_cell(row.get(m)) for m in METRICS) + " |" for name, row in published.items()]
    if not published:
        lines += ["", "No published rows: the papers' numbers are for SD 1.5, and these subjects were evaluated with "
                  + ", ".join(sorted({str(s.settings.get('model')) for s in scored})) + "."]
    lines += ["", "By class noun:", "", "| class | subjects " + header, "|---|---" + rule]
    lines += [f"| {noun} | {row['subjects']} | " + " | ".join(_cell(row[m][0]) if m in row else "" for m in METRICS)
              + " |" for noun, row in classes.items()]
    missing = [s for s in subjects if not s.scores]
    lines += ["", f"Missing: {len(missing)} subject(s)" + (":" if missing else ".")]
    lines += [f"- {s.index} {s.name} ({s.run}): {s.missing}" for s in missing]
    if differing:
        lines += ["", "Not evaluated alike (the scores are not comparable across these):"]
        lines += [f"- {key}: " + "; ".join(f"{value} for {', '.join(names)}" for value, names in values.items())
                  for key, values in differing.items()]
    path.write_text("\n".join(lines) + "\n")


def write_csv(path: Path, subjects: list[Subject], summary, classes) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["kind", "index", "subject", "class", "run", "step", "subjects", *METRICS])
        for s in subjects:
            scored = bool(s.scores)  # as the count below: a subject without any metric is not scored
            writer.writerow(["subject", s.index, s.name, s.class_noun, s.run, s.step if scored else "", int(scored),
                             *(_cell((s.scores or {}).get(m)) for m in METRICS)])
        count = sum(1 for s in subjects if s.scores)
        for kind, position in (("mean", 0), ("std", 1)):
            writer.writerow([kind, "", "", "", "", "", count,
                             *(_cell(summary[m][position]) if m in summary else "" for m in METRICS)])
        for noun, row in classes.items():
            writer.writerow(["class", "", "", noun, "", "", row["subjects"],
                             *(_cell(row[m][0]) if m in row else "" for m in METRICS)])


def write_subject_grid(path: Path, scored: list[Subject]) -> None:
    """One generated image per subject with its name beneath; the names are also in the PNG's "subjects" text."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    from utils.images import load_rgb

    columns = min(6, len(scored))
    rows = math.ceil(len(scored) / columns)
    label = 18
    grid = Image.new("RGB", (columns * TILE, rows * (TILE + label)), "white")
    draw = ImageDraw.Draw(grid)
    for k, s in enumerate(scored):
        x, y = (k % columns) * TILE, (k // columns) * (TILE + label)
        if s.image is not None:
            grid.paste(load_rgb(s.image).resize((TILE, TILE)), (x, y))
        draw.text((x + 4, y + TILE + 3), f"{s.index} {s.name}", fill="black")
    info = PngInfo()
    info.add_text("subjects", ",".join(s.name for s in scored))
    grid.save(path, pnginfo=info)


def write_bar_chart(path: Path, summary: dict, published: dict) -> None:
    """Grouped bars per metric: ours (mean, a line for ± one standard deviation), then each published row."""
    from PIL import Image, ImageDraw

    series = [("ours (BOFT)", {m: v[0] for m, v in summary.items()}), *published.items()]
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#7f7f7f"]
    width, height, margin, bar = 720, 420, 50, 18
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    base = height - margin

    def y(value):
        return base - (height - 2 * margin) * max(0.0, min(1.0, value))

    draw.line([(margin, base), (width - margin, base)], fill="black")
    draw.line([(margin, margin), (margin, base)], fill="black")
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        draw.text((8, y(tick) - 6), f"{tick:.2f}", fill="black")
    group = (width - 2 * margin) / len(METRICS)
    for g, metric in enumerate(METRICS):
        left = margin + g * group + (group - bar * len(series)) / 2
        for k, (_name, values) in enumerate(series):
            if metric not in values:
                continue
            x = left + k * bar
            draw.rectangle([x, y(values[metric]), x + bar - 3, base], fill=colors[k % len(colors)])
            if k == 0 and metric in summary:  # the spread over subjects
                mean, spread, _ = summary[metric]
                centre = x + (bar - 3) / 2
                draw.line([(centre, y(mean - spread)), (centre, y(mean + spread))], fill="black", width=2)
        draw.text((margin + g * group + group / 2 - 25, base + 8), LABELS[metric], fill="black")
    for k, (name, _values) in enumerate(series):
        draw.rectangle([width - 230, 12 + 14 * k, width - 220, 22 + 14 * k], fill=colors[k % len(colors)])
        draw.text((width - 214, 10 + 14 * k), name, fill="black")
    draw.text((margin, 12), "DreamBooth metrics over the subjects", fill="black")
    image.save(path)


def write_report(subjects: list[Subject], folder: Path) -> Path:
    """Every file of the table, written whole into `folder` (replacing an earlier table)."""
    from utils.atomic import atomic_folder

    scored = [s for s in subjects if s.scores]
    summary, classes = summarize(scored), by_class(scored)
    published = published_rows(scored)
    with atomic_folder(folder) as partial:
        write_markdown(partial / "table.md", subjects, summary, classes, published, differing_settings(scored))
        write_csv(partial / "table.csv", subjects, summary, classes)
        write_subject_grid(partial / "subjects.png", scored)
        write_bar_chart(partial / "metrics.png", summary, published)
    return folder / "table.md"


def main(argv=None) -> None:
    from utils.errors import USAGE_EXIT_CODE, UserError
    from utils.layout import sweep_folder

    args = build_parser().parse_args(argv)
    try:
        subjects = [subject_of(index) for index in parse_indices(args.subjects)]
    except (ValueError, UserError) as error:
        print(f"utils.sweep: error: {error}", file=sys.stderr)
        raise SystemExit(USAGE_EXIT_CODE) from None
    for subject in subjects:
        if args.output_dir:
            subject.output_dir = Path(args.output_dir)
        read_scores(subject, args.step)
    if not any(s.scores for s in subjects):
        print(f"utils.sweep: error: none of the {len(subjects)} subject(s) has scores in {subjects[0].output_dir}/eval "
              "(train and evaluate them first: slurm/sweep.sh, or utils.evaluate generate and score)", file=sys.stderr)
        raise SystemExit(USAGE_EXIT_CODE)
    table = write_report(subjects, sweep_folder(subjects[0].output_dir))
    print(table.read_text())
    print(f"written: {table.parent}/ (table.md, table.csv, subjects.png, metrics.png)")


if __name__ == "__main__":
    main()
