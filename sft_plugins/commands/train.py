"""``sft-plugins train``: every ``TrainingArguments`` flag, plus model, data and plugin flags.

Flags are parsed by ``transformers.HfArgumentParser``, so they are spelled as in the Hugging Face
example scripts (``--model_name_or_path``, ``--output_dir``, ``--learning_rate``, ...). Plugin
options follow their plugin's flag: ``--perturber neftune --perturber_alpha 5``,
``--collator prompt-weighted --collator_prompt_loss_weight 0.05``; their types come from the
plugin's constructor. A config file, ``run.yaml`` (or ``.yml``, ``.json``) as the first argument
or ``--config run.yaml`` anywhere, supplies any of these; flags given on the command line win.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import yaml
from rich.console import Console
from rich.table import Table

from sft_plugins.arguments import (
    DataArguments,
    ModelArguments,
    PluginArguments,
    check_arguments,
)
from sft_plugins.checkpoints import resolve_checkpoint
from sft_plugins.errors import ConfigError

PLUGIN_KINDS = ("template", "collator", "perturber")


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
"""A first argument with one of these names is a config file, as in the Hugging Face example
scripts (``sft-plugins train run.yaml``); ``--config FILE`` names one anywhere."""


def config_to_argv(path: str) -> list[str]:
    """A YAML or JSON config file as command-line flags (which later flags override)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        text = file.read_text(encoding="utf-8")
        values = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start}); save it as UTF-8") from None
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


def split_config(argv: Sequence[str]) -> tuple[list[str], tuple[str, list[str]] | None]:
    """``argv`` with its config file (a first argument named ``*.yaml``, ``*.yml`` or
    ``*.json``, or ``--config FILE``) replaced by the file's flags, placed first; and the file
    with its flags, or ``None``."""
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        if not argv[0].endswith(CONFIG_SUFFIXES):
            raise ConfigError(f"unexpected argument {argv[0]!r}: flags start with --, and a "
                              "config file (the first argument, or --config FILE) is named "
                              f"{', '.join('*' + s for s in CONFIG_SUFFIXES)}")
        path = argv.pop(0)
    else:
        flag = next((f for f in ("--config", "-c") if f in argv), None)
        if flag is None:
            return argv, None
        at = argv.index(flag)
        if at + 1 >= len(argv):
            raise ConfigError(f"{flag} needs a file name")
        path = argv[at + 1]
        del argv[at:at + 2]
    from_file = config_to_argv(path)
    return from_file + argv, (path, from_file)


def _in_config_file(error: ConfigError, config: tuple[str, list[str]] | None,
                    argv: Sequence[str]) -> ConfigError:
    """``error``, naming the config file when the flag it names was set there (and not on the
    command line, which wins)."""
    named = _FLAG.search(str(error))
    if config is None or named is None:
        return error
    path, from_file = config
    flag = _flag_key(named.group(0))
    given = {_flag_key(a) for a in argv if a.startswith("--")}
    if flag in given or flag not in {_flag_key(a) for a in from_file if a.startswith("--")}:
        return error
    return ConfigError(f"{path}: {error}")


_FLAG = re.compile(r"--[A-Za-z0-9][A-Za-z0-9_-]*")
_DISTRIBUTION = re.compile(r"The '([^']+)' distribution was not found")
"""How transformers names a package that a flag needs and that is missing."""


def _flag_key(flag: str) -> str:
    """``--learning-rate`` and ``--learning_rate`` are one flag."""
    return flag[2:].replace("-", "_")


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


def _parser() -> Any:
    from transformers import HfArgumentParser, TrainingArguments

    class Parser(HfArgumentParser):
        """argparse's own errors become one line naming the flag (no usage block), and flags
        are never abbreviated: ``--learning_rat`` is an error, not ``--learning_rate``."""

        def error(self, message: str) -> typing.NoReturn:
            raise ConfigError(message)

    return Parser((ModelArguments, DataArguments, PluginArguments, TrainingArguments),
                  prog="sft-plugins train", allow_abbrev=False,
                  description="A config file (run.yaml, .yml or .json) as the first argument, or "
                              "--config FILE, supplies any of these flags as keys; flags on the "
                              "command line win.")


