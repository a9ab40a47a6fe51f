"""``sft-plugins render``: show what a chat template makes of conversations, and what is trained.

Reads a JSONL file (``{"messages": [...], "tools": [...]?}`` per line), renders every line with a
named template (or the one detected from ``--tokenizer DIR``) and prints the text with the
trained characters highlighted. With a tokenizer it shows tokens and which of them carry loss, as
``--collator NAME`` (default ``assistant-only``) labels them for training: the labels come from
the function preparation uses (:mod:`sft_plugins.trained_view`). ``--json`` prints one object per
input line; ``--html FILE`` writes a page.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.text import Text

from sft_plugins.arguments import ModelArguments
from sft_plugins.data.sources import check_text_encoding, loads_strict, open_data_file
from sft_plugins.errors import DataError, MaskingError, SkipExample, TemplateError
from sft_plugins.loss import IGNORE_INDEX, WEIGHTS_KEY
from sft_plugins.manager import PluginManager, get_plugin_manager
from sft_plugins.masking import MaskingCollator
from sft_plugins.modeling import load_tokenizer
from sft_plugins.options import parse_variables, split_pairs
from sft_plugins.templates import ChatTemplate
from sft_plugins.trained_view import (
    Tokens,
    TrainedExample,
    as_html,
    heading,
    label_conversations,
    runs,
    trained_mask,
)

DEFAULT_COLLATOR = "assistant-only"
"""What ``render --tokenizer`` labels with unless ``--collator`` says otherwise: every assistant
turn, the default for conversations."""


def read_conversations(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` per non-blank line, a row holding ``messages`` (or ``prompt`` and
    ``completion`` message lists) and maybe ``tools``; ``DataError`` names file:line."""
    try:
        check_text_encoding(path)
        with open_data_file(path) as handle:
            lines = handle.readlines()
    except (OSError, EOFError, zlib.error) as exc:  # unreadable, or a corrupt .gz
        raise DataError(f"{path}: cannot be read ({exc}); check the file's permissions and, "
                        "for .gz files, that it is complete gzip data") from None
    seen = False
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = loads_strict(raw)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid UTF-8 (byte {exc.start} of the "
                            "line); the file must be UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column "
                            f"{exc.colno}); each line must be one JSON object") from None
        except ValueError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc}); each line must be "
                            "one JSON object") from None
        if not isinstance(row, dict) or not (
                isinstance(row.get("messages"), list) or
                (isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list))):
            raise DataError(f"{path}:{number}: expected an object with a 'messages' list (or "
                            f"'prompt' and 'completion' lists), got {json.dumps(row)[:80]}")
        seen = True
        yield number, row
    if not seen:
        raise DataError(f"{path}: the file holds no conversations; expected one JSON object "
                        "with a 'messages' list per line")


def _messages(row: dict[str, Any]) -> list[Any]:
    return row["messages"] if isinstance(row.get("messages"), list) else \
        row["prompt"] + row["completion"]


def resolve_template(manager: PluginManager, name: str | None, tokenizer: Any,
                     variables: dict[str, Any]) -> ChatTemplate:
    """The template every command would use (:meth:`PluginManager.resolve_template`); none at
    all is an error saying how to name one."""
    template = manager.resolve_template(name, tokenizer, variables)
    if template is None:
        where = "" if tokenizer is None else \
            f" (the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template)"
        raise TemplateError(f"name a template with --template NAME (sft-plugins list shows "
                            f"them) or give --tokenizer DIR to detect it{where}")
    return template


def as_json(example: TrainedExample, template: ChatTemplate) -> dict[str, Any]:
    """The ``--json`` object of one line: input, text, spans, and tokens when there are any."""
    out: dict[str, Any] = {
        "line": example.line, "template": template.name, "messages": example.messages,
        "text": example.rendered.text,
        "spans": [{"index": m.index, "role": m.role, "start": m.start, "end": m.end,
                   "trained": list(m.trained) if m.trained else None}
                  for m in example.rendered.messages],
    }
    if example.tools is not None:
        out["tools"] = example.tools
    if len(example.tokens) == 1:
        out.update(_token_json(example.tokens[0]))
    elif example.tokens:
        out["examples"] = [{"text": t.text, **_token_json(t)} for t in example.tokens]
    return out


def _token_json(tokens: Tokens) -> dict[str, Any]:
    out: dict[str, Any] = {"input_ids": tokens.input_ids, "labels": tokens.labels}
    if any(0 < w < 1 for w in tokens.weights):
        out[WEIGHTS_KEY] = tokens.weights
    return out


