"""The DreamBooth metrics: DINO, CLIP-I and CLIP-T, plus a prior-drift score, as the DreamBooth and OFT papers use.

    python -m utils.evaluate generate --pretrained_model_name_or_path M --output_dir OUT --adapter_name NAME \\
        [--step N|latest] [--subject_index IDX | --prompts_file F] [--num_images 4] [--class_prompt "a photo of dog"]
    python -m utils.evaluate score --instance_data_dir REAL --generated_dir OUT/eval/NAME/1000 [--class_generated_dir B]
    python -m utils.evaluate score --every_checkpoint ...generate's flags... --instance_data_dir REAL

A generated folder holds prompts.txt (one prompt a line) and one sub-folder per prompt named by its zero-based line
number in three digits (000, 001, ...) with the images; `generate` writes it, `score` reads it, so images from any
tool can be scored. `generate --class_prompt` also writes class/ (the adapter's images of the class prompt) and the
base model's images of the same prompt and seeds in OUT/eval/base/class/{key}/, one set per class prompt and
settings (model, revision, VAE, scheduler, resolution, steps, guidance, seed, count): CLIP-I between the two is the
prior-drift score. `generate` replaces a step's folder whole and records its settings in settings.json; `score`
takes only images those settings made, and the base set they name (or one given with matching settings).
`score` writes GEN/scores.csv (a row per prompt, then `overall` with the prior drift when measured), GEN/scores.md
and GEN/grid.png.
"""

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from utils.checks import DTYPE_NAMES, VAE_HELP

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m utils.evaluate", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate the evaluation images of a trained adapter")
    score = commands.add_parser("score", help="score a generated folder (or every checkpoint) against real photos")
    for sub in (gen, score):
        sub.add_argument("--pretrained_model_name_or_path")
        sub.add_argument("--revision", default=None)
        sub.add_argument("--pretrained_vae_model_name_or_path", default=None, help=VAE_HELP)
        sub.add_argument("--output_dir", help="the training run's --output_dir")
        sub.add_argument("--adapter_name")
        sub.add_argument("--step", default="latest")
        prompts = sub.add_mutually_exclusive_group()
        prompts.add_argument("--subject_index", type=int, help="the launcher's subject index: its 25 prompts")
        prompts.add_argument("--prompts_file", help="one prompt a line")
        sub.add_argument("--class_prompt", help='e.g. "a photo of dog": also generate for the prior-drift score')
        sub.add_argument("--num_images", type=int, default=4, help="images per prompt (the papers use 4)")
        sub.add_argument("--num_inference_steps", type=int, default=50)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--resolution", type=int, default=None)
        sub.add_argument("--batch_size", type=int, default=4)
        sub.add_argument("--device", default=None)
        sub.add_argument("--dtype", default=None, choices=DTYPE_NAMES)
    score.add_argument("--instance_data_dir", required=True, help="the real photos of the subject")
    score.add_argument("--generated_dir", help="a generated folder (prompts.txt, 000/, ...)")
    score.add_argument("--class_generated_dir", help="the base model's class-prompt images, for prior drift")
    score.add_argument("--every_checkpoint", action="store_true", help="generate and score every saved step")
    score.add_argument("--identifier", default="qwe", help="dropped from prompts for CLIP-T")
    score.add_argument("--dino_model", default=DEFAULT_DINO)
    score.add_argument("--clip_model", default=DEFAULT_CLIP)
    return parser


if __name__ == "__main__":  # --help and usage mistakes answer before torch and the models' libraries load
    ARGS = build_parser().parse_args()

# The rest is imported once the command line parses.
import torch

from utils.atomic import atomic_folder
from utils.images import list_images, load_rgb
from utils.boft import peft_seam
from utils.errors import USAGE_EXIT_CODE, UserError
from utils.layout import RunLayout

REPO = Path(__file__).resolve().parents[1]
METRICS = ("dino", "clip_i", "clip_t")
THUMBNAIL = 128
SETTINGS_FILE = "settings.json"
# What makes the base model's class images: a reference set is shared only by evaluations that agree on all of it.
REFERENCE_SETTINGS = ("model", "revision", "vae", "scheduler", "resolution", "num_inference_steps", "guidance_scale",
                      "seed", "num_images", "class_prompt")


