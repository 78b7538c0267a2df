# make demo: install, then train on the embedded tiny pipeline (no download). make test: install, run the tests
# (make test-fast: the unit tests only).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine without a GPU this resolves to the local CPU wheel where one is provided; elsewhere PyPI's build.
TORCH ?= torch==2.13.0
# make demo DEMO_FAMILY=sdxl: the same demo on a tiny SDXL pipeline, in folders of its own.
DEMO_FAMILY ?= sd
DEMO_SUFFIX := $(if $(filter sdxl,$(DEMO_FAMILY)),-sdxl,)
DEMO_OUT ?= data/output/demo$(DEMO_SUFFIX)
DEMO_MODEL := data/tiny-$(DEMO_FAMILY)
DEMO_CLASS := data/class_data/demo_toy$(DEMO_SUFFIX)
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install test test-fast demo benchmark clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

test: install
	$(BIN)/python -m pytest -q tests

# The unit tests alone (under a minute): everything but the end-to-end layer (tests/conftest.py marks it).
test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e" tests

demo: install
	$(BIN)/python -m utils.testing.tiny_model $(DEMO_MODEL) --family $(DEMO_FAMILY) --subject data/demo_subject
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
	  train_dreambooth.py \
	  --pretrained_model_name_or_path=$(DEMO_MODEL) \
	  --instance_data_dir=data/demo_subject --instance_prompt="a photo of qwe toy" \
	  --with_prior_preservation --class_data_dir=$(DEMO_CLASS) --class_prompt="a photo of toy" \
	  --num_class_images=8 --sample_batch_size=4 --use_boft \
	  --output_dir=$(DEMO_OUT) --wandb_run_name=demo_toy --report_to=tensorboard \
	  --resolution=64 --train_batch_size=2 --learning_rate=1e-3 --lr_warmup_steps=0 --seed=0 \
	  --boft_block_num=8 --boft_block_size=0 --boft_n_butterfly_factor=2 \
	  --max_train_steps=40 --checkpointing_steps=20 --validation_steps=20 --num_validation_images=2 \
	  --validation_prompt="a qwe toy on the beach. a red qwe toy."

benchmark: install
	$(BIN)/python -m benchmarks.boft_step --quick

clean:
	rm -rf $(VENV) data/tiny-sd data/tiny-sdxl data/demo_subject data/class_data/demo_toy data/class_data/demo_toy-sdxl \
	  data/output/demo data/output/demo-sdxl $(DEMO_OUT)
