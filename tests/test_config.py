"""The frozen run configuration: every flag, the values derived from them once, and nothing that changes it."""

import dataclasses

import pytest

from tests.helpers import make_config
from utils.run.config import FLAG_NAMES, class_images_used, run_seed
from utils.run.flags import build_parser


def test_every_flag_is_a_field_and_lists_are_tuples():
    config = make_config(validation_prompt=["a qwe toy", "a red qwe toy"])
    assert {a.dest for a in build_parser()._actions} - {"help"} == set(FLAG_NAMES)
    assert config.validation_prompt == ("a qwe toy", "a red qwe toy")
    assert config.validation_prompts == ("a qwe toy", "a red qwe toy")


def test_the_configuration_cannot_be_changed():
    config = make_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.learning_rate = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_train_steps = 10


def test_scale_lr_is_computed_once_and_the_flag_value_kept():
    config = make_config(num_processes=2, scale_lr=True, learning_rate=1e-4, train_batch_size=3,
                         gradient_accumulation_steps=2)
    assert config.learning_rate == pytest.approx(1e-4 * 2 * 3 * 2) and config.base_learning_rate == 1e-4
    assert make_config(learning_rate=1e-4).learning_rate == 1e-4


@pytest.mark.parametrize("examples, batch, processes, accumulation, epochs, expected", [
    (5, 1, 1, 1, 2, 10), (5, 2, 1, 1, 1, 3), (5, 2, 2, 1, 1, 2), (7, 1, 1, 4, 1, 2), (7, 1, 2, 2, 3, 6),
])
def test_steps_from_epochs_count_optimizer_steps_per_process(examples, batch, processes, accumulation, epochs, expected):
    config = make_config(num_processes=processes, num_examples=examples, max_train_steps=None, num_train_epochs=epochs,
                         train_batch_size=batch, gradient_accumulation_steps=accumulation)
    assert config.max_train_steps == expected and config.max_train_steps_flag is None
    assert make_config(max_train_steps=7).max_train_steps == 7


def test_run_name_seed_and_resolution_are_derived():
    config = make_config(seed=None, wandb_run_name="dog")
    assert config.run_name == "dog" and config.seed == run_seed(None, "dog") == 0xCD6357EF  # pinned: resumes rely on it
    assert make_config(seed=7).seed == 7 and run_seed(None, "dog") != run_seed(None, "cat")
    assert make_config(resolution=None).resolution == 512 and make_config(resolution=768).resolution == 768
    assert make_config(wandb_run_name=None).run_name == "dreambooth_boft"


def test_class_images_used_counts_what_the_folder_will_hold():
    assert class_images_used(present=0, unreadable=0, num_class_images=100) == 100  # all generated
    assert class_images_used(present=150, unreadable=0, num_class_images=100) == 100  # extra ones unused
    assert class_images_used(present=100, unreadable=3, num_class_images=100) == 97  # unreadable count as present
    assert class_images_used(present=40, unreadable=3, num_class_images=100) == 97  # 60 generated


def test_boft_settings_come_from_the_flags():
    settings = make_config(boft_block_num=0, boft_block_size=16, boft_n_butterfly_factor=3, boft_dropout=0.0,
                           boft_bias="all", boft_impl="peft").boft
    assert (settings.block_num, settings.block_size, settings.n_butterfly_factor) == (0, 16, 3)
    assert (settings.dropout, settings.bias, settings.impl) == (0.0, "all", "peft")
