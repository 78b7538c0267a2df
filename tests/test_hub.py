
import huggingface_hub
import pytest

from tests.helpers import make_config
from utils.run import hub
from utils.errors import UserError
from utils.layout import RunLayout


def hub_args(tmp_path, **overrides):
    values = dict(output_dir=tmp_path / "rex-run", pretrained_model_name_or_path="m", wandb_run_name="rex",
                  instance_prompt="a photo of qwe dog", train_text_encoder=True)
    return make_config(**{**values, **overrides})


def test_offline_and_missing_token_fail_at_start_up(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        hub.resolve_hub_repo(hub_args(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(UserError, match="needs a token"):
        hub.resolve_hub_repo(hub_args(tmp_path))


def test_repo_id_defaults_to_user_and_folder_name(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "whoami", lambda token: {"name": "ada"})
    assert hub.resolve_hub_repo(hub_args(tmp_path, hub_token="t")) == ("ada/rex-run", "t")
    assert hub.resolve_hub_repo(hub_args(tmp_path, hub_token="t", hub_model_id="org/x"))[0] == "org/x"

    def unreachable(token):
        raise ConnectionError("no route")

    monkeypatch.setattr(huggingface_hub, "whoami", unreachable)
    with pytest.raises(UserError, match="cannot reach the Hub"):
        hub.resolve_hub_repo(hub_args(tmp_path, hub_token="t"))


def test_push_uploads_adapters_validation_and_card_only(tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, token, exist_ok: calls.update(repo=repo_id))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kwargs: calls.update(upload=kwargs))
    monkeypatch.setattr(huggingface_hub, "upload_file", lambda **kwargs: calls.update(card=kwargs))
    args = hub_args(tmp_path)
    layout = RunLayout(tmp_path, "rex")
    for part in ("unet", "text_encoder"):  # the adapters the card names are the ones saved
        layout.adapter(part, 400).mkdir(parents=True)
        (layout.adapter(part, 400) / "adapter_config.json").write_text("{}")
    card = hub.write_model_card(layout, args, 400).read_text()
    assert "unet/400/rex" in card and "text_encoder/400/rex" in card and "base_model: m" in card
    assert hub.push_to_hub(layout, "ada/rex", "secret") == "https://huggingface.co/ada/rex"
    patterns = calls["upload"]["allow_patterns"]
    assert calls["repo"] == "ada/rex" and patterns == layout.uploaded_patterns()
    assert "unet/*/rex/**" in patterns and "validation/rex/**" in patterns and "checkpoints/rex/**" not in patterns
    assert calls["card"]["path_in_repo"] == "README.md" and calls["card"]["path_or_fileobj"] == str(layout.model_card)
