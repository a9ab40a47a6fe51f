"""A training process killed with SIGKILL at random moments while it saves checkpoints, then
resumed with --resume_from_checkpoint true: every resume succeeds and reproduces the losses of
the uninterrupted run from its step on."""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "save_every_step.py"
TRIALS = int(os.environ.get("SFT_PLUGINS_KILL_TRIALS", "5"))
"""Kill trials in the suite (each starts a process); the closing note quotes a run of 20."""


def _script():
    spec = importlib.util.spec_from_file_location("save_every_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def losses_by_step(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    trainer = _script().build(str(tmp_path_factory.mktemp("whole")))
    trainer.train()
    return losses_by_step(trainer)


def kill_while_saving(out: Path, rng: random.Random) -> int:
    """Start the saving process, wait for its first complete checkpoint, kill it at a random
    moment after; returns how many checkpoint directories it had started."""
    process = subprocess.Popen([sys.executable, str(SCRIPT), str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(SCRIPT.parents[2])})
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-1" / "sft_plugins_complete.json").exists():
        assert process.poll() is None, "the process ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.6))
    process.send_signal(signal.SIGKILL)
    process.wait()
    return len(list(out.glob("checkpoint-*")))


@pytest.mark.slow
def test_resumes_after_sigkill_during_saving_reproduce_the_uninterrupted_losses(
        tmp_path, reference):
    from sft_plugins.checkpoints import newest_complete

    script = _script()
    rng = random.Random(int(os.environ.get("SFT_PLUGINS_KILL_SEED", "0")))
    torn = 0
    for trial in range(TRIALS):
        out = tmp_path / f"trial-{trial}"
        kill_while_saving(out, rng)
        torn += bool(newest_complete(out)[1])
        resumed = script.build(str(out))
        resumed.train(resume_from_checkpoint=True)
        assert resumed.state.global_step == script.STEPS, trial
        got = losses_by_step(resumed)
        assert got == pytest.approx(reference, rel=1e-5), (trial, got, reference)
    print(f"{TRIALS} kills, {torn} inside a save (newest checkpoint incomplete), "
          f"{TRIALS} resumes reproduced the uninterrupted losses")