def launcher_answer(option: str, index: int) -> str:
    """What `./train_dreambooth.sh --prompts|--subject INDEX` prints: the launcher's table is the one source of the
    subjects, their classes, prompts and run names."""
    result = subprocess.run(["bash", str(REPO / "train_dreambooth.sh"), option, str(index)], capture_output=True,
                            text=True)
    if result.returncode:
        raise UserError(f"subject {index} is not a DreamBooth subject of the launcher's table (0-29)")
    return result.stdout


def subject_prompts(index: int) -> list[str]:
    """The 25 prompts the launcher validates subject `index` on."""
    return launcher_answer("--prompts", index).strip().splitlines()


def read_prompts(folder) -> list[str]:
    path = Path(folder, "prompts.txt")
    if not path.is_file():
        raise UserError(f"{folder} has no prompts.txt: a generated folder holds prompts.txt and 000/, 001/, ...")
    return [line for line in path.read_text().splitlines() if line.strip()]


def prompt_folder(root, index: int) -> Path:
    return Path(root, f"{index:03d}")


# --- embeddings --------------------------------------------------------------------------------------------------


class Embedder:
    """Unit-norm image embeddings of DINO (the CLS token) and CLIP, and CLIP text embeddings."""

    def __init__(self, dino_model=DEFAULT_DINO, clip_model=DEFAULT_CLIP, device=None):
        from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.dino_processor = AutoImageProcessor.from_pretrained(dino_model)
            self.dino = AutoModel.from_pretrained(dino_model).to(self.device).eval()
            self.clip_processor = CLIPProcessor.from_pretrained(clip_model)
            self.clip = CLIPModel.from_pretrained(clip_model).to(self.device).eval()
        except OSError as error:
            raise UserError(f"cannot load the metric models ({error}); pass local folders with --dino_model and "
                            "--clip_model, or download them once with network access") from None

    @torch.no_grad()
    def dino_images(self, images) -> torch.Tensor:
        inputs = self.dino_processor(images=images, return_tensors="pt").to(self.device)
        cls = self.dino(**inputs).last_hidden_state[:, 0]
        return torch.nn.functional.normalize(cls.float(), dim=-1)

    @torch.no_grad()
    def clip_images(self, images) -> torch.Tensor:
        inputs = self.clip_processor(images=images, return_tensors="pt").to(self.device)
        return torch.nn.functional.normalize(_features(self.clip.get_image_features(**inputs)).float(), dim=-1)

    @torch.no_grad()
    def clip_texts(self, texts) -> torch.Tensor:
        inputs = self.clip_processor(text=texts, return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.clip.config.text_config.max_position_embeddings).to(self.device)
        return torch.nn.functional.normalize(_features(self.clip.get_text_features(**inputs)).float(), dim=-1)


def _features(output):
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of rows of two unit-norm sets (order-free, symmetric)."""
    return float((a @ b.T).mean())


# --- scoring -----------------------------------------------------------------------------------------------------


def load_images(paths):
    return [load_rgb(p) for p in paths]


def score_images(embedder, real, generated: dict, identifier="qwe") -> list[dict]:
    """Rows of prompt and scores for {prompt: images} against the real photos, then the `overall` row."""
    real_dino, real_clip = embedder.dino_images(real), embedder.clip_images(real)
    rows = []
    for prompt, images in generated.items():
        clip = embedder.clip_images(images)
        text = " ".join(word for word in prompt.split() if word != identifier)
        rows.append({
            "prompt": prompt,
            "dino": mean_cosine(embedder.dino_images(images), real_dino),
            "clip_i": mean_cosine(clip, real_clip),
            "clip_t": mean_cosine(clip, embedder.clip_texts([text])),
        })
    return rows + [{"prompt": "overall", **{m: sum(r[m] for r in rows) / len(rows) for m in METRICS}}]


def score_validation(embedder, images, captions, args) -> dict:
    """Overall scores of a run's validation images (captions are their prompts) against its instance photos; the
    identifier dropped for CLIP-T is the instance prompt's word missing from the class prompt."""
    by_prompt = {prompt: [i for i, c in zip(images, captions) if c == prompt] for prompt in dict.fromkeys(captions)}
    real = [load_rgb(path, args.resolution) for path in list_images(args.instance_data_dir)]
    extra_words = [w for w in args.instance_prompt.split() if w not in (args.class_prompt or "").split()]
    identifier = extra_words[0] if args.class_prompt and extra_words else None
    overall = score_images(embedder, real, by_prompt, identifier)[-1]
    return {f"eval/{metric}": overall[metric] for metric in METRICS}


