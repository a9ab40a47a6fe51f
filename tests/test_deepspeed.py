"""DeepSpeed ZeRO-3 through ``sft-plugins train --deepspeed``, on DeepSpeed's CPU accelerator.

One process under ``torchrun`` (DeepSpeed on the CPU cannot join two processes that the Trainer
sees: docs/training.md says why, and ``benchmarks/gpu_check.py`` runs the same check on a GPU):
the ZeRO-3 engine trains, its losses equal those of the same run without DeepSpeed, its
checkpoint is DeepSpeed's own (partitioned) one, and resuming from it reaches the same losses.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from benchmarks.gpu_check import deepspeed_check

DEEPSPEED_PATH = os.environ.get("SFT_PLUGINS_DEEPSPEED_PATH")
"""Where ``make install`` puts DeepSpeed: outside the venv, since transformers imports an
installed DeepSpeed into every training run, and on the path of this test's processes only."""


def test_zero3_trains_like_one_process_and_its_checkpoint_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if DEEPSPEED_PATH:  # for the training processes only, not this one
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
            p for p in (str(Path(DEEPSPEED_PATH).resolve()), os.environ.get("PYTHONPATH")) if p))
    found = DEEPSPEED_PATH and (Path(DEEPSPEED_PATH) / "deepspeed").is_dir()
    if not found and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed: make install puts it in .venv/deepspeed, or "
                    "pip install 'sft-plugins[deepspeed]'")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    result = deepspeed_check(tmp_path)
    assert "error" not in result, result
    assert len(result["zero3_losses"]) == 4
    assert result["losses_equal"], result
    assert result["resume_equal"], result
    checkpoint = tmp_path / "deepspeed" / "zero3" / "checkpoint-2"
    partitions = list(checkpoint.glob("global_step2/*optim_states.pt"))
    assert partitions, f"no DeepSpeed ZeRO checkpoint in {checkpoint}: {list(checkpoint.iterdir())}"
