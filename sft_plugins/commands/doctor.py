"""``sft-plugins doctor DIR``: what is wrong with a model or tokenizer directory for chat SFT.

Each finding says what is wrong and what to do about it. Exit status 0 when nothing is wrong,
1 otherwise. ``--fix OUT`` writes a corrected tokenizer directory (the family's template with
``{% generation %}`` markers, a pad token that is not the end-of-turn token, no automatic BOS on
top of the template's own); untrained embedding rows are reported but need training to fix.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from sft_plugins.errors import DataError, TemplateError
from sft_plugins.manager import PluginManager, get_plugin_manager
from sft_plugins.templates import ChatTemplate, tokenizer_template_text
from sft_plugins.templates._jinja import has_generation_markers

SAMPLE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
]
"""A conversation every family can express, ending with a user turn (prompt checks)."""

UNTRAINED_RATIO = 0.01
"""An embedding row shorter than this fraction of the median row is taken as untrained."""

FIX_SIMILARITY = 0.9
"""How alike an unrecognised template must be to a family's for ``--fix`` to assume it."""



@dataclass(frozen=True)
class Finding:
    """One problem: a short code, what is wrong, what to do, and optional details (a diff)."""

    code: str
    message: str
    advice: str
    details: str = ""


@dataclass
class Report:
    """Everything ``doctor`` found about one directory."""

    directory: str
    family: str | None = None
    version: str | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict[str, Any]:
        return {"directory": self.directory, "family": self.family, "version": self.version,
                "ok": self.ok, "findings": [asdict(f) for f in self.findings]}


def load_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as exc:
        raise DataError(f"{directory}: cannot load a tokenizer from it ({type(exc).__name__}: "
                        f"{exc}); point doctor at a model or tokenizer directory") from None


def _sample_render(template: ChatTemplate, prompt: bool, answered: bool = False) -> str:
    """Render the sample (without system message if the template refuses one)."""
    messages = SAMPLE[:3] if answered else SAMPLE
    try:
        return template.render_text(messages, add_generation_prompt=prompt)
    except TemplateError:
        return template.render_text(messages[1:], add_generation_prompt=prompt)


def _sample_text(template: ChatTemplate) -> str | None:
    """The sample rendered as training (answered) and as a prompt, or None if it cannot be."""
    try:
        return _sample_render(template, False, answered=True) + _sample_render(template, True)
    except TemplateError:
        return None


def _closest(candidates: list[ChatTemplate], tokenizer: Any
             ) -> tuple[ChatTemplate, float, str] | None:
    """The candidate that renders the sample most like the tokenizer's template does, how
    alike (0..1) and a diff of the two renderings. Comparing output, not source, ignores
    markers and restructuring and shows the user what actually changes."""
    theirs = _sample_text(ChatTemplate.from_tokenizer(tokenizer))
    if theirs is None:
        return None
    best: tuple[ChatTemplate, float, str] | None = None
    for template in candidates:
        ours = _sample_text(template)
        if ours is None:
            continue
        ratio = difflib.SequenceMatcher(None, theirs, ours).ratio()
        if best is None or ratio > best[1]:
            best = (template, ratio, _diff(theirs, ours, template.name))
    return best


def _diff(theirs: str, ours: str, name: str, limit: int = 60) -> str:
    lines = list(difflib.unified_diff(ours.splitlines(), theirs.splitlines(),
                                      fromfile=f"{name} renders", tofile="this template renders",
                                      lineterm=""))
    if len(lines) > limit:
        lines = [*lines[:limit], f"... ({len(lines) - limit} more diff lines)"]
    return "\n".join(lines)


