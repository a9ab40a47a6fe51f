"""One training run from parsed arguments: what ``sft-plugins train`` does, usable from Python.

Everything that can be checked is checked before the model is loaded or a step is taken: the
template (named, detected, or the tokenizer's own), the plugin names and options, the data (every
example validated), the model flags.
"""

from __future__ import annotations

import logging
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from sft_plugins.arguments import DataArguments, ModelArguments, PluginArguments
from sft_plugins.commands.train import ConfigError, typed_options
from sft_plugins.data import load_sft_dataset, parse_column_map
from sft_plugins.errors import TemplateError
from sft_plugins.manager import PluginManager, get_plugin_manager
from sft_plugins.modeling import load_model, load_tokenizer
from sft_plugins.templates import ChatTemplate
from sft_plugins.trainer import SFTPluginTrainer, with_variables

logger = logging.getLogger(__name__)


def _check_template_tokens(template: ChatTemplate, tokenizer: Any) -> None:
    vocabulary = tokenizer.get_vocab()
    missing = [t for t in template.special_tokens if t not in vocabulary]
    if missing:
        raise TemplateError(
            f"chat template {template.name!r} uses special tokens the tokenizer does not have: "
            f"{', '.join(missing)}. Pick the template of this model's family (--template), or "
            "a tokenizer that has them")


def train_from_arguments(model_args: ModelArguments, data_args: DataArguments,
                         plugin_args: PluginArguments, training_args: Any,
                         options: dict[str, dict[str, str]],
                         manager: PluginManager | None = None) -> SFTPluginTrainer:
    """Load, validate, train and save; return the trainer (its ``state`` has the history)."""
    console = Console(stderr=True)
    manager = manager or get_plugin_manager()
    tokenizer = load_tokenizer(model_args)
    template = manager.resolve_template(plugin_args.template, tokenizer)
    if template is not None:
        if options["template"]:  # template variables: YAML scalars (true, 5, 26 Jul 2024)
            template = with_variables(template, {k: yaml.safe_load(v)
                                                 for k, v in options["template"].items()})
        _check_template_tokens(template, tokenizer)
    elif options["template"]:
        raise ConfigError("template options were given but no template is in use")

    data = load_sft_dataset(
        data_args.dataset, format=data_args.dataset_format,
        column_map=parse_column_map(data_args.column_map), template=template,
        on_bad_example=data_args.on_bad_example,  # type: ignore[arg-type]
        eval_dataset=data_args.eval_dataset, eval_split_ratio=data_args.eval_split_ratio,
        seed=training_args.seed, num_proc=data_args.dataset_num_proc)
    if data.kind != "text" and template is None:
        source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
        raise TemplateError(
            f"the tokenizer of {source!r} has no chat template and --template was not given; "
            "name one "
            f"({', '.join(manager.templates.names())})")

    prompt_completion = "completion_index" in data.train.column_names and any(
        i is not None for i in data.train.select(range(min(len(data.train), 100)))[
            "completion_index"])
    collator_name = plugin_args.collator or (
        "all-tokens" if data.kind == "text" else
        "completion-only" if prompt_completion else "assistant-only")
    collator_cls = manager.collators.get(collator_name)
    collator_options = typed_options(collator_cls, options["collator"], "--collator")
    if plugin_args.max_length is not None:
        collator_options.setdefault("max_length", plugin_args.max_length)
    perturber_options: dict[str, Any] = {}
    if plugin_args.perturber:
        perturber_cls = manager.perturbers.get(plugin_args.perturber)
        perturber_options = typed_options(perturber_cls, options["perturber"], "--perturber")
    elif options["perturber"]:
        raise ConfigError("perturber options were given without --perturber")
    if plugin_args.packing and plugin_args.max_length is None:
        raise ConfigError("--packing needs --max_length, the length of a packed row in tokens")
    collator = manager.collators.create(collator_name, **collator_options)
    perturber = (manager.perturbers.create(plugin_args.perturber, **perturber_options)
                 if plugin_args.perturber else None)

    if training_args.gradient_checkpointing and not training_args.gradient_checkpointing_kwargs:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    model = load_model(model_args, bf16=training_args.bf16, fp16=training_args.fp16,
                       gradient_checkpointing=training_args.gradient_checkpointing)
    trainer = SFTPluginTrainer(
        model=model, args=training_args, train_dataset=data.train, eval_dataset=data.eval,
        processing_class=tokenizer, template=template, collator=collator, perturber=perturber,
        plugin_manager=manager, dataset_num_proc=data_args.dataset_num_proc,
        logits_chunk_size=plugin_args.logits_chunk_size, packing=plugin_args.packing,
        packing_max_length=plugin_args.max_length, resume_incomplete=plugin_args.resume_incomplete)
    # written once everything has loaded, so a run that fails before training leaves an earlier
    # run's output directory as it was
    if data_args.on_bad_example == "skip" and trainer.args.should_save:
        data.summary.write_json(training_args.output_dir)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if trainer.finished_before_start:
        if trainer.is_world_process_zero():
            console.print(f"nothing to train: the checkpoint resumed from is at step "
                          f"{result.global_step}, where this run ends; {training_args.output_dir}"
                          " is left as it was", highlight=False)
        return trainer
    if trainer.sigterm.stopped_at is not None:
        if trainer.is_world_process_zero():
            console.print(f"stopped by SIGTERM after step {trainer.sigterm.stopped_at}: "
                          f"checkpoint-{trainer.sigterm.stopped_at} is saved in "
                          f"{training_args.output_dir}; run the same command with "
                          "--resume_from_checkpoint true to continue", highlight=False)
        return trainer
    trainer.save_model()
    if trainer.args.should_save:
        trainer.save_state()
    if not trainer.is_world_process_zero():
        return trainer
    table = Table(title="sft-plugins train", title_justify="left", show_header=False)
    table.add_row("template", template.name if template else "none (plain text)")
    table.add_row("collator", collator.name)
    table.add_row("perturber", perturber.name if perturber else "none")
    table.add_row("examples", str(trainer.preparation["train"].kept
                                  if "train" in trainer.preparation else len(data.train)))
    if plugin_args.packing:
        table.add_row("packed rows", str(len(trainer.train_dataset)))
    table.add_row("steps", str(trainer.state.global_step))
    table.add_row("final training loss", f"{result.training_loss:.4f}")
    table.add_row("saved to", str(training_args.output_dir))
    console.print(table)
    return trainer


__all__ = ["train_from_arguments"]
