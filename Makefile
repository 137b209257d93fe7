# Two commands set everything up on a fresh Debian machine: `make demo` and `make test`.
# Each installs what is missing (system packages, .venv, pinned requirements, this package)
# and is fast the second time.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo_runs
SUDO := $(shell [ "$$(id -u)" -ne 0 ] && command -v sudo)
APT_PACKAGES := libsndfile1 python3-venv postgresql

KERNEL_VENV ?= .kernel-venv
KERNEL_STAMP := $(KERNEL_VENV)/.installed-stamp

.PHONY: demo test setup system-deps bench gpu-check plan-check tune-demo clean kernel-venv

system-deps:
	@missing=""; \
	ldconfig -p | grep -q 'libsndfile\.so\.1' || missing="$$missing libsndfile1"; \
	python3 -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	{ command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; } || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "Installing system packages:$$missing (apt)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): requirements.txt requirements-tune.txt requirements-dev.txt pyproject.toml
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $(STAMP)

setup: system-deps $(STAMP)

# A Colab-like notebook kernel: display packages only, no torch (tests/notebook/test_notebooks.py runs the notebooks in it).
$(KERNEL_STAMP): requirements-kernel.txt
	@[ -x $(KERNEL_VENV)/bin/python ] || python3 -m venv $(KERNEL_VENV)
	$(KERNEL_VENV)/bin/python -m pip install -q -r requirements-kernel.txt
	@touch $(KERNEL_STAMP)

kernel-venv: $(KERNEL_STAMP)

demo: setup
	$(PY) -m sonar_ft.demo --demo-dir $(DEMO_DIR)

# OMP_WAIT_POLICY=PASSIVE: the suite runs the recipe in subprocesses next to pytest; OpenMP threads that spin
# while waiting starve them on a 2-core machine (a tiny demo build went from seconds to tens of minutes).
# Two workers, whole files each (session fixtures are built once per worker): 4 min 53 s instead of 8 min 25 s on 2 cores.
test: setup kernel-venv
	OMP_WAIT_POLICY=PASSIVE SONAR_FT_KERNEL_VENV=$(abspath $(KERNEL_VENV)) $(PY) -m pytest -q -n 2 --dist loadfile --durations=25 tests

# Benchmarks (not tests): each ratio printed next to its goal; figures in benchmarks/out/*.json, docs/benchmarks.md.
bench: setup
	DEMO_DIR=$(DEMO_DIR) $(PY) benchmarks/run_all.py

# The GPU check (docs/benchmarks.md, "GPU check"): official-size stand-ins on each planned GPU profile, ~8 min on one GPU.
# Figures in benchmarks/out/gpu_check.{json,md}. `python benchmarks/gpu_check.py --smoke` is its CPU self-test.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_FLAGS)

# The plan check (docs/benchmarks.md, "Memory plan, measured"): the memory planner against PyTorch's own count of
# one step's tensor bytes per category, every GPU profile at its planned shapes, on the CPU (fake tensors), and host
# RAM of start-up and resume (--host). Figures in benchmarks/out/plan_check.{json,md}; `--smoke` is its test mode.
plan-check: setup
	$(PY) benchmarks/plan_check.py --host $(PLAN_CHECK_FLAGS)

# The demo Optuna study (configs/tuning/demo.yaml) on the demo assets under $(DEMO_DIR); study folder $(DEMO_DIR)/tuning.
TUNE_DEMO_PATHS = --encoder_checkpoint $(DEMO_DIR)/assets/sonar_encoder_demo.pth --decoder $(DEMO_DIR)/assets/text_decoder.yaml \
	--text_encoder $(DEMO_DIR)/assets/text_encoder.yaml \
	--train_features $(DEMO_DIR)/data/features/train --train_manifest $(DEMO_DIR)/data/manifests/train.tsv \
	--val_features $(DEMO_DIR)/data/features/val --val_manifest $(DEMO_DIR)/data/manifests/val.tsv
tune-demo: setup
	$(PY) -c 'from sonar_ft.demo.build import build_demo; build_demo("$(DEMO_DIR)")'
	TQDM_DISABLE=1 $(PY) -m sonar_ft.cli tune --config configs/tuning/demo.yaml --output_dir $(DEMO_DIR)/tuning $(TUNE_DEMO_PATHS)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache $(KERNEL_VENV)
