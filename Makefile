# The README's two commands: `make demo` (the main job) and `make test` (lint + test suite).
# Both create .venv on first use. torch is installed first and pinned, so pip takes the CPU
# wheel instead of resolving a multi-GB CUDA build; GPU users install their own torch.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# DeepSpeed goes into a folder of its own, on the path of tests/test_deepspeed.py's processes only:
# installed in the venv, transformers would import it into every training run.
DEEPSPEED ?= $(VENV)/deepspeed
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[qlora,test,bench]"
	$(BIN)/python -m pip install --quiet --no-deps --target $(DEEPSPEED) \
		"deepspeed>=0.17" einops hjson msgpack ninja py-cpuinfo
	touch $@

demo: $(STAMP)
	$(BIN)/sft-plugins demo

test: $(STAMP)
	$(BIN)/ruff check .
	OMP_WAIT_POLICY=PASSIVE SFT_PLUGINS_STRICT_SKIPS=1 SFT_PLUGINS_DEEPSPEED_PATH=$(DEEPSPEED) \
		$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
