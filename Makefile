# The front door for people and CI. Every target creates the environment it needs.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
# this machine keeps a CPU wheel of torch 2.13.0 on disk; elsewhere pin what suits your hardware
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
SEEDS ?= 0,1,2
STAMP := $(VENV)/.installed
# No malloc setting here any more: mer-train, mer-evaluate and mer-bench set glibc's malloc
# themselves at start-up (src/mer_cli/core/allocator.py: big blocks kept in the heap, as the
# GLIBC_TUNABLES this file used to export), so mer-train typed directly is as fast as make run.
# MER_MALLOC=system turns it off; a GLIBC_TUNABLES=glibc.malloc.* of your own is kept. Full default
# run, 2 interleaved rounds on the shared 2-core box: 1.8-2.3 GiB peak RSS, 95-118 s training;
# glibc's defaults 1.0 GiB, 145-147 s; GLIBC_TUNABLES=glibc.malloc.hugetlb=1 1.0 GiB, 104-120 s
# (mer-bench: 9 % slower training than the heap). Table and the other settings: docs/memory.md.

.PHONY: help venv run compare zoo test test-fast test-integration smoke lint bench bench-train bench-profile bench-peer bench-inference bench-scale bench-features bench-reference bench-compile bench-real clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)  ## create .venv with mer-cli and the dev tools

run: $(STAMP)  ## train + evaluate the default model (early fusion) on the embedded data
	$(BIN)/mer-train $(ARGS)

compare: $(STAMP)  ## the four models x SEEDS (0,1,2) on the embedded data, compared in one report
	$(BIN)/mer-train -m modality=acoustic,visual,late,early seed=$(SEEDS) $(ARGS)

# pytest-xdist: one worker per CPU (TEST_WORKERS=0: in this process); a test file stays on one
# worker, so its module fixtures (smoke runs) are trained once
TEST_WORKERS ?= auto

# every encoder x fusion x SEEDS, two jobs at a time, longest first; resume=auto + a fixed sweep
# directory: after an interruption the same command continues (finished jobs re-evaluated in seconds)
ZOO_MODELS ?= bilstm,tcn,gru,transformer,bilstm_notebook
ZOO_MODALITIES ?= xattn,joint,early,acoustic,visual,late
ZOO_DIR ?= outputs/sweeps/zoo
# the report also tests each encoder's late, joint and xattn fusion against its early fusion (the
# notebook's question; labels are <modality>/<encoder> when several encoders are swept);
# `make zoo ZOO_PAIRS=` tests each model against the best only
comma := ,
space := $(subst ,, )
zoo_models = $(subst $(comma),$(space),$(ZOO_MODELS))
zoo_modalities = $(subst $(comma),$(space),$(ZOO_MODALITIES))
zoo_pairs = $(foreach e,$(zoo_models),$(foreach f,$(filter late joint xattn,$(zoo_modalities)),[$(f)/$(e),early/$(e)]))
ZOO_PAIRS ?= $(if $(and $(word 2,$(zoo_models)),$(filter early,$(zoo_modalities))),$(subst $(space),$(comma),$(strip $(zoo_pairs))))
zoo: $(STAMP)  ## the model zoo: every encoder x modality x SEEDS, one report in ZOO_DIR (hours on a CPU; resumable)
	$(BIN)/mer-train -m hydra/launcher=joblib model=$(ZOO_MODELS) modality=$(ZOO_MODALITIES) seed=$(SEEDS) \
	  resume=auto hydra.sweep.dir=$(ZOO_DIR) $(if $(ZOO_PAIRS),'compare.pairs=[$(ZOO_PAIRS)]') $(ARGS)

test: $(STAMP)  ## the whole test suite (a few minutes on 2 cores)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

test-fast: $(STAMP)  ## unit tests only (under a minute on 2 cores)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(ARGS)

# real services on 127.0.0.1, state under a temporary folder, all stopped at the end: a one-node
# Slurm cluster, a PostgreSQL server, an MLflow tracking server (tests/integration/)
test-integration: $(STAMP)  ## Slurm, PostgreSQL and MLflow-server scenarios (installs the system packages when missing)
	bash tests/integration/system-packages.sh
	$(BIN)/python -m pytest -p no:xdist --integration -m integration tests/integration $(ARGS)

