"""``sft-plugins render``: show what a chat template makes of conversations, and what is trained.

Reads a JSONL file (``{"messages": [...], "tools": [...]?}`` per line), renders every line with a
named template (or the one detected from ``--tokenizer DIR``) and prints the text with the
trained characters highlighted. With a tokenizer it also shows token boundaries and which tokens
carry loss. ``--json`` prints one object per input line; ``--html FILE`` writes a page.
"""

from __future__ import annotations

import html
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.text import Text

from sft_plugins.data.sources import check_text_encoding, loads_strict, open_data_file
from sft_plugins.errors import DataError, TemplateError
from sft_plugins.manager import get_plugin_manager
from sft_plugins.templates import ChatTemplate, RenderedConversation

IGNORE_INDEX = -100
"""The label of tokens that carry no loss (``transformers``' convention)."""


@dataclass(frozen=True)
class Tokens:
    """A rendered text tokenized: ids, labels (``-100`` where no loss) and character offsets."""

    input_ids: list[int]
    labels: list[int]
    offsets: list[tuple[int, int]]
    pieces: list[str]


@dataclass(frozen=True)
class Example:
    """One input line and what the template made of it."""

    line: int
    messages: list[Any]
    tools: Any
    rendered: RenderedConversation
    tokens: Tokens | None


def read_conversations(path: Path) -> Iterator[tuple[int, list[Any], Any]]:
    """``(line number, messages, tools)`` per non-blank line; ``DataError`` names file:line."""
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
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise DataError(f"{path}:{number}: expected an object with a 'messages' list, "
                            f"got {json.dumps(row)[:80]}")
        seen = True
        yield number, row["messages"], row.get("tools")
    if not seen:
        raise DataError(f"{path}: the file holds no conversations; expected one JSON object "
                        "with a 'messages' list per line")


