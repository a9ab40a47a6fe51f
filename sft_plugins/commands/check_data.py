"""``sft-plugins check-data``: load and validate a data set exactly as training would, no model.

Every example is read, converted to canonical form and checked (the generic rules, and the chat
template's own with ``--template``). With ``--tokenizer DIR`` every example is also labelled by
the collator training would use (``--collator``, default as in training; ``-c`` options,
``--max_length``), with the function training uses, and what labelling would skip (too long,
nothing left to train) is counted in the same summary. With ``--on_bad_example error`` (the
default) the first bad example is reported with its file, line and field (exit status 2); with
``skip`` the command prints how many examples each rule rejected and quotes the first ones (exit
status 1 when any were skipped, 0 when none). Fix a data set here before a training job spends
time loading a model.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sft_plugins.arguments import ModelArguments
from sft_plugins.data import DataSummary, SFTData, load_sft_dataset, parse_column_map
from sft_plugins.manager import PluginManager, get_plugin_manager
from sft_plugins.modeling import load_tokenizer
from sft_plugins.options import split_pairs, typed_options
from sft_plugins.trainer import default_collator_name


@click.command("check-data")
@click.argument("dataset", nargs=-1, required=True)
@click.option("--eval_dataset", multiple=True, help="Evaluation data, checked the same way.")
@click.option("--dataset_format", default=None,
              help="messages, prompt_completion, alpaca, sharegpt or text (default: detected).")
@click.option("--column_map", default=None,
              help="Rename source columns: question=prompt,answer=completion.")
@click.option("--template", "template_name", default=None,
              help="Also apply this chat template's rules (sft-plugins list shows the names).")
@click.option("--tokenizer", "tokenizer_dir", default=None, metavar="DIR",
              help="Also label every example as training would (detects the template).")
@click.option("--collator", "collator_name", default=None, metavar="NAME",
              help="With --tokenizer: the collator (default: the one training picks).")
@click.option("--collator-option", "-c", "collator_pairs", multiple=True, metavar="NAME=VALUE",
              help="With --tokenizer: a collator option, e.g. -c truncation=drop.")
@click.option("--max_length", type=click.IntRange(min=1), default=None,
              help="With --tokenizer: the longest example kept, in tokens.")
@click.option("--on_bad_example", type=click.Choice(["error", "skip"]), default="error",
              show_default=True, help="Stop at the first bad example, or count them all.")
@click.option("--output_dir", default=None, help="With skip: write data_summary.json here.")
@click.option("--dataset_num_proc", "num_proc", type=int, default=None,
              help="Worker processes (default: all cores for large files).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def check_data_command(dataset: tuple[str, ...], eval_dataset: tuple[str, ...],
                       dataset_format: str | None, column_map: str | None,
                       template_name: str | None, tokenizer_dir: str | None,
                       collator_name: str | None, collator_pairs: tuple[str, ...],
                       max_length: int | None, on_bad_example: str, output_dir: str | None,
                       num_proc: int | None, as_json: bool) -> None:
    """Validate DATASET (files, globs, directories or a data set name) before training."""
    manager = get_plugin_manager()
    if tokenizer_dir is None and (collator_name or collator_pairs or max_length):
        raise click.UsageError("--collator, --collator-option and --max_length need "
                               "--tokenizer DIR: collators label tokens")
    tokenizer = None if tokenizer_dir is None else \
        load_tokenizer(ModelArguments(model_name_or_path=tokenizer_dir))
    template = manager.resolve_template(template_name, tokenizer)
    data = load_sft_dataset(list(dataset), format=dataset_format,
                            column_map=parse_column_map(column_map), template=template,
                            on_bad_example=on_bad_example,  # type: ignore[arg-type]
                            eval_dataset=list(eval_dataset) or None, num_proc=num_proc)
    if tokenizer is not None:
        options: dict[str, Any] = {"on_bad_example": on_bad_example}
        if max_length is not None:
            options["max_length"] = max_length
        _label(data, manager, collator_name or default_collator_name(data.train),
               split_pairs(collator_pairs, "collator option"), options, tokenizer, template,
               num_proc)
    if output_dir is not None and on_bad_example == "skip":
        data.summary.write_json(output_dir)
    _show(data, template, as_json)
    sys.exit(1 if data.summary.skipped_total else 0)


def _show(data: SFTData, template: Any, as_json: bool) -> None:
    """The summary (a table, or one JSON object), and how many examples quote the template's
    special-token text."""
    quoted = {} if template is None else {
        name: count for name, split in (("train", data.train), ("eval", data.eval))
        if split is not None and (count := _holding_special_text(split, template))}
    if as_json:
        report = data.summary.to_dict()
        if quoted:
            report["special_token_text"] = quoted
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    _print(data.summary)
    for name, count in quoted.items():
        Console(soft_wrap=True).print(
            f"{name}: {count} example(s) hold the template's special-token text in their "
            f"messages ({escape(', '.join(template.special_tokens))}); it is trained as "
            "text (the collator option literal_special_tokens=False reads it as tokens)",
            highlight=False)


def _label(data: SFTData, manager: PluginManager, name: str, raw: dict[str, str],
           options: dict[str, Any], tokenizer: Any, template: Any, num_proc: int | None) -> None:
    """Prepare every split with the collator training would use; count what it skips."""
    typed = typed_options(manager.collators.get(name), raw, "-c {name}")
    collator = manager.collators.create(name, **{**typed, **options})  # the flags win over -c
    for split, rows in (("train", data.train), ("eval", data.eval)):
        if rows is not None:
            report = collator.prepare(rows, tokenizer, template, num_proc=num_proc).report
            data.summary.add_preparation(split, report)


def _holding_special_text(dataset: Any, template: Any) -> int:
    """How many conversations have a special token's string in a message's content."""
    strings = template.special_tokens
    if not strings or "messages" not in dataset.column_names:
        return 0
    count = 0
    for batch in dataset.select_columns(["messages"]).iter(batch_size=1000):
        for messages in batch["messages"]:
            texts = [m.get("content") for m in messages or []]
            count += any(isinstance(t, str) and any(s in t for s in strings) for t in texts)
    return count


def _print(summary: DataSummary) -> None:
    console = Console(soft_wrap=True)
    table = Table(title="check-data", title_justify="left")
    for column in ("split", "format", "examples", "kept", "skipped", "sources"):
        table.add_column(column)
    for split in summary.splits:
        table.add_row(split.split, split.format, str(split.examples), str(split.kept),
                      str(split.skipped_total), escape(", ".join(split.sources)))
    console.print(table)
    for split in summary.splits:
        for reason, count in sorted(split.skipped.items(), key=lambda item: -item[1]):
            console.print(f"{split.split}: skipped {count}: {escape(reason)}", highlight=False)
        for sample in split.samples:
            console.print(f"  {escape(sample)}", highlight=False)
        if split.preparation is not None:
            labelled = split.preparation
            console.print(f"{split.split}: labelling kept {labelled['kept']} of "
                          f"{labelled['total']}", highlight=False)
            for reason, count in sorted(labelled["skipped"].items()):
                console.print(f"{split.split}: labelling skipped {count}: {escape(reason)}",
                              highlight=False)
            for sample in labelled["first_skips"]:
                console.print(f"  {escape(sample)}", highlight=False)
