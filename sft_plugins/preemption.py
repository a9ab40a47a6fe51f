"""Saving a checkpoint when the job is told to stop.

Schedulers ask a job to stop with SIGTERM before they kill it (SLURM preemption and time limits,
Kubernetes eviction, spot instances reclaimed), then wait a grace period. Python's default
SIGTERM ends the process at once, losing everything since the last checkpoint. Here SIGTERM
only raises a flag; at the end of the current optimizer step every rank learns whether any rank
got it (one all-reduce), and if one did they all save a checkpoint together and stop. The grace
period must cover one step and one save.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

EXIT_STATUS = 128 + signal.SIGTERM
"""What the command exits with after saving: the conventional status of a SIGTERM, so that a
scheduler (or a Kubernetes Job) sees an interrupted run, not a finished one."""


class SaveOnSigterm(TrainerCallback):
    """Turns SIGTERM into "save a checkpoint after this step, then stop training".

    ``any_rank(flag)`` says whether ``flag`` is true on any data-parallel rank (the trainer
    passes an all-reduce; one process needs none). The handler is installed by
    :meth:`install` (only the main thread may install one) and removed by :meth:`remove`,
    which puts the previous handler back.
    """

    def __init__(self, any_rank: Callable[[bool], bool]) -> None:
        self.any_rank = any_rank
        self.received = False
        self.stopped_at: int | None = None
        self._previous: Any = None
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)
            self._installed = True

    def remove(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = True

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        if self.any_rank(self.received):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step


__all__ = ["EXIT_STATUS", "SaveOnSigterm"]