def check_template(report: Report, tokenizer: Any, manager: PluginManager,
                   named: ChatTemplate | None) -> ChatTemplate | None:
    """Detect the family and report known bugs or a modified template; return the family."""
    text = tokenizer_template_text(tokenizer)
    family = named or manager.select_chat_template(tokenizer)
    if text is None:
        report.findings.append(Finding(
            "no-chat-template", "the tokenizer has no chat template",
            "run doctor --fix OUT --template NAME to install one (sft-plugins list shows them)"))
        report.family = family.name if family else None
        return family
    if family is not None:
        report.family = family.name
        version = family.recognise(text)
        if version is not None:
            report.version = version.label
            fixed = f" (it {'; '.join(family.fixes)})" if family.fixes else ""
            for bug in version.bugs:
                report.findings.append(Finding(
                    "known-bug", f"{version.label}: {bug}",
                    f"run doctor --fix OUT to install sft-plugins' {family.name} template"
                    f"{fixed}"))
            return family
    closest = _closest([family] if family else [e.item for e in manager.templates], tokenizer)
    if closest is not None and (family is not None or closest[1] >= 0.5):
        guess, ratio, diff = closest
        report.family = guess.name
        report.findings.append(Finding(
            "modified-template",
            f"the chat template is not a published {guess.name} version (it renders a sample "
            f"conversation {ratio:.0%} alike): the model may be trained on a format it was not "
            "instruction-tuned with",
            f"check the diff of the renderings; run doctor --fix OUT --template {guess.name} to "
            "use the family's template, or keep yours knowingly", diff))
        return family or (guess if ratio >= FIX_SIMILARITY else None)
    report.findings.append(Finding(
        "unrecognised-template", "no registered template recognises this chat template",
        "it still works as is (spans come from rendering prefixes); name a family with "
        "--template if it is one, or register a template plugin for it"))
    return family


def _prompt_is_implicit(family: ChatTemplate | None) -> bool:
    """Whether the family's own template ignores ``add_generation_prompt`` too: its user turn
    already ends where the answer starts (Mistral's ``[/INST]``), so the same text with and
    without the flag is its design, not the day-one Llama bug."""
    return family is not None and _sample_render(family, False) == _sample_render(family, True)


def check_rendering(report: Report, tokenizer: Any, family: ChatTemplate | None) -> None:
    """Checks that render the tokenizer's own template: prompt flag, markers, BOS, padding."""
    text = tokenizer_template_text(tokenizer)
    end_of_turn = family.end_of_turn if family else tokenizer.eos_token
    if text is not None:
        own = ChatTemplate.from_tokenizer(tokenizer)
        try:
            plain, prompted = _sample_render(own, False), _sample_render(own, True)
            answered = _sample_render(own, False, answered=True)
        except TemplateError as exc:
            report.findings.append(Finding(
                "template-fails", f"the chat template cannot render a plain conversation: "
                f"{exc}", "run doctor --fix OUT --template NAME"))
            return
        if plain == prompted and not _prompt_is_implicit(family):
            report.findings.append(Finding(
                "ignores-add-generation-prompt",
                "the template renders the same text with and without add_generation_prompt: "
                "training samples end with an empty assistant header (Llama 3.1's day-one bug)",
                "run doctor --fix OUT to install a template that respects the flag"))
        if not has_generation_markers(text):
            report.findings.append(Finding(
                "no-generation-markers",
                "the template has no {% generation %} markers: transformers' "
                "return_assistant_tokens_mask returns all zeros with it",
                "sft-plugins finds spans itself; run doctor --fix OUT to install a template "
                "with markers for other tools"))
        bos = tokenizer.bos_token
        if bos and answered.startswith(bos):
            ids = tokenizer(answered, add_special_tokens=True)["input_ids"]
            bos_id = tokenizer.convert_tokens_to_ids(bos)
            if ids[:2] == [bos_id, bos_id]:
                report.findings.append(Finding(
                    "double-bos",
                    f"the template renders {bos} and the tokenizer adds another when the text "
                    "is tokenized with special tokens (a double BOS)",
                    "tokenize rendered chats with add_special_tokens=False (sft-plugins does); "
                    "run doctor --fix OUT to turn the tokenizer's own BOS off"))
    pad = tokenizer.pad_token
    if pad is None:
        report.findings.append(Finding(
            "no-pad-token", "the tokenizer has no pad token",
            "run doctor --fix OUT to set the family's training pad token"))
    elif pad in {end_of_turn, tokenizer.eos_token} - {None}:
        report.findings.append(Finding(
            "pad-is-end-of-turn",
            f"the pad token {pad!r} is the end-of-turn/eos token: masking pads also masks the "
            "model's stop signal, and it never learns to stop",
            "run doctor --fix OUT to pad with a dedicated token (Llama 3.1: "
            "<|finetune_right_pad_id|>)"))


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return [directory / shard for shard in sorted(shards)]
    return sorted(directory.glob("*.safetensors"))


def _embedding_rows(files: list[Path], ids: list[int]) -> Iterator[tuple[Any, Any]]:
    """``(rows for ids, all rows)`` of the input embedding matrix, if a weight file has it."""
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name.endswith(("embed_tokens.weight", "word_embeddings.weight",
                                  "wte.weight")):
                    matrix = handle.get_tensor(name).float()
                    yield matrix[ids], matrix
                    return


