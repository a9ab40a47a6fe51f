"""Saving a checkpoint when the job is told to stop.

Schedulers ask a job to stop with SIGTERM before they kill it (SLURM preemption and time limits,
Kubernetes eviction, spot instances reclaimed), then wait a grace period. Python's default
SIGTERM ends the process at once, losing everything since the last checkpoint; its default
SIGINT (Ctrl-C) raises ``KeyboardInterrupt`` wherever the process is, in the middle of a save
too. Here either signal only raises a flag; at the end of the current optimizer step every rank
learns whether any rank got one (one all-reduce), and if one did they all save a checkpoint
together and stop. The grace period must cover one step and one save. Whoever presses Ctrl-C
and cannot wait for that presses it again: the second one interrupts at once, as usual.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from torch.utils.data import get_worker_info
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SaveOnStopSignal(TrainerCallback):
    """Turns SIGTERM and a first SIGINT into "save a checkpoint after this step, then stop
    training".

    ``most_on_any_rank(n)`` is the largest ``n`` over the data-parallel ranks (the trainer
    passes an all-reduce; one process needs none): every rank learns the signal, SIGTERM's number
    where ranks got different ones. The handlers are installed by
    :meth:`install` (only the main thread may install one) and removed by :meth:`remove`,
    which puts the previous handlers back. A first SIGINT puts the previous SIGINT handler back
    at once, so that a second one interrupts as it would have without this callback.
    """

    def __init__(self, most_on_any_rank: Callable[[int], int]) -> None:
        self.most_on_any_rank = most_on_any_rank
        self.received: signal.Signals | None = None
        """The first stop signal this process got during training."""
        self.stopped_at: int | None = None
        """The step after which the run saved and stopped (on a signal to any rank)."""
        self.stopped_by: signal.Signals | None = None
        """The signal that stopped the run, whichever rank got it."""
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._note)
                              for signum in STOP_SIGNALS}

    def remove(self) -> None:
        for signum, previous in self._previous.items():
            _restore(signum, previous)
        self._previous = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if get_worker_info() is not None:
            # a DataLoader worker, forked with this handler: a terminal's Ctrl-C reaches it
            # too, but stopping is the training process's business (and its one message)
            return
        received = signal.Signals(signum)
        self.received = self.received or received
        if received is signal.SIGINT:
            _restore(signal.SIGINT, self._previous.pop(signal.SIGINT))
            if os.environ.get("RANK", "0") == "0":  # every rank of a terminal's job gets it
                logger.warning("interrupted: saving a checkpoint at the end of this step, then "
                               "stopping; press Ctrl-C again to stop at once without saving")

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        signum = self.most_on_any_rank(self.received or 0)
        if signum:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at, self.stopped_by = state.global_step, signal.Signals(signum)


def _restore(signum: signal.Signals, previous: Any) -> None:
    """Put a handler back (``None``: one set outside Python, which cannot be put back; the
    default is the closest)."""
    signal.signal(signum, signal.SIG_DFL if previous is None else previous)


__all__ = ["SaveOnStopSignal"]
