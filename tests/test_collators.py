"""The first-party collators as plugins: registration, options, response markers, and the
plugin example of docs/collators.md run as written."""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset
from test_masking_support import EOT, HandTemplate, llama_tokenizer, trained_text

from sft_plugins.errors import MaskingError, PluginOptionError
from sft_plugins.masking import MaskingCollator
from sft_plugins.testing import plugin_manager

DOC = Path(__file__).parent.parent / "docs" / "collators.md"
NAMES = ["all-tokens", "assistant-only", "completion-only", "last-turn", "prompt-weighted",
         "response-template"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return llama_tokenizer()


def test_every_collator_is_registered_documented_and_a_masking_collator() -> None:
    manager = plugin_manager("sft_plugins_collators")
    assert manager.collators.names() == NAMES
    doc = DOC.read_text()
    for entry in manager.collators:
        assert issubclass(entry.item, MaskingCollator) and entry.description
        assert f"`{entry.name}`" in doc
    assert manager.collators.get("assistant_only") is manager.collators.get("assistant-only")


def test_options_are_validated_with_the_option_named() -> None:
    collators = plugin_manager("sft_plugins_collators").collators
    with pytest.raises(PluginOptionError, match="truncation"):
        collators.create("assistant-only", truncation="middle")
    with pytest.raises(PluginOptionError, match="max_lenght"):
        collators.create("last-turn", max_lenght=10)
    with pytest.raises(PluginOptionError, match="response_template"):
        collators.create("response-template")


def prepare(collator: MaskingCollator, rows: list[dict[str, Any]], tokenizer: Any) -> Any:
    return collator.prepare(Dataset.from_list(rows), tokenizer, HandTemplate(), desc=None)


TEXT = ("### Instruction:\nSay hi\n### Response:\nhi there\n"
        "### Instruction:\nBye\n### Response:\nbye")


@pytest.mark.parametrize("as_ids", [False, True])
def test_response_template_finds_the_marker_in_context(tokenizer: Any, as_ids: bool) -> None:
    """Alone, ``Answer:`` tokenizes as ``Answer`` ``:``; inside the text as `` Answer`` ``:``,
    so a token-id search never finds it. The search is on characters: found either way,
    given as text or as token ids."""
    text, marker = "Question: say hi Answer: hi there", "Answer:"
    alone = tokenizer.encode(marker, add_special_tokens=False)
    in_text = tokenizer.encode(text, add_special_tokens=False)
    assert not any(in_text[i:i + len(alone)] == alone for i in range(len(in_text)))
    collators = plugin_manager("sft_plugins_collators").collators
    collator = collators.create("response-template",
                                response_template=alone if as_ids else marker)
    row = prepare(collator, [{"text": text}], tokenizer).dataset[0]
    assert trained_text(tokenizer, row["input_ids"], row["labels"]) == f" hi there{EOT}"


def test_response_template_trains_every_answer_with_an_instruction_marker(
        tokenizer: Any) -> None:
    collators = plugin_manager("sft_plugins_collators").collators
    last = prepare(collators.create("response-template", response_template="### Response:\n"),
                   [{"text": TEXT}], tokenizer).dataset[0]
    assert trained_text(tokenizer, last["input_ids"], last["labels"]) == f"bye{EOT}"
    every = prepare(collators.create("response-template", response_template="### Response:\n",
                                     instruction_template="### Instruction:"),
                    [{"text": TEXT}], tokenizer).dataset[0]
    assert trained_text(tokenizer, every["input_ids"], every["labels"]) == \
        f"hi there\nbye{EOT}"


def test_response_template_never_fails_silently(tokenizer: Any) -> None:
    collators = plugin_manager("sft_plugins_collators").collators
    rows = [{"text": TEXT}, {"text": "no marker here"}]
    with pytest.raises(MaskingError, match=r"example 1: does not contain the response marker"):
        prepare(collators.create("response-template", response_template="### Response:\n"),
                rows, tokenizer)
    prepared = prepare(collators.create("response-template", response_template="### Response:\n",
                                        on_bad_example="skip"), rows, tokenizer)
    assert prepared.report.skipped == {"marker_not_found": 1} and prepared.report.kept == 1


def test_the_documented_plugin_example_runs(tokenizer: Any) -> None:
    code = re.search(r"## Writing a collator.*?```python\n(.*?)```", DOC.read_text(),
                     re.S).group(1)
    module = types.ModuleType("doc_collator_plugin")
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    manager = plugin_manager(module, with_first_party=True)
    collator = manager.collators.create("last-two-turns", earlier_weight=0.5)
    conversation = [{"role": "user", "content": f"q{i}"} if k == 0 else
                    {"role": "assistant", "content": f"a{i}"}
                    for i in range(3) for k in range(2)]
    row = prepare(collator, [{"messages": conversation}], tokenizer).dataset[0]
    trained = [(tokenizer.decode([t]), w) for t, w in zip(row["input_ids"], row["loss_weights"],
                                                           strict=True) if w > 0]
    assert trained == [("a", 0.5), ("0", 0.5), (EOT, 0.5), ("a", 1.0), ("1", 1.0), (EOT, 1.0),
                       ("a", 1.0), ("2", 1.0), (EOT, 1.0)]