def read_settings(folder) -> dict | None:
    """The settings `generate` recorded in a folder; None for a folder made by another tool."""
    path = Path(folder, SETTINGS_FILE)
    return json.loads(path.read_text()) if path.is_file() else None


def expected_names(record) -> set[str]:
    return {f"{k:02d}.png" for k in range(record["num_images"])}


def check_made_with(folder, record) -> None:
    """Every image folder of a generated folder holds exactly the images its recorded settings made."""
    for sub in [prompt_folder(folder, i) for i in range(len(record["prompts"]))] + (
            [Path(folder, "class")] if record.get("class_prompt") else []):
        names = {p.name for p in list_images(sub)}
        if names != expected_names(record):
            raise UserError(f"{sub} holds {', '.join(sorted(names)) or 'no images'}, not the {record['num_images']} "
                            f"image(s) its {SETTINGS_FILE} records: files were added or removed after generating. "
                            "Generate it again (utils.evaluate generate replaces the folder whole)")


def reference_of(generated_dir, record, class_generated_dir=None) -> Path | None:
    """The base model's class images to measure prior drift against: the given folder, after checking that its
    settings are the generated folder's, else the one `generate` recorded; None when there is none."""
    if class_generated_dir is None:
        if not (record and record.get("reference")):
            return None
        return Path(generated_dir, record["reference"])
    base = read_settings(class_generated_dir)
    if record and base:
        differing = [k for k in REFERENCE_SETTINGS if record.get(k) != base.get(k)]
        if differing:
            raise UserError(f"--class_generated_dir {class_generated_dir} was made with other settings than "
                            f"{generated_dir} (" + "; ".join(f"{k}: {base.get(k)!r} there, {record.get(k)!r} here"
                                                             for k in differing)
                            + "). Leave the flag out to use the base images generate made for it")
    return Path(class_generated_dir)


def score_folder(embedder, real_dir, generated_dir, identifier="qwe", class_generated_dir=None) -> list[dict]:
    """score_images over a generated folder; with base class images, `prior_drift` joins the overall row."""
    record = read_settings(generated_dir)
    if record:
        check_made_with(generated_dir, record)
    real = load_images(require(list_images(real_dir), real_dir))
    generated = {}
    for index, prompt in enumerate(read_prompts(generated_dir)):
        folder = prompt_folder(generated_dir, index)
        generated[prompt] = load_images(require(list_images(folder), folder))
    rows = score_images(embedder, real, generated, identifier)
    if (reference := reference_of(generated_dir, record, class_generated_dir)) is not None:
        rows[-1]["prior_drift"] = prior_drift(embedder, Path(generated_dir, "class"), reference)
    return rows


def prior_drift(embedder, adapter_dir, base_dir) -> float:
    """CLIP-I between the adapter's and the base model's class-prompt images of the same seeds (1: no drift)."""
    names = sorted(p.name for p in list_images(base_dir))
    pairs = [(Path(adapter_dir, n), Path(base_dir, n)) for n in names if Path(adapter_dir, n).is_file()]
    if not pairs:
        raise UserError(f"no images with the same names in {adapter_dir} and {base_dir}")
    adapter = embedder.clip_images(load_images([a for a, _ in pairs]))
    base = embedder.clip_images(load_images([b for _, b in pairs]))
    return float((adapter * base).sum(dim=-1).mean())


def require(paths, folder):
    if not paths:
        raise UserError(f"{folder} holds no images")
    return paths