def tokenize(tokenizer: Any, template: ChatTemplate, rendered: RenderedConversation) -> Tokens:
    """Tokenize like training does: the template's own BOS only, labels from the trained spans
    (a token carries loss when its characters overlap a trained span)."""
    encoding = tokenizer(rendered.text, add_special_tokens=not template.renders_bos,
                         return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    offsets = [tuple(o) for o in encoding["offset_mapping"]]
    spans = rendered.trained_spans
    labels = [token if any(s < end and e > start for start, end in spans) else IGNORE_INDEX
              for token, (s, e) in zip(ids, offsets, strict=True)]
    pieces, shown = [], 0
    for token, (s, e) in zip(ids, offsets, strict=True):
        if e <= s:  # added by the tokenizer, not in the text
            pieces.append(tokenizer.convert_ids_to_tokens(token))
            continue
        # Byte-level tokens of one multi-byte character share its offsets: show it once.
        pieces.append(rendered.text[max(s, shown):e])
        shown = max(shown, e)
    return Tokens(ids, labels, offsets, pieces)  # type: ignore[arg-type]


def resolve_template(name: str | None, tokenizer: Any) -> ChatTemplate:
    """The named template, else the one detected for ``tokenizer``, else the tokenizer's own."""
    template = get_plugin_manager().resolve_template(name, tokenizer)
    if template is None:
        where = "" if tokenizer is None else \
            f" (the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template)"
        raise TemplateError(f"name a template with --template NAME (sft-plugins list shows "
                            f"them) or give --tokenizer DIR to detect it{where}")
    return template


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``NAME=VALUE`` template variables; VALUE is read as JSON when it parses, else a string."""
    options: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--option")
        try:
            options[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[name.strip()] = value
    return options


def as_json(example: Example, template: ChatTemplate) -> dict[str, Any]:
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
    if example.tokens is not None:
        out["input_ids"] = example.tokens.input_ids
        out["labels"] = example.tokens.labels
    return out


def _trained_mask(rendered: RenderedConversation) -> list[bool]:
    mask = [False] * len(rendered.text)
    for start, end in rendered.trained_spans:
        mask[start:end] = [True] * (end - start)
    return mask


def _runs(text: str, mask: list[bool]) -> Iterator[tuple[str, bool]]:
    """Maximal runs of characters with the same trained flag."""
    start = 0
    for i in range(1, len(text) + 1):
        if i == len(text) or mask[i] != mask[start]:
            yield text[start:i], mask[start]
            start = i


def as_rich(example: Example, template: ChatTemplate) -> Text:
    """The terminal view: trained text in green; with tokens, boundaries as alternating
    underlines and tokens that carry loss in green."""
    view = Text(f"line {example.line} · {template.name}\n", style="bold")
    if example.tokens is None:
        for piece, trained in _runs(example.rendered.text, _trained_mask(example.rendered)):
            view.append(piece, style="bold green" if trained else "dim")
    else:
        for i, (piece, label) in enumerate(zip(example.tokens.pieces, example.tokens.labels,
                                               strict=True)):
            colour = "bold green" if label != IGNORE_INDEX else "grey50"
            view.append(piece, style=f"{colour} underline" if i % 2 else colour)
        trained = sum(label != IGNORE_INDEX for label in example.tokens.labels)
        view.append(f"\n[{len(example.tokens.input_ids)} tokens, {trained} with loss]",
                    style="italic")
    return view


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8" />
<title>sft-plugins render: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; background: #fafafa; }}
pre {{ white-space: pre-wrap; word-break: break-word; background: #fff; padding: 1em;
       border: 1px solid #ddd; border-radius: 6px; line-height: 1.6; }}
.trained {{ background: #c8f7c5; color: #064; font-weight: 600; }}
.prompt {{ color: #777; }}
.tok {{ border-right: 1px solid #bbb; }}
.tok.loss {{ background: #c8f7c5; color: #064; }}
.legend span {{ padding: 0 .4em; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p class="legend">template <b>{template}</b>:
<span class="trained">trained (carries loss)</span> <span class="prompt">not trained</span></p>
{body}
</body>
</html>
"""


def as_html(examples: Sequence[Example], template: ChatTemplate, title: str) -> str:
    """A standalone page, one ``<pre>`` per conversation (well-formed XHTML-compatible markup)."""
    sections = []
    for example in examples:
        if example.tokens is None:
            parts = [f'<span class="{"trained" if trained else "prompt"}">'
                     f"{html.escape(piece)}</span>"
                     for piece, trained in _runs(example.rendered.text,
                                                 _trained_mask(example.rendered))]
        else:
            parts = [f'<span class="tok{" loss" if label != IGNORE_INDEX else ""}" '
                     f'title="{token}">{html.escape(piece)}</span>'
                     for piece, label, token in zip(example.tokens.pieces, example.tokens.labels,
                                                    example.tokens.input_ids, strict=True)]
        sections.append(f"<h2>line {example.line}</h2>\n<pre>{''.join(parts)}</pre>")
    return _PAGE.format(title=html.escape(title), template=html.escape(template.name),
                        body="\n".join(sections))


def render_file(path: Path, template: ChatTemplate, tokenizer: Any, *,
                add_generation_prompt: bool, options: dict[str, Any]) -> list[Example]:
    """Render every line of ``path``; a bad line is an error naming file:line and message."""
    examples = []
    for line, messages, tools in read_conversations(path):
        try:
            rendered = template.render(messages, tools=tools,
                                       add_generation_prompt=add_generation_prompt, **options)
        except TemplateError as exc:
            raise TemplateError(f"{path}:{line}: {exc}") from None
        tokens = tokenize(tokenizer, template, rendered) if tokenizer is not None else None
        examples.append(Example(line, messages, tools, rendered, tokens))
    return examples


@click.command("render")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--template", "template_name", metavar="NAME",
              help="Template to use (default: detect it from --tokenizer).")
@click.option("--tokenizer", "tokenizer_dir", metavar="DIR",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Tokenizer directory: detect the template, show tokens and labels.")
@click.option("--add-generation-prompt", is_flag=True,
              help="End with the assistant header, as for generation.")
@click.option("--option", "-o", "option_pairs", multiple=True, metavar="NAME=VALUE",
              help="Template variable, e.g. -o enable_thinking=false -o date_string='1 Jan 2025'.")
@click.option("--html", "html_path", metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path), help="Also write an HTML page.")
@click.option("--json", "json_output", is_flag=True,
              help="Print one JSON object per input line (text, spans; input_ids and labels "
                   "with --tokenizer).")
def render_command(path: Path, template_name: str | None, tokenizer_dir: Path | None,
                   add_generation_prompt: bool, option_pairs: tuple[str, ...],
                   html_path: Path | None, json_output: bool) -> None:
    """Render the conversations in a JSONL file and show which parts are trained."""
    tokenizer = None
    if tokenizer_dir is not None:  # the loader train uses: its failures name the directory
        from sft_plugins.arguments import ModelArguments
        from sft_plugins.modeling import load_tokenizer

        tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tokenizer_dir)))
    template = resolve_template(template_name, tokenizer)
    examples = render_file(path, template, tokenizer,
                           add_generation_prompt=add_generation_prompt,
                           options=parse_options(option_pairs))
    if html_path is not None:
        html_path.write_text(as_html(examples, template, path.name), encoding="utf-8")
    if json_output:
        for example in examples:
            click.echo(json.dumps(as_json(example, template), ensure_ascii=False))
        return
    console = Console(highlight=False)
    for example in examples:
        console.print(as_rich(example, template))
        console.print()
    if html_path is not None:
        console.print(f"wrote {html_path}")