smoke: $(STAMP)  ## every modality for two tiny epochs
	$(BIN)/mer-train -m experiment=smoke modality=acoustic,visual,late,early $(ARGS)

lint: $(STAMP)  ## ruff (lint + format check), mypy, and the layers contract (import-linter)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# the Keras/TensorFlow peer (benchmarks/peer_keras.py): a benchmark-only environment, never a project dependency
PEER_DIR ?= benchmarks
PEER_VENV ?= $(HOME)/.venvs/peer-tf

bench: $(STAMP)  ## every speed figure with a target in one run, one table (~15 min; ARGS=--quick: a check, ~3 min)
	mkdir -p outputs
	$(BIN)/python benchmarks/bench_summary.py --out outputs/bench-summary.jsonl --table outputs/bench-summary.md $(ARGS)

bench-train: $(STAMP)  ## every encoder's training and inference speed table, JSON lines in outputs/bench.jsonl (ARGS=--quick)
	mkdir -p outputs
	$(BIN)/mer-bench --out outputs/bench.jsonl $(ARGS)

bench-profile: $(STAMP)  ## where a training step's time goes: phase x kind of operation, per model and precision
	mkdir -p outputs
	$(BIN)/python benchmarks/step_profile.py --json outputs/bench-profile.jsonl $(ARGS)

bench-inference: $(STAMP)  ## exported model: one-clip p50/p99 and batch-64 throughput, torch vs onnxruntime
	mkdir -p outputs
	$(BIN)/mer-bench --inference --out outputs/bench-inference.jsonl $(ARGS)

$(PEER_VENV)/.installed:
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install -q tensorflow
	touch $@

bench-peer: $(STAMP) $(PEER_VENV)/.installed  ## mer-cli and the Keras peer side by side, ratios (ARGS=--rounds 1: shorter)
	mkdir -p outputs
	$(BIN)/mer-bench --peer-python $(PEER_VENV)/bin/python --peer-script $(PEER_DIR)/peer_keras.py \
		--out outputs/bench-peer.jsonl $(ARGS)

# generated data for bench-scale: ~57 KB per clip (150k clips: ~8.6 GB)
SCALE_SIZES ?= 1000,7000,70000,150000

bench-scale: $(STAMP)  ## peak RSS, time to first batch, s/epoch on 1k..150k generated clips (ARGS=--quick: seconds)
	mkdir -p outputs
	$(BIN)/python benchmarks/bench_scale.py --sizes $(SCALE_SIZES) --out outputs/bench-scale.jsonl $(ARGS)

# every feature back-end on generated clips (tiny random models; base ones only where the local HF
# cache has them): clips/s, frames/s, load time, peak RSS per back-end, mer-ingest's RSS at N vs 4N clips
bench-features: $(STAMP)  ## feature back-ends: clips/s, frames/s, peak RSS, ingest RSS vs clips (ARGS=--quick)
	mkdir -p outputs
	$(BIN)/python benchmarks/extraction.py --json outputs/bench-features.jsonl $(ARGS)

bench-reference: $(STAMP)  ## every encoder x fusion vs its plain PyTorch reference: ratios per round (ARGS=--quick)
	mkdir -p outputs
	$(BIN)/mer-bench --reference --out outputs/bench-reference.jsonl $(ARGS)

bench-compile: $(STAMP)  ## runtime.compile: eager vs torch.compile per encoder, a default-length run, compile included
	mkdir -p outputs
	$(BIN)/python benchmarks/bench_compile.py --out outputs/bench-compile.jsonl $(ARGS)

# real public sets nobody here made (UEA/UCR archive files from the sktime wheel on PyPI, converted
# into $$XDG_CACHE_HOME/mer-cli/real-data by benchmarks/real_data_fetch.py, never into the repository):
# mer-train -m at the default settings per set, summaries in outputs/real-data/$(REAL_TAG)
REAL_TAG ?= defaults
bench-real: $(STAMP)  ## speech, motion, appliance data at defaults: zoo's best vs the baselines (~1 h; resumable)
	$(BIN)/python benchmarks/real_data_run.py --tag $(REAL_TAG) $(ARGS)

clean:  ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .mypy_cache .ruff_cache build dist
