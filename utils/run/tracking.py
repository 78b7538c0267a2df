"""Trackers (tensorboard, wandb): which ones, offline when there is no key, and a config that holds no secret."""

import importlib.util
import logging
import netrc
import os
import sys

from utils.errors import UserError

logger = logging.getLogger(__name__)

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
SECRET_FLAGS = ("hub_token", "wandb_key")
REDACTED = "***"


def resolve_trackers(report_to: str) -> list[str]:
    """--report_to as a list of tracker names; a clear error when one is not installed."""
    names = {"none": [], "all": ["tensorboard", "wandb"]}.get(report_to, [report_to])
    for name in names:
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise UserError(f"--report_to {report_to} needs the {name} package: pip install {name}")
    return names


def _wandb_key_known() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def prepare_wandb(config) -> str:
    """Give wandb its key through the environment (never the config); go offline without one. Return a notice."""
    if config.wandb_key:
        os.environ["WANDB_API_KEY"] = config.wandb_key
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return f"wandb runs {os.environ['WANDB_MODE']} (WANDB_MODE={os.environ['WANDB_MODE']})"
    if not _wandb_key_known():
        os.environ["WANDB_MODE"] = "offline"
        return "wandb runs offline: no API key (set WANDB_API_KEY or run `wandb login`); sync later with `wandb sync`"
    return "wandb runs online"


def redact_command_line(argv: list[str]) -> list[str]:
    """argv with the values of secret flags replaced, in both --flag=value and --flag value forms."""
    redacted, hide_next = [], False
    for item in argv:
        if hide_next:
            redacted.append(REDACTED)
            hide_next = False
            continue
        flag = item.split("=", 1)[0]
        if flag.lstrip("-") in SECRET_FLAGS:
            if "=" in item:
                item = f"{flag}={REDACTED}"
            else:
                hide_next = True
        redacted.append(item)
    return redacted


def scrub_process_arguments() -> None:
    """Trackers copy sys.argv into their files; keep secrets out of that copy."""
    sys.argv[:] = redact_command_line(sys.argv)


def tracker_config(run_config) -> dict:
    """The run's configuration (flags and derived values) as scalars tensorboard accepts; secrets dropped, lists
    joined."""
    config = {}
    for key, value in sorted(run_config.as_dict().items()):
        if key in SECRET_FLAGS:
            continue
        if isinstance(value, (list, tuple)):
            value = " | ".join(map(str, value))
        elif value is None:
            value = "None"
        elif not isinstance(value, (int, float, str, bool)):
            value = str(value)
        config[key] = value
    return config


def start_trackers(config, accelerator, trackers, logging_dir) -> None:
    """On the main process: wandb's mode, secrets out of argv, then accelerate's trackers with a clean config."""
    if not accelerator.is_main_process:
        return
    if "wandb" in trackers:
        logger.info(prepare_wandb(config))
    scrub_process_arguments()
    logging_dir.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(
        config.wandb_project_name or "dreambooth_boft",
        config=tracker_config(config),
        init_kwargs={"wandb": {"name": config.run_name, "dir": str(logging_dir)}},
    )


def log_images(accelerator, images, captions, step: int) -> None:
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(i, caption=c) for i, c in zip(images, captions)]}, step=step)
