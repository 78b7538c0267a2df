# make demo: install, then train on the embedded tiny pipeline (no download). make test: install, run the tests
# (make test-fast: the unit tests only). make lock: refresh the locked package set.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The tested set, every package pinned with its hashes: requirements.lock holds all but torch (GPU users keep their
# CUDA build and install it beside theirs), requirements-torch-cpu.lock the CPU torch the tests run on.
LOCK := requirements.lock
TORCH_LOCK := requirements-torch-cpu.lock
# What make lock pins torch to (on a machine without a GPU pip finds the local CPU wheel where one is provided), and
# the resolver it uses, installed in a venv of its own so that the tested one holds the locked set alone.
TORCH ?= torch==2.13.0
UV ?= uv==0.13.9
TOOLS := .venv-tools
# make demo DEMO_FAMILY=sdxl (or flux, sd3, klein): the same demo on a tiny SDXL (FLUX.1 [dev], SD3, FLUX.2 [klein])
# pipeline, in folders of its own.
DEMO_FAMILY ?= sd
DEMO_SUFFIX := $(if $(filter-out sd,$(DEMO_FAMILY)),-$(DEMO_FAMILY),)
DEMO_OUT ?= data/output/demo$(DEMO_SUFFIX)
DEMO_MODEL := data/tiny-$(DEMO_FAMILY)
DEMO_CLASS := data/class_data/demo_toy$(DEMO_SUFFIX)
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install lock test test-fast demo benchmark gpu-check clean slurm-for-tests

install: $(VENV)/.installed

# --clear: a changed lock gives a venv with exactly the locked set, nothing left from the previous one.
$(VENV)/.installed: $(LOCK) $(TORCH_LOCK)
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r $(TORCH_LOCK) -r $(LOCK)
	touch $@

# The newest releases inside requirements.txt's ranges, resolved for this Python; torch stays at $(TORCH).
lock:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet "$(UV)"
	rm -rf $(TOOLS)/torch && $(TOOLS)/bin/pip download --quiet --no-deps --only-binary=:all: -d $(TOOLS)/torch "$(TORCH)"
	cd $(TOOLS)/torch && for wheel in torch-*.whl; do \
	  printf '# make lock: %s\n%s \\\n    --hash=sha256:%s\n' "$(TORCH)" "torch==$$(echo $$wheel | cut -d- -f2)" \
	    "$$(sha256sum $$wheel | cut -d' ' -f1)"; done > ../torch.lock
	mv $(TOOLS)/torch.lock $(TORCH_LOCK)
	sed -n 's/^\(torch==[^ ]*\).*/\1/p' $(TORCH_LOCK) > $(TOOLS)/torch.txt
	$(TOOLS)/bin/uv pip compile requirements-dev.txt --upgrade --generate-hashes --quiet \
	  --python-version $$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
	  $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) --constraint $(TOOLS)/torch.txt --no-emit-package torch \
	  --custom-compile-command "make lock" -o $(LOCK)

# Two workers (pytest-xdist), each test module whole on one of them so that its fixtures are built once; each worker
# gets its share of the cores (tests/conftest.py). make test TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

# The unit tests alone (under a minute): everything but the end-to-end layer (marked e2e in each test module); the
# slowest are listed, so that a unit test growing slow is seen.
test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e" --durations=5 tests

# Debian's Slurm for tests/test_slurm.py (a single-node cluster the tests start and stop themselves; without Slurm
# those tests skip). Root only; the packages' services are kept from starting (policy-rc.d), none is left running.
slurm-for-tests:
	@if command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ]; then \
	  echo "Slurm is installed"; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "Slurm is not installed and this is not root on Debian: tests/test_slurm.py will skip"; \
	else \
	  added=; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
	    chmod +x /usr/sbin/policy-rc.d; added=1; }; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    slurmctld slurmd slurm-client munge >/dev/null; } || echo "Slurm could not be installed: tests/test_slurm.py will skip"; \
	  [ -z "$$added" ] || rm -f /usr/sbin/policy-rc.d; \
	fi

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
	  --validation_prompt="a qwe toy on the beach. a red qwe toy." --overwrite_run

benchmark: install
	$(BIN)/python -m benchmarks.boft_step --quick

# On a GPU machine, in the environment of the README's GPU set-up (its CUDA torch, not .venv's CPU one): everything
# only a GPU shows, within 8 minutes, as one markdown table in gpu_check.md.
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check --out gpu_check.md

clean:
	rm -rf $(VENV) $(TOOLS) data/tiny-sd data/tiny-sdxl data/tiny-flux data/tiny-sd3 data/tiny-klein data/demo_subject \
	  data/class_data/demo_toy data/class_data/demo_toy-sdxl data/class_data/demo_toy-flux data/class_data/demo_toy-sd3 \
	  data/class_data/demo_toy-klein data/output/demo data/output/demo-sdxl data/output/demo-flux data/output/demo-sd3 \
	  data/output/demo-klein $(DEMO_OUT)
