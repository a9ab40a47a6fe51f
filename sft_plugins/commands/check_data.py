"""``sft-plugins check-data``: load and validate a data set exactly as training would, no model.

Every example is read, converted to canonical form and checked (the generic rules, and the chat
template's own with ``--template``). With ``--on_bad_example error`` (the default) the first bad
example is reported with its file, line and field (exit status 2); with ``skip`` the command
prints how many examples each rule rejected and quotes the first ones (exit status 1 when any
were skipped, 0 when none). Fix a data set here before a training job spends time loading a
model.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sft_plugins.data import DataSummary, load_sft_dataset, parse_column_map
from sft_plugins.manager import get_plugin_manager


@click.command("check-data")
@click.argument("dataset", nargs=-1, required=True)
@click.option("--eval_dataset", multiple=True, help="Evaluation data, checked the same way.")
@click.option("--dataset_format", default=None,
              help="messages, prompt_completion, alpaca, sharegpt or text (default: detected).")
@click.option("--column_map", default=None,
              help="Rename source columns: question=prompt,answer=completion.")
@click.option("--template", "template_name", default=None,
              help="Also apply this chat template's rules (sft-plugins list shows the names).")
@click.option("--on_bad_example", type=click.Choice(["error", "skip"]), default="error",
              show_default=True, help="Stop at the first bad example, or count them all.")
@click.option("--output_dir", default=None, help="With skip: write data_summary.json here.")
@click.option("--dataset_num_proc", "num_proc", type=int, default=None,
              help="Worker processes (default: all cores for large files).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def check_data_command(dataset: tuple[str, ...], eval_dataset: tuple[str, ...],
                       dataset_format: str | None, column_map: str | None,
                       template_name: str | None, on_bad_example: str, output_dir: str | None,
                       num_proc: int | None, as_json: bool) -> None:
    """Validate DATASET (files, globs, directories or a data set name) before training."""
    template = get_plugin_manager().templates.get(template_name) if template_name else None
    data = load_sft_dataset(list(dataset), format=dataset_format,
                            column_map=parse_column_map(column_map), template=template,
                            on_bad_example=on_bad_example,  # type: ignore[arg-type]
                            eval_dataset=list(eval_dataset) or None, num_proc=num_proc,
                            output_dir=output_dir)
    quoted = {} if template is None else {
        name: count for name, split in (("train", data.train), ("eval", data.eval))
        if split is not None and (count := _holding_special_text(split, template))}
    if as_json:
        report = data.summary.to_dict()
        if quoted:
            report["special_token_text"] = quoted
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _print(data.summary)
        for name, count in quoted.items():
            Console(soft_wrap=True).print(
                f"{name}: {count} example(s) hold the template's special-token text in their "
                f"messages ({escape(', '.join(template.special_tokens))}); it is trained as "
                "text (the collator option literal_special_tokens=False reads it as tokens)",
                highlight=False)
    sys.exit(1 if data.summary.skipped_total else 0)


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
