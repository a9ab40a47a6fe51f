"""Using a registered perturber with a trainer you keep: ``transformers.Trainer`` or TRL's
``SFTTrainer``.

::

    from sft_plugins import get_plugin_manager
    from sft_plugins.callbacks import attach_perturber

    perturber = get_plugin_manager().perturbers.create("neftune", alpha=5.0)
    attach_perturber(trainer, perturber)
    trainer.train()

A Trainer callback is told when training begins and ends, but not when it raises, so
:func:`attach_perturber` also wraps that trainer's ``train`` in a ``try``/``finally`` that removes
the hooks. Passing :class:`PerturberCallback` in ``callbacks=[...]`` works too; then the hooks stay
after an exception until the next ``train()`` or :meth:`PerturberCallback.remove`.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from sft_plugins.errors import PerturberError
from sft_plugins.perturb import Perturber, PerturberHandle


class PerturberCallback(TrainerCallback):
    """Installs a perturber when training begins and removes it when training ends.

    The noise is seeded from ``seed`` (default: ``TrainingArguments.seed``), the process index and
    the global step, so resuming from a checkpoint draws the same noise. The linear alpha
    schedule runs over the Trainer's ``max_steps``.
    """

    def __init__(self, perturber: Perturber, *, seed: int | None = None) -> None:
        self.perturber = perturber
        self.seed = seed
        self.handle: PerturberHandle | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: nn.Module | None = None,
                       **kwargs: Any) -> None:
        if getattr(args, "neftune_noise_alpha", None) is not None:
            raise PerturberError(
                f"perturber {self.perturber.name!r} and transformers' own NEFTune "
                f"(neftune_noise_alpha={args.neftune_noise_alpha}) would both noise the "
                f"embeddings; set neftune_noise_alpha=None (use neftune with length='padded' "
                f"for the built-in's behaviour)"
            )
        if model is None:
            raise PerturberError(f"perturber {self.perturber.name!r}: the Trainer passed no "
                                 f"model to on_train_begin, so there is nothing to hook")
        self.remove()  # hooks left by a previous train() that raised
        self.handle = self.perturber.install(
            model, seed=args.seed if self.seed is None else self.seed,
            rank=args.process_index, total_steps=state.max_steps or None)
        self.handle.set_step(state.global_step)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState,
                      control: TrainerControl, **kwargs: Any) -> None:
        if self.handle is not None:
            self.handle.set_step(state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hooks if installed (idempotent)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def attach_perturber(trainer: Trainer, perturber: Perturber, *,
                     seed: int | None = None) -> PerturberCallback:
    """Add a :class:`PerturberCallback` to ``trainer`` and make its ``train`` remove the hooks in
    a ``finally``. Works for ``transformers.Trainer`` and its subclasses (TRL's ``SFTTrainer``)."""
    callback = PerturberCallback(perturber, seed=seed)
    trainer.add_callback(callback)
    train = trainer.train

    @functools.wraps(train)
    def train_then_remove(*args: Any, **kwargs: Any) -> Any:
        try:
            return train(*args, **kwargs)
        finally:
            callback.remove()

    trainer.train = train_then_remove  # type: ignore[method-assign]
    return callback


__all__ = ["PerturberCallback", "attach_perturber"]
