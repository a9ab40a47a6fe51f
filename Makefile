# The README's two commands: `make demo` (the main job) and `make test` (lint + test suite).
# Both create .venv on first use. torch is installed first and pinned, so pip takes the CPU
# wheel instead of resolving a multi-GB CUDA build; GPU users install their own torch.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[qlora,deepspeed,test,bench]"
	touch $@

demo: $(STAMP)
	$(BIN)/sft-plugins demo

test: $(STAMP)
	$(BIN)/ruff check .
	OMP_WAIT_POLICY=PASSIVE SFT_PLUGINS_STRICT_SKIPS=1 $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
