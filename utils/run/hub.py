"""Pushing the final adapters to the Hugging Face Hub, with every check done at start-up."""

from pathlib import Path

from utils.errors import UserError
from utils.families import hub_offline


def resolve_hub_repo(config) -> tuple[str, str]:
    """(repo id, token) for --push_to_hub, or a UserError now rather than after hours of training."""
    from huggingface_hub import get_token, whoami

    if hub_offline():
        raise UserError("--push_to_hub needs the network, but HF_HUB_OFFLINE is set; unset it or drop --push_to_hub")
    token = config.hub_token or get_token()
    if not token:
        raise UserError("--push_to_hub needs a token: set HF_TOKEN (or run `hf auth login`)")
    try:
        user = whoami(token=token)["name"]
    except Exception as error:  # any failure here means the upload at the end would fail too
        raise UserError(f"--push_to_hub: cannot reach the Hub with this token ({type(error).__name__})") from None
    return config.hub_model_id or f"{user}/{Path(config.output_dir).resolve().name}", token


def write_model_card(layout, config, step: int) -> Path:
    """The run's model card (its own file: other runs in the folder have theirs)."""
    saved = [f"`{folder.relative_to(layout.output_dir)}`" for folder in layout.adapters_at(step).values()]
    card = f"""---
base_model: {config.pretrained_model_name_or_path}
library_name: peft
tags: [stable-diffusion, dreambooth, boft]
---
# {config.run_name}

BOFT adapters (block_num {config.boft_block_num}, block_size {config.boft_block_size}, butterfly factors
{config.boft_n_butterfly_factor}) trained with DreamBooth on "{config.instance_prompt}" for {step} steps.
Adapters: {" and ".join(saved)}.
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
