"""One training run from parsed arguments: what ``sft-plugins train`` does, usable from Python.

Everything that can be checked is checked before the model is loaded or a step is taken: the
arguments, the template (named, detected, or the tokenizer's own), the plugin names and options,
the data (every example validated). The run's outcome comes back as a :class:`TrainingRun`; the
caller reports it (the command line prints it).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any, Literal

from sft_plugins.arguments import (
    DataArguments,
    ModelArguments,
    PluginArguments,
    check_arguments,
)
from sft_plugins.data import SFTData, load_sft_dataset, parse_column_map
from sft_plugins.errors import ConfigError, TemplateError
from sft_plugins.given_data import default_collator_name
from sft_plugins.manager import PluginManager, get_plugin_manager
from sft_plugins.masking import MaskingCollator
from sft_plugins.modeling import load_model, load_tokenizer
from sft_plugins.options import parse_variables
from sft_plugins.perturb import Perturber
from sft_plugins.trainer import SFTPluginTrainer

Outcome = Literal["trained", "already_finished", "stopped_by_signal"]


@dataclass
class TrainingRun:
    """What one run did: the trainer (its ``state`` has the history) and how it ended."""

    trainer: SFTPluginTrainer
    outcome: Outcome
    """``trained``: to the end, model saved; ``already_finished``: the checkpoint resumed from
    was at the last step, nothing was trained or written; ``stopped_by_signal``: SIGTERM or
    Ctrl-C (:attr:`stopped_by`) stopped it, a checkpoint was saved at
    :attr:`stopped_at` and the run can be resumed."""
    training_loss: float
    data: SFTData

    @property
    def steps(self) -> int:
        return self.trainer.state.global_step

    @property
    def stopped_at(self) -> int | None:
        return self.trainer.stop_signals.stopped_at

    @property
    def stopped_by(self) -> signal.Signals | None:
        """SIGTERM or SIGINT, whichever rank got it."""
        return self.trainer.stop_signals.stopped_by

    @property
    def exit_status(self) -> int:
        """What the command exits with: 0, or after a stop by a signal (and its checkpoint)
        the signal's conventional status, 143 for SIGTERM and 130 for SIGINT, so that a
        scheduler (or a Kubernetes Job) sees an interrupted run, not a finished one."""
        return 0 if self.stopped_by is None else 128 + self.stopped_by

    @property
    def examples(self) -> int:
        """Training examples kept by preparation (of a stream: those labelled, one pass at
        most, as far as training read it)."""
        report = self.trainer.preparation.get("train")
        return report.kept if report is not None else len(self.data.train)  # type: ignore[arg-type]


def train_from_arguments(model_args: ModelArguments, data_args: DataArguments,
                         plugin_args: PluginArguments, training_args: Any,
                         options: dict[str, dict[str, str]],
                         manager: PluginManager | None = None) -> TrainingRun:
    """Check, load, train and save; ``options`` are the plugin options as text, by kind
    (``{"template": {...}, "collator": {...}, "perturber": {...}}``)."""
    check_arguments(model_args, data_args, plugin_args, training_args)
    trainer, data = build_trainer(model_args, data_args, plugin_args, training_args, options,
                                  manager or get_plugin_manager())
    return run(trainer, data)


def build_trainer(model_args: ModelArguments, data_args: DataArguments,
                  plugin_args: PluginArguments, training_args: Any,
                  options: dict[str, dict[str, str]], manager: PluginManager
                  ) -> tuple[SFTPluginTrainer, SFTData]:
    """The trainer of a run, with its data loaded and prepared; nothing trained yet. Plugins
    named on the command line are built first, so that a bad option value stops the run before
    anything loads."""
    perturber = _perturber(manager, plugin_args, options["perturber"])
    collator = None if plugin_args.collator is None else \
        _collator(manager, plugin_args.collator, plugin_args, data_args, options["collator"])
    tokenizer = load_tokenizer(model_args)
    template = manager.resolve_template(plugin_args.template, tokenizer,
                                        parse_variables(options["template"]))
    if template is not None:
        template.check_tokens(tokenizer)
    data = load_sft_dataset(
        data_args.dataset, format=data_args.dataset_format,
        column_map=parse_column_map(data_args.column_map), template=template,
        on_bad_example=data_args.on_bad_example,  # type: ignore[arg-type]
        eval_dataset=data_args.eval_dataset, eval_split_ratio=data_args.eval_split_ratio,
        seed=training_args.seed, num_proc=data_args.dataset_num_proc,
        streaming=data_args.streaming)
    if data.kind != "text" and template is None:
        source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
        raise TemplateError(f"the tokenizer of {source!r} has no chat template and --template "
                            f"was not given; name one ({', '.join(manager.templates.names())})")
    if collator is None:  # the data's kind picks it
        collator = _collator(manager, default_collator_name(data.train), plugin_args, data_args,
                             options["collator"])
    if training_args.gradient_checkpointing and not training_args.gradient_checkpointing_kwargs:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    model = load_model(model_args, bf16=training_args.bf16, fp16=training_args.fp16,
                       gradient_checkpointing=training_args.gradient_checkpointing)
    trainer = SFTPluginTrainer(
        model=model, args=training_args, train_dataset=data.train, eval_dataset=data.eval,
        processing_class=tokenizer, template=template, collator=collator, perturber=perturber,
        plugin_manager=manager, dataset_num_proc=data_args.dataset_num_proc,
        logits_chunk_size=plugin_args.logits_chunk_size, packing=plugin_args.packing,
        packing_max_length=plugin_args.max_length, resume_incomplete=plugin_args.resume_incomplete,
        data_summary=data.summary, **_packing_buffer(plugin_args))
    return trainer, data


def _packing_buffer(plugin_args: PluginArguments) -> dict[str, int]:
    buffer = plugin_args.packing_buffer
    return {} if buffer is None else {"packing_buffer_size": buffer}


def _collator(manager: PluginManager, name: str, plugin_args: PluginArguments,
              data_args: DataArguments, raw: dict[str, str]) -> MaskingCollator:
    defaults: dict[str, Any] = {"on_bad_example": data_args.on_bad_example}
    if plugin_args.max_length is not None:
        defaults["max_length"] = plugin_args.max_length
    return manager.collators.create_from_text(name, raw, "--collator_{name}", **defaults)


def _perturber(manager: PluginManager, plugin_args: PluginArguments,
               raw: dict[str, str]) -> Perturber | None:
    if not plugin_args.perturber:
        if raw:
            raise ConfigError("perturber options were given without --perturber")
        return None
    return manager.perturbers.create_from_text(plugin_args.perturber, raw, "--perturber_{name}")


def run(trainer: SFTPluginTrainer, data: SFTData) -> TrainingRun:
    """Train (resuming as ``args.resume_from_checkpoint`` says) and save the model and state."""
    args = trainer.args
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if trainer.finished_before_start:
        return TrainingRun(trainer, "already_finished", result.training_loss, data)
    if trainer.stop_signals.stopped_at is not None:
        return TrainingRun(trainer, "stopped_by_signal", result.training_loss, data)
    trainer.save_model()
    if args.should_save:
        trainer.save_state()
    return TrainingRun(trainer, "trained", result.training_loss, data)


__all__ = ["TrainingRun", "build_trainer", "run", "train_from_arguments"]