def write_reports(rows, generated_dir, real_dir) -> Path:
    generated_dir = Path(generated_dir)
    with open(generated_dir / "scores.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["prompt", *METRICS, "prior_drift"])
        for row in rows:  # prior drift is one number for the whole folder: on the overall row, when measured
            drift = f"{row['prior_drift']:.4f}" if "prior_drift" in row else ""
            writer.writerow([row["prompt"], *(f"{row[m]:.4f}" for m in METRICS), drift])
    table = ["| prompt | DINO | CLIP-I | CLIP-T |", "|---|---|---|---|"]
    table += [f"| {r['prompt']} | {r['dino']:.3f} | {r['clip_i']:.3f} | {r['clip_t']:.3f} |" for r in rows]
    if "prior_drift" in rows[-1]:
        table.append(f"\nPrior drift (CLIP-I, adapter vs base on the class prompt): {rows[-1]['prior_drift']:.3f}")
    (generated_dir / "scores.md").write_text("\n".join(table) + "\n")
    write_grid(real_dir, generated_dir, len(rows) - 1)
    return generated_dir / "scores.md"


def write_grid(real_dir, generated_dir, num_prompts: int) -> Path:
    """Real photos in the first row, then one row per prompt, as thumbnails."""
    from PIL import Image

    rows = [list_images(real_dir)] + [list_images(prompt_folder(generated_dir, i)) for i in range(num_prompts)]
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (columns * THUMBNAIL, len(rows) * THUMBNAIL), "white")
    for y, paths in enumerate(rows):
        for x, path in enumerate(paths):
            grid.paste(load_rgb(path).resize((THUMBNAIL, THUMBNAIL)), (x * THUMBNAIL, y * THUMBNAIL))
    grid.save(Path(generated_dir, "grid.png"))
    return Path(generated_dir, "grid.png")


def plot_scores(points: dict, path) -> Path:
    """A line chart of each metric against the step, drawn with Pillow (no plotting library needed)."""
    from PIL import Image, ImageDraw

    width, height, margin = 640, 400, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    steps = sorted(points)
    values = [points[s][m] for s in steps for m in METRICS]
    low, high = min(values + [0.0]), max(values + [1.0])

    def xy(step, value):
        x = margin + (width - 2 * margin) * (steps.index(step) / max(1, len(steps) - 1))
        return x, height - margin - (height - 2 * margin) * (value - low) / ((high - low) or 1)

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for step in steps:
        draw.text((xy(step, low)[0] - 10, height - margin + 8), str(step), fill="black")
    for color, metric in zip(("red", "green", "blue"), METRICS):
        line = [xy(s, points[s][metric]) for s in steps]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        else:
            draw.ellipse([line[0][0] - 3, line[0][1] - 3, line[0][0] + 3, line[0][1] + 3], fill=color)
        draw.text((width - margin - 60, margin + 10 + 14 * METRICS.index(metric)), metric, fill=color)
    draw.text((margin, 15), f"scores against the step ({low:.2f} to {high:.2f})", fill="black")
    image.save(path)
    return Path(path)


# --- generation --------------------------------------------------------------------------------------------------


