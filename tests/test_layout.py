"""Where a run's files go: every run's files under its own name, adapters found by step."""

import pytest

from utils.errors import UserError
from utils.layout import RunLayout, check_run_name, step_of_checkpoint


def test_every_file_of_a_run_is_under_its_name(tmp_path):
    dog = RunLayout(tmp_path, "dog")
    owned = [dog.adapter("unet", 4), dog.checkpoint(4), dog.lock_file, dog.validation(4), dog.evaluation(4),
             dog.evaluation_plot, dog.logs(), dog.model_card]
    assert all("dog" in path.relative_to(tmp_path).parts for path in owned)
    cat = RunLayout(tmp_path, "cat")
    assert not {str(p) for p in owned} & {str(p) for p in (cat.adapter("unet", 4), cat.checkpoint(4), cat.lock_file,
                                                             cat.validation(4), cat.evaluation(4), cat.logs())}
    assert dog.latent_cache == cat.latent_cache == tmp_path / "latent_cache"  # keyed by content: safe to share
    assert dog.logs("/abs/logs") == tmp_path / "/abs/logs" / "dog"
    assert dog.uploaded_patterns() == ["unet/*/dog/**", "transformer/*/dog/**", "text_encoder/*/dog/**",
                                      "text_encoder_2/*/dog/**", "text_encoder_3/*/dog/**", "validation/dog/**"]


def test_checkpoint_folders_are_the_runs_own_in_step_order(tmp_path):
    dog = RunLayout(tmp_path, "dog")
    for step in (10, 2, 4):
        dog.checkpoint(step).mkdir(parents=True)
    (dog.checkpoints / "checkpoint-x").mkdir()
    RunLayout(tmp_path, "cat").checkpoint(6).mkdir(parents=True)
    assert [step_of_checkpoint(p) for p in dog.checkpoint_folders()] == [2, 4, 10]
    (tmp_path / "checkpoint-8").mkdir()
    assert dog.legacy_checkpoints() == [tmp_path / "checkpoint-8"]


def test_adapters_resolve_by_step_and_say_what_exists(tmp_path):
    dog = RunLayout(tmp_path, "dog")
    for step, parts in ((2, ("unet", "text_encoder")), (4, ("unet",))):
        for part in parts:
            dog.adapter(part, step).mkdir(parents=True)
            (dog.adapter(part, step) / "adapter_config.json").write_text("{}")
    assert dog.resolve_adapters() == (4, {"unet": dog.adapter("unet", 4)})
    assert set(dog.resolve_adapters("2")[1]) == {"unet", "text_encoder"}
    with pytest.raises(UserError, match="is not a number; give one of 2, 4 or latest"):
        dog.resolve_adapters("abc")
    with pytest.raises(UserError, match="no step 3"):
        dog.resolve_adapters(3)
    with pytest.raises(UserError, match=r"no adapter named 'cat'.*adapters there: dog"):
        RunLayout(tmp_path, "cat").resolve_adapters()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", " dog", "base"])
def test_run_names_that_would_leave_or_clash_with_their_folders_are_refused(name):
    assert check_run_name(name)


def test_ordinary_run_names_are_accepted():
    assert check_run_name("dog_boft_801") is None and check_run_name("my dog 2") is None


def test_a_transformer_families_adapters_resolve_like_a_unets(tmp_path):
    """The denoiser's folder is the family's part name; a run of a diffusion transformer saves transformer/."""
    flux = RunLayout(tmp_path, "dog")
    for part in ("transformer", "text_encoder", "text_encoder_3"):
        flux.adapter(part, 5).mkdir(parents=True)
        (flux.adapter(part, 5) / "adapter_config.json").write_text("{}")
    assert flux.denoiser_part == "transformer" and flux.adapter_steps() == [5]
    assert flux.resolve_adapters() == (5, {part: flux.adapter(part, 5)
                                           for part in ("transformer", "text_encoder", "text_encoder_3")})
    assert RunLayout(tmp_path / "empty", "dog").denoiser_part == "unet"
