"""``sft-plugins train``: every ``TrainingArguments`` flag, plus model, data and plugin flags.

Flags are parsed by ``transformers.HfArgumentParser``, so they are spelled as in the Hugging Face
example scripts (``--model_name_or_path``, ``--output_dir``, ``--learning_rate``, ...). Plugin
options follow their plugin's flag: ``--perturber neftune --perturber_alpha 5``,
``--collator prompt-weighted --collator_prompt_loss_weight 0.05``; their types come from the
plugin's constructor. ``--config file.yaml`` (or ``.json``) supplies any of these; flags given on
the command line win.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import yaml

from sft_plugins.arguments import DataArguments, ModelArguments, PluginArguments
from sft_plugins.checkpoints import resolve_checkpoint
from sft_plugins.errors import SFTPluginsError

PLUGIN_KINDS = ("template", "collator", "perturber")


class ConfigError(SFTPluginsError, ValueError):
    """The command line or the config file asks for something that cannot be done."""


def config_to_argv(path: str) -> list[str]:
    """A YAML or JSON config file as command-line flags (which later flags override)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        text = file.read_text()
        values = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path!r} is not valid {file.suffix[1:] or 'YAML'}: "
                          f"{exc}") from exc
    if not isinstance(values, Mapping):
        raise ConfigError(f"config file {path!r} must hold a mapping of flag names to values")
    argv: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, list):
            argv += [str(v) for v in value]
        elif isinstance(value, bool):
            argv.append("true" if value else "false")
        elif isinstance(value, Mapping):
            argv.append(json.dumps(value))
        else:
            argv.append(str(value))
    return argv


def split_config(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--config FILE`` replaced by the file's flags, placed first."""
    argv = list(argv)
    for flag in ("--config", "-c"):
        if flag in argv:
            at = argv.index(flag)
            if at + 1 >= len(argv):
                raise ConfigError(f"{flag} needs a file name")
            path = argv[at + 1]
            del argv[at:at + 2]
            return config_to_argv(path) + argv
    return argv


def plugin_options(remaining: Sequence[str]) -> dict[str, dict[str, str]]:
    """``--<kind>_<option> value`` flags (kind: template, collator, perturber) by kind."""
    options: dict[str, dict[str, str]] = {kind: {} for kind in PLUGIN_KINDS}
    items = list(remaining)
    while items:
        flag = items.pop(0)
        key = flag[2:].replace("-", "_") if flag.startswith("--") else ""
        kind = next((k for k in PLUGIN_KINDS if key.startswith(k + "_")), None)
        if kind is None:
            raise ConfigError(f"unknown flag {flag!r}; see sft-plugins train --help, and "
                              "--<template|collator|perturber>_<option> for plugin options")
        if not items or items[0].startswith("--"):
            raise ConfigError(f"{flag} needs a value")
        options[kind][key[len(kind) + 1:]] = items.pop(0)
    return options


def _convert(raw: str, annotation: Any, default: Any, where: str) -> Any:
    target = annotation if isinstance(annotation, type) else None
    if target is None:  # Optional[X] and friends: the first concrete type
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        target = args[0] if args and isinstance(args[0], type) else None
    if target is None and default is not None and default is not inspect.Parameter.empty:
        target = type(default)
    if raw.lower() in ("none", "null") and (default is None or type(None) in
                                            typing.get_args(annotation)):
        return None
    try:
        if target is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if target in (int, float):
            return target(raw)
    except ValueError:
        raise ConfigError(f"{where}: {raw!r} is not a {target.__name__}") from None
    return raw


def typed_options(factory: Any, raw: Mapping[str, str], where: str) -> dict[str, Any]:
    """Plugin options from strings to the types the plugin's constructor declares."""
    try:
        hints = typing.get_type_hints(getattr(factory, "__init__", factory))
    except Exception:  # unresolvable annotations: fall back to the defaults' types
        hints = {}
    parameters = inspect.signature(factory).parameters
    typed: dict[str, Any] = {}
    for name, value in raw.items():
        parameter = parameters.get(name)
        default = parameter.default if parameter is not None else None
        typed[name] = _convert(value, hints.get(name), default, f"{where}_{name}")
    return typed


def _positive(value: float | None) -> bool:
    return value is not None and value > 0


def check_arguments(model_args: Any, data_args: Any, plugin_args: Any,
                    training_args: Any) -> None:
    """Refuse, before anything is loaded, values that transformers accepts and then trains
    wrongly with or crashes on (``--num_train_epochs 0`` saving an untrained model, a zero batch
    size dividing by zero at step 1, ...). Each error names the flag."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    args = training_args
    if args.max_steps == 0 or args.max_steps < -1:
        raise ConfigError(f"--max_steps {args.max_steps}: give a positive number of steps, or "
                          "-1 to train --num_train_epochs")
    if args.max_steps == -1 and not _positive(args.num_train_epochs):
        raise ConfigError(f"--num_train_epochs {args.num_train_epochs}: nothing would be "
                          "trained; give a positive number of epochs (or --max_steps)")
    if args.learning_rate < 0:
        raise ConfigError(f"--learning_rate {args.learning_rate}: a negative learning rate "
                          "climbs the loss; give a positive one")
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    for flag, strategy in (("save_steps", "save_strategy"), ("logging_steps", "logging_strategy"),
                           ("eval_steps", "eval_strategy")):
        value, every = getattr(args, flag), getattr(args, strategy)
        if getattr(every, "value", every) == "steps" and value is not None \
                and not _positive(value):
            raise ConfigError(f"--{flag} {value}: with --{strategy} steps it must be a "
                              "positive number of steps (or a fraction of training below 1)")
    unknown = [name for name in args.report_to or []
               if name not in ("all", "none") and name not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise ConfigError(f"--report_to {' '.join(unknown)}: unknown; use none, all or some of "
                          f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
    if plugin_args.logits_chunk_size < 1:
        raise ConfigError(f"--logits_chunk_size {plugin_args.logits_chunk_size}: must be at "
                          "least 1")
    if plugin_args.max_length is not None and plugin_args.max_length < 1:
        raise ConfigError(f"--max_length {plugin_args.max_length}: must be at least 1")
    _check_output_dir(Path(args.output_dir))


def _check_output_dir(out: Path) -> None:
    """--output_dir must be a directory this process can create or write into."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} is a file; give a directory")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--output_dir {out}: {existing} is not writable by this user; give a "
                          "directory you can write to")