def generate(pipe, prompts, folder, num_images, seed, steps, resolution, batch_size) -> Path:
    """Write prompts.txt and 000/, 001/, ... with num_images images each (image k seeded with seed + k)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    for index, prompt in enumerate(prompts):
        write_images(pipe, prompt, prompt_folder(folder, index), num_images, seed, steps, resolution, batch_size)
    return folder


def write_images(pipe, prompt, folder, num_images, seed, steps, resolution, batch_size):
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        images = pipe.generate(prompt, num_images=count, num_inference_steps=steps, seed=seed + start,
                               height=resolution, width=resolution)  # the family's guidance (SD: 7.5, the papers')
        for k, image in enumerate(images):
            image.save(folder / f"{start + k:02d}.png")


def generation_settings(args, pipe) -> dict:
    """What the images of an evaluation depend on (the batch size does not: image k is seeded with seed + k)."""
    return {"model": args.pretrained_model_name_or_path, "revision": args.revision,
            "vae": args.pretrained_vae_model_name_or_path, "scheduler": type(pipe.pipeline.scheduler).__name__,
            "resolution": args.resolution, "num_inference_steps": args.num_inference_steps,
            "guidance_scale": pipe.sampling_defaults[1], "seed": args.seed, "num_images": args.num_images,
            "class_prompt": args.class_prompt}


def base_class_images(pipe, settings, layout, options) -> Path:
    """The base model's images of the class prompt with these settings: found when an earlier evaluation of any
    subject made them with the same settings, else generated (whole, or not at all)."""
    reference = {k: settings[k] for k in REFERENCE_SETTINGS}
    key = hashlib.sha256(json.dumps(reference, sort_keys=True).encode()).hexdigest()[:12]
    folder = layout.base_class_images(key)
    if read_settings(folder) == reference:
        return folder
    active = pipe.active
    pipe.set_adapter(None)
    try:
        with atomic_folder(folder) as partial:
            write_images(pipe, settings["class_prompt"], partial, *options)
            (partial / SETTINGS_FILE).write_text(json.dumps(reference, indent=2))
    finally:
        pipe.set_adapter(active)
    return folder


def generate_for_step(args, pipe, step) -> Path:
    """The step's evaluation folder, made anew and whole: images of every prompt (and of the class prompt, with
    the base model's to compare with), and the settings that made them."""
    prompts = subject_prompts(args.subject_index) if args.subject_index is not None else \
        [p for p in Path(args.prompts_file).read_text().splitlines() if p.strip()]
    layout = RunLayout(args.output_dir, args.adapter_name)
    folder = layout.evaluation(step)
    options = (args.num_images, args.seed, args.num_inference_steps, args.resolution, args.batch_size)
    settings = generation_settings(args, pipe)
    reference = base_class_images(pipe, settings, layout, options) if args.class_prompt else None
    with atomic_folder(folder) as partial:  # no image of an earlier generation stays beside these
        generate(pipe, prompts, partial, *options)
        if args.class_prompt:
            write_images(pipe, args.class_prompt, partial / "class", *options)
        record = {**settings, "adapter": args.adapter_name, "step": step, "prompts": prompts,
                  "reference": os.path.relpath(reference, folder) if reference else None}
        (partial / SETTINGS_FILE).write_text(json.dumps(record, indent=2))
    return folder


# --- command line ------------------------------------------------------------------------------------------------


def _pipeline(args):
    """The pipeline to generate with, after the checks utils.inference makes before any weight loads."""
    from utils.inference import BoftPipeline, check_model_and_adapter

    missing = [f"--{n}" for n in ("pretrained_model_name_or_path", "output_dir", "adapter_name") if not getattr(args, n)]
    if missing or (args.subject_index is None and not args.prompts_file):
        raise UserError(f"generating needs {', '.join(missing or ['--subject_index or --prompts_file'])}")
    family = check_model_and_adapter(args)
    return BoftPipeline.from_pretrained(args.pretrained_model_name_or_path, args.revision, args.device, args.dtype,
                                        vae_name=args.pretrained_vae_model_name_or_path, family=family)


def every_checkpoint(args, embedder):
    layout = RunLayout(args.output_dir, args.adapter_name)
    steps = layout.adapter_steps()
    if not steps:
        layout.resolve_adapters()  # raises, listing what exists
    pipe = _pipeline(args)
    points = {}
    for step in steps:
        pipe.load_adapter(args.output_dir, args.adapter_name, step)
        folder = generate_for_step(args, pipe, step)
        rows = score_folder(embedder, args.instance_data_dir, folder, args.identifier)
        write_reports(rows, folder, args.instance_data_dir)
        points[step] = rows[-1]
        print(f"step {step}: " + ", ".join(f"{m} {rows[-1][m]:.3f}" for m in METRICS))
    print(f"plot: {plot_scores(points, layout.evaluation_plot)}")


def main(argv=None, args=None):
    args = args or build_parser().parse_args(argv)
    peft_seam.install()
    try:
        if args.command == "generate":
            pipe = _pipeline(args)
            step = pipe.load_adapter(args.output_dir, args.adapter_name, args.step)
            print(f"generated images in {generate_for_step(args, pipe, step)}")
            return
        embedder = Embedder(args.dino_model, args.clip_model, args.device)
        if args.every_checkpoint:
            return every_checkpoint(args, embedder)
        if not args.generated_dir:
            raise UserError("score needs --generated_dir (or --every_checkpoint)")
        rows = score_folder(embedder, args.instance_data_dir, args.generated_dir, args.identifier, args.class_generated_dir)
        report = write_reports(rows, args.generated_dir, args.instance_data_dir)
        print(report.read_text())
    except UserError as error:
        print(f"utils.evaluate: error: {error}", file=sys.stderr)
        raise SystemExit(USAGE_EXIT_CODE) from None


if __name__ == "__main__":
    main(args=ARGS)