def parse(argv: Sequence[str]) -> tuple[Any, ...]:
    """(model, data, plugin, training arguments, plugin options by kind) from ``argv``."""
    flags, config = split_config(argv)
    try:
        try:
            model_args, data_args, plugin_args, training_args, remaining = \
                _parser().parse_args_into_dataclasses(args=flags, return_remaining_strings=True)
        except (ValueError, TypeError) as exc:  # TrainingArguments.__post_init__'s own checks
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"invalid training arguments: {exc}") from None
        except ImportError as exc:  # a flag whose package is missing: --deepspeed, say
            missing = _DISTRIBUTION.search(str(exc))
            raise ConfigError("invalid training arguments: " + (
                f"they need {missing.group(1)}, which is not installed: pip install "
                f"'{missing.group(1)}'" if missing else str(exc))) from None
        check_arguments(model_args, data_args, plugin_args, training_args)
        options = plugin_options(remaining)
    except ConfigError as exc:
        raise _in_config_file(exc, config, argv) from None
    # resolved here, before anything loads; the trainer is then given the directory itself
    training_args.resume_from_checkpoint = resolve_checkpoint(
        training_args.resume_from_checkpoint, training_args.output_dir,
        accept_incomplete=plugin_args.resume_incomplete)
    return model_args, data_args, plugin_args, training_args, options


def run(argv: Sequence[str]) -> int:
    """Parse ``argv``, load everything (failing before any training), train, save, and print
    what happened; return the exit status (143 or 130 for a run stopped by SIGTERM or Ctrl-C
    after saving its checkpoint).

    The run's objects (the model wrapped by DDP or FSDP, the accelerator, the optimizer) are
    let go before the process group ends, which frees them (:func:`end_process_group`)."""
    from sft_plugins.processes import end_process_group
    from sft_plugins.training import train_from_arguments

    try:
        outcome = train_from_arguments(*parse(argv))
        if outcome.trainer.is_world_process_zero():
            report(outcome)
        exit_status = outcome.exit_status
        del outcome
    finally:  # a launched rank ends its process group itself, whatever happened
        end_process_group()
    return exit_status


def report(outcome: Any) -> None:
    """Print how the run ended: a table of what was trained, or why nothing was."""
    trainer, output_dir = outcome.trainer, outcome.trainer.args.output_dir
    console = Console(stderr=True)
    if outcome.outcome == "already_finished":
        console.print(f"nothing to train: the checkpoint resumed from is at step "
                      f"{outcome.steps}, where this run ends; {output_dir} is left as it was",
                      highlight=False)
        return
    if outcome.outcome == "stopped_by_signal":
        by = "Ctrl-C (SIGINT)" if outcome.stopped_by == signal.SIGINT else "SIGTERM"
        console.print(f"stopped by {by} after step {outcome.stopped_at}: "
                      f"checkpoint-{outcome.stopped_at} is saved in {output_dir}; run the same "
                      "command with --resume_from_checkpoint true to continue", highlight=False)
        return
    template = trainer.chat_template
    table = Table(title="sft-plugins train", title_justify="left", show_header=False)
    table.add_row("template", template.name if template else "none (plain text)")
    table.add_row("collator", trainer.collator.name)
    table.add_row("perturber", trainer.perturber.name if trainer.perturber else "none")
    table.add_row("examples", str(outcome.examples))
    if trainer.packer is not None:
        packed = trainer.packer.report()
        table.add_row("packed rows", f"{packed.rows} ({packed.fill:.1%} full, streamed)")
    elif trainer.packing:
        table.add_row("packed rows", str(len(trainer.train_dataset)))
    if trainer.stream_sharing.get("train") is not None:
        skipped = trainer.data_summary.skipped_total if trainer.data_summary else 0
        table.add_row("streamed", f"{skipped} skipped (data_summary.json)")
    table.add_row("steps", str(outcome.steps))
    table.add_row("final training loss", f"{outcome.training_loss:.4f}")
    table.add_row("saved to", str(output_dir))
    console.print(table)


@click.command("train", context_settings={"ignore_unknown_options": True,
                                          "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def train_command(ctx: click.Context) -> None:
    """Fine-tune a model: every TrainingArguments flag, plus model, data and plugin flags
    (--help lists them all)."""
    if any(a in ("-h", "--help") for a in ctx.args):
        _parser().print_help()
        return
    exit_status = run(ctx.args)
    if exit_status:
        sys.exit(exit_status)
