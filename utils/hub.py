"""Pushing the final adapters to the Hugging Face Hub, with every check done at start-up."""

import os
from pathlib import Path

from utils.errors import UserError


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, at the time of the call."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def resolve_hub_repo(args) -> tuple[str, str]:
    """(repo id, token) for --push_to_hub, or a UserError now rather than after hours of training."""
    from huggingface_hub import get_token, whoami

    if hub_offline():
        raise UserError("--push_to_hub needs the network, but HF_HUB_OFFLINE is set; unset it or drop --push_to_hub")
    token = args.hub_token or get_token()
    if not token:
        raise UserError("--push_to_hub needs a token: set HF_TOKEN (or run `hf auth login`)")
    try:
        user = whoami(token=token)["name"]
    except Exception as error:  # any failure here means the upload at the end would fail too
        raise UserError(f"--push_to_hub: cannot reach the Hub with this token ({type(error).__name__})") from None
    return args.hub_model_id or f"{user}/{Path(args.output_dir).resolve().name}", token


def write_model_card(layout, args, step: int) -> Path:
    """The run's model card (its own file: other runs in the folder have theirs)."""
    card = f"""---
base_model: {args.pretrained_model_name_or_path}
library_name: peft
tags: [stable-diffusion, dreambooth, boft]
---
# {args.adapter_name}

BOFT adapters (block_num {args.boft_block_num}, block_size {args.boft_block_size}, butterfly factors
{args.boft_n_butterfly_factor}) trained with DreamBooth on "{args.instance_prompt}" for {step} steps.
Adapters: `unet/{step}/{args.adapter_name}`{f" and `text_encoder/{step}/{args.adapter_name}`" if args.train_text_encoder else ""}.
"""
    layout.model_card.parent.mkdir(parents=True, exist_ok=True)
    layout.model_card.write_text(card)
    return layout.model_card


def push_to_hub(layout, repo_id: str, token: str) -> str:
    """Upload the run's adapters, validation images and model card (no checkpoints, no other run's files)."""
    from huggingface_hub import create_repo, upload_file, upload_folder

    create_repo(repo_id, token=token, exist_ok=True)
    upload_folder(repo_id=repo_id, folder_path=str(layout.output_dir), allow_patterns=layout.uploaded_patterns(),
                  token=token)
    upload_file(path_or_fileobj=str(layout.model_card), path_in_repo="README.md", repo_id=repo_id, token=token)
    return f"https://huggingface.co/{repo_id}"
