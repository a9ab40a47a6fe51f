"""SIGTERM and Ctrl-C during training: noted, agreed on by the ranks at the end of the step, and a
second Ctrl-C interrupts at once. (The whole runs, saved and resumed, are in test_train_cli.py
and test_distributed.py.)"""

from __future__ import annotations

import logging
import os
import signal
from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from sft_plugins.preemption import SaveOnStopSignal
from sft_plugins.training import TrainingRun


@pytest.fixture
def callback():
    callback = SaveOnStopSignal(lambda value: value)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    callback.install()
    yield callback
    callback.remove()
    assert {s: signal.getsignal(s) for s in before} == before


def step_end(callback, tmp_path, step=7):
    control = TrainerControl()
    state = TrainerState()
    state.global_step = step
    callback.on_step_end(TrainingArguments(str(tmp_path), report_to=[]), state, control)
    return control


def test_no_signal_no_stop(callback, tmp_path):
    control = step_end(callback, tmp_path)
    assert not control.should_save and not control.should_training_stop
    assert callback.stopped_at is None and callback.stopped_by is None


def test_a_first_ctrl_c_saves_at_the_step_end_and_a_second_interrupts(callback, caplog,
                                                                      tmp_path):
    with caplog.at_level(logging.WARNING, logger="sft_plugins.preemption"):
        os.kill(os.getpid(), signal.SIGINT)
    assert callback.received is signal.SIGINT
    assert "saving a checkpoint at the end of this step" in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    control = step_end(callback, tmp_path)
    assert control.should_save and control.should_training_stop
    assert (callback.stopped_at, callback.stopped_by) == (7, signal.SIGINT)
    assert run_with(callback).exit_status == 130


def test_sigterm_stays_caught_however_often_it_comes(callback, tmp_path):
    for _ in range(3):
        os.kill(os.getpid(), signal.SIGTERM)
    assert callback.received is signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == callback._note
    step_end(callback, tmp_path)
    assert callback.stopped_by is signal.SIGTERM and run_with(callback).exit_status == 143


def test_a_run_no_signal_stopped_exits_with_0(callback, tmp_path):
    step_end(callback, tmp_path)
    assert callback.stopped_by is None and run_with(callback).exit_status == 0


def run_with(callback: SaveOnStopSignal) -> TrainingRun:
    """A run whose trainer holds ``callback`` (nothing else of it is read)."""
    trainer = SimpleNamespace(stop_signals=callback)
    return TrainingRun(trainer, "trained", 0.0, None)  # type: ignore[arg-type]


def test_every_rank_learns_the_signal_another_rank_got(tmp_path):
    """This rank got nothing; another got SIGINT, a third SIGTERM: all stop, as by SIGTERM."""
    seen = []

    def most_on_any_rank(value):
        seen.append(value)
        return max(value, signal.SIGINT, signal.SIGTERM)

    callback = SaveOnStopSignal(most_on_any_rank)
    control = step_end(callback, tmp_path, step=3)
    assert seen == [0]
    assert control.should_save and (callback.stopped_at, callback.stopped_by) == (
        3, signal.SIGTERM)