def as_rich(example: TrainedExample, template: ChatTemplate) -> Text:
    """The terminal view: trained text in green; with tokens, boundaries as alternating
    underlines and tokens that carry loss in green (dim green below full weight)."""
    if not example.tokens:
        view = Text(f"line {example.line} · {template.name}\n", style="bold")
        for piece, trained in runs(example.rendered.text, trained_mask(example.rendered)):
            view.append(piece, style="bold green" if trained else "dim")
        return view
    view = Text()
    for part, tokens in enumerate(example.tokens, 1):
        view.append(f"{heading(example, part)} · {template.name}\n", style="bold")
        for i, (piece, label, weight) in enumerate(zip(tokens.pieces, tokens.labels,
                                                       tokens.weights, strict=True)):
            colour = ("grey50" if label == IGNORE_INDEX else
                      "bold green" if weight >= 1 else "green")
            view.append(piece, style=f"{colour} underline" if i % 2 else colour)
        view.append(f"\n[{len(tokens.input_ids)} tokens, {tokens.trained} with loss]\n",
                    style="italic")
    view.rstrip()
    return view


def render_file(path: Path, template: ChatTemplate, *, add_generation_prompt: bool,
                tokenizer: Any = None, collator: MaskingCollator | None = None
                ) -> list[TrainedExample]:
    """Render every line of ``path`` (a bad line is an error naming file:line and message) and,
    with a tokenizer and collator, label its tokens as training would."""
    read = list(read_conversations(path))
    rendered = []
    for line, row in read:
        try:
            rendered.append(template.render(_messages(row), tools=row.get("tools"),
                                            add_generation_prompt=add_generation_prompt))
        except TemplateError as exc:
            raise TemplateError(f"{path}:{line}: {exc}") from None
    tokens: list[Any] = [()] * len(read)
    if collator is not None:
        tokens = label_conversations([row for _, row in read], collator, tokenizer, template)
        for (line, _), result in zip(read, tokens, strict=True):
            if isinstance(result, SkipExample):
                raise MaskingError(f"{path}:{line}: collator {collator.name!r} would skip this "
                                   f"example ({result.reason}): {result}")
    return [TrainedExample(line, _messages(row), row.get("tools"), view, token_view)
            for (line, row), view, token_view in zip(read, rendered, tokens, strict=True)]


@click.command("render")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--template", "template_name", metavar="NAME",
              help="Template to use (default: detect it from --tokenizer).")
@click.option("--tokenizer", "tokenizer_dir", metavar="DIR",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Tokenizer directory: detect the template, show tokens and labels.")
@click.option("--collator", "collator_name", metavar="NAME",
              help=f"Show the tokens this collator trains (needs --tokenizer; default "
                   f"{DEFAULT_COLLATOR}).")
@click.option("--collator-option", "-c", "collator_pairs", multiple=True, metavar="NAME=VALUE",
              help="Collator option, e.g. -c prompt_loss_weight=0.1 -c max_length=512.")
@click.option("--add-generation-prompt", is_flag=True,
              help="End with the assistant header, as for generation (text only: nothing is "
                   "trained on a generation prompt).")
@click.option("--option", "-o", "option_pairs", multiple=True, metavar="NAME=VALUE",
              help="Template variable, e.g. -o enable_thinking=false -o date_string='1 Jan 2025'.")
@click.option("--html", "html_path", metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path), help="Also write an HTML page.")
@click.option("--json", "json_output", is_flag=True,
              help="Print one JSON object per input line (text, spans; input_ids and labels "
                   "with --tokenizer, per assistant turn under 'examples' when -c expand=... "
                   "splits the conversation).")
def render_command(path: Path, template_name: str | None, tokenizer_dir: Path | None,
                   collator_name: str | None, collator_pairs: tuple[str, ...],
                   add_generation_prompt: bool, option_pairs: tuple[str, ...],
                   html_path: Path | None, json_output: bool) -> None:
    """Render the conversations in a JSONL file and show which parts are trained."""
    if tokenizer_dir is None and (collator_name or collator_pairs):
        raise click.UsageError("--collator and --collator-option need --tokenizer DIR: "
                               "collators label tokens")
    if add_generation_prompt and tokenizer_dir is not None:
        raise click.UsageError("--add-generation-prompt renders a prompt for generation, which "
                               "nothing is trained on; leave out --tokenizer to see it")
    manager = get_plugin_manager()
    tokenizer = None if tokenizer_dir is None else load_tokenizer(
        ModelArguments(model_name_or_path=str(tokenizer_dir)))  # names the directory on failure
    template = resolve_template(manager, template_name, tokenizer,
                                parse_variables(option_pairs))
    collator = None if tokenizer is None else manager.collators.create_from_text(
        collator_name or DEFAULT_COLLATOR, split_pairs(collator_pairs, "collator option"),
        "-c {name}")
    examples = render_file(path, template, add_generation_prompt=add_generation_prompt,
                           tokenizer=tokenizer, collator=collator)
    if html_path is not None:
        html_path.write_text(as_html(examples, template, path.name,
                                     collator.name if collator else None), encoding="utf-8")
    _show(examples, template, json_output=json_output, wrote=html_path)


def _show(examples: list[TrainedExample], template: ChatTemplate, *, json_output: bool,
          wrote: Path | None) -> None:
    if json_output:
        for example in examples:
            click.echo(json.dumps(as_json(example, template), ensure_ascii=False))
        return
    console = Console(highlight=False)
    for example in examples:
        console.print(as_rich(example, template))
        console.print()
    if wrote is not None:
        console.print(f"wrote {wrote}")