def _parser() -> Any:
    from transformers import HfArgumentParser, TrainingArguments

    class Parser(HfArgumentParser):
        """argparse's own errors become one line naming the flag (no usage block), and flags
        are never abbreviated: ``--learning_rat`` is an error, not ``--learning_rate``."""

        def error(self, message: str) -> typing.NoReturn:
            raise ConfigError(message)

    return Parser((ModelArguments, DataArguments, PluginArguments, TrainingArguments),
                  prog="sft-plugins train", allow_abbrev=False)


def parse(argv: Sequence[str]) -> tuple[Any, ...]:
    """(model, data, plugin, training arguments, plugin options by kind) from ``argv``."""
    try:
        model_args, data_args, plugin_args, training_args, remaining = \
            _parser().parse_args_into_dataclasses(args=split_config(argv),
                                                  return_remaining_strings=True)
    except (ValueError, TypeError) as exc:  # TrainingArguments.__post_init__'s own checks
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"invalid training arguments: {exc}") from None
    check_arguments(model_args, data_args, plugin_args, training_args)
    # resolved here, before anything loads; the trainer is then given the directory itself
    training_args.resume_from_checkpoint = resolve_checkpoint(
        training_args.resume_from_checkpoint, training_args.output_dir,
        accept_incomplete=plugin_args.resume_incomplete)
    return model_args, data_args, plugin_args, training_args, plugin_options(remaining)


def run(argv: Sequence[str]) -> Any:
    """Parse ``argv``, load everything (failing before any training), train, save. A run
    stopped by SIGTERM (after saving its checkpoint) exits with 143."""
    from sft_plugins.preemption import EXIT_STATUS
    from sft_plugins.training import train_from_arguments

    trainer = train_from_arguments(*parse(argv))
    if trainer.sigterm.stopped_at is not None:
        sys.exit(EXIT_STATUS)
    return trainer


@click.command("train", context_settings={"ignore_unknown_options": True,
                                          "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def train_command(ctx: click.Context) -> None:
    """Fine-tune a model: every TrainingArguments flag, plus model, data and plugin flags
    (--help lists them all)."""
    if any(a in ("-h", "--help") for a in ctx.args):
        _parser().print_help()
        return
    run(ctx.args)