def check_embeddings(report: Report, directory: Path, tokenizer: Any) -> None:
    """Special tokens the template uses whose embedding rows are (near) zero: untrained."""
    files = _weight_files(directory)
    text = tokenizer_template_text(tokenizer)
    if not files or text is None:
        return
    try:
        rendered = _sample_render(ChatTemplate.from_tokenizer(tokenizer), True)
    except TemplateError:
        return
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids = sorted({i for i in tokenizer(rendered, add_special_tokens=False)["input_ids"]
                  if i in special})
    if not ids:
        return
    for rows, matrix in _embedding_rows(files, ids):
        typical = float(matrix.norm(dim=1).median())
        norms = rows.norm(dim=1).tolist()
        untrained = [tokenizer.convert_ids_to_tokens(i) for i, n in zip(ids, norms, strict=True)
                     if n < UNTRAINED_RATIO * typical]
        if untrained:
            report.findings.append(Finding(
                "untrained-embeddings",
                f"special tokens the template uses have near-zero (untrained) embedding rows: "
                f"{', '.join(untrained)}; a base model sees them as noise and losses can go NaN",
                "train the embeddings and lm_head too (LoRA: modules_to_save=['embed_tokens', "
                "'lm_head']) or set those rows to the mean embedding before training; "
                "--fix cannot change weights"))


def diagnose(directory: Path, template_name: str | None = None) -> tuple[Report, Any,
                                                                         ChatTemplate | None]:
    """Run every check on ``directory``: the report, the tokenizer, and the family."""
    manager = get_plugin_manager()
    named = manager.templates.get(template_name) if template_name else None
    tokenizer = load_tokenizer(directory)
    report = Report(str(directory))
    family = check_template(report, tokenizer, manager, named)
    check_rendering(report, tokenizer, family)
    check_embeddings(report, directory, tokenizer)
    return report, tokenizer, family


def fix(tokenizer: Any, family: ChatTemplate | None, report: Report, out: Path) -> None:
    """Write ``tokenizer`` to ``out`` with the family's template, pad token and single BOS."""
    if family is None:
        raise TemplateError(f"{report.directory}: doctor cannot tell the template family; name "
                            "it with --template NAME (sft-plugins list shows them)")
    family.configure_tokenizer(tokenizer)
    bos = tokenizer.bos_token
    if family.renders_bos and bos and tokenizer("", add_special_tokens=True)["input_ids"] == [
            tokenizer.convert_tokens_to_ids(bos)]:
        tokenizer.add_bos_token = False  # the template renders it; one more would be double
    tokenizer.save_pretrained(out)


def _print(console: Console, report: Report) -> None:
    family = report.family or "unknown"
    version = f" ({report.version})" if report.version else ""
    console.print(f"[bold]{escape(report.directory)}[/]: template family "
                  f"[bold]{escape(family)}[/]{escape(version)}")
    for finding in report.findings:
        console.print(f"[bold red]✗ {finding.code}[/] {escape(finding.message)}")
        console.print(f"  [cyan]→ {escape(finding.advice)}[/]")
        if finding.details:
            console.print(escape(finding.details), style="dim")
    if report.ok:
        console.print("[bold green]✓ nothing wrong found[/]")
    else:
        console.print(f"[bold red]{len(report.findings)} problem(s)[/]")


@click.command("doctor")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--template", "template_name", metavar="NAME",
              help="The template family, when detection cannot tell.")
@click.option("--json", "json_output", is_flag=True, help="Print one JSON object.")
@click.option("--fix", "fix_dir", metavar="OUT", type=click.Path(file_okay=False, path_type=Path),
              help="Write a corrected tokenizer directory to OUT (and check it).")
def doctor_command(directory: Path, template_name: str | None, json_output: bool,
                   fix_dir: Path | None) -> None:
    """Check a model or tokenizer directory for chat-template problems that spoil SFT."""
    report, tokenizer, family = diagnose(directory, template_name)
    result: dict[str, Any] = report.as_dict()
    final = report
    if fix_dir is not None:
        fix(tokenizer, family, report, fix_dir)
        final, _, _ = diagnose(fix_dir, template_name)
        result["fixed"] = final.as_dict()
    if json_output:
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        console = Console(highlight=False)
        _print(console, report)
        if fix_dir is not None:
            console.print(f"\nwrote {escape(str(fix_dir))}; checking it:")
            _print(console, final)
    sys.exit(0 if final.ok else 1)
