"""Reasoning is never dropped in silence.

Loading keeps an assistant turn's reasoning (``reasoning_content``, ``thinking`` or
``reasoning``); a family whose template cannot express it refuses it, naming the example; and an
assistant turn whose reasoning the template leaves out (Qwen3 keeps only the reasoning after the
last user message) is not trained as an answer without thinking: it stops preparation, or is
counted as skipped, with the options that train it correctly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets.config
import pytest
from template_parity import (
    ONE_TURN,
    TWO_TURNS,
    prepare_rows,
    shipped_tokenizer,
    trained_text,
    turn,
)

from sft_plugins.data import load_sft_dataset, messages_from_row
from sft_plugins.errors import DataError, MaskingError
from sft_plugins.testing import plugin_manager

MANAGER = plugin_manager("sft_plugins_templates", "sft_plugins_collators")
QWEN3 = MANAGER.templates.get("qwen3")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The shipped tokenizer with Qwen's special tokens, configured by the qwen3 template."""
    tokenizer = shipped_tokenizer(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    QWEN3.configure_tokenizer(tokenizer)
    return tokenizer


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("key", ["reasoning_content", "thinking", "reasoning"])
def test_loading_keeps_the_reasoning(tmp_path: Path, key: str) -> None:
    source = {"messages": turn("2+2?", "Two and two make four.", "4", key)}
    data = load_sft_dataset(str(write(tmp_path / "r.jsonl", [source])), template=QWEN3)
    messages = messages_from_row(data.train[0])
    assert messages[1]["reasoning_content"] == "Two and two make four."
    text = QWEN3.render(messages).text
    assert text == QWEN3.render(source["messages"]).text
    assert "<think>\nTwo and two make four.\n</think>" in text


def test_a_family_without_reasoning_refuses_it(tmp_path: Path) -> None:
    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = write(tmp_path / "r.jsonl", [{"messages": turn("q", "r", "a")}, ONE_TURN, plain])
    llama = MANAGER.templates.get("llama-3.1")
    with pytest.raises(DataError, match=rf"{path}:1: .*cannot express reasoning"):
        load_sft_dataset(str(path), template=llama)
    skipped = load_sft_dataset(str(path), template=llama, on_bad_example="skip")
    assert skipped.summary.splits[0].skipped == {"template llama-3.1: no-reasoning": 2}
    assert len(skipped.train) == 1


def test_reasoning_belongs_to_assistant_messages(tmp_path: Path) -> None:
    row = {"messages": [{"role": "user", "content": "q", "thinking": "hm"},
                        {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match="only assistant messages carry reasoning"):
        load_sft_dataset(str(write(tmp_path / "r.jsonl", [row])), template=QWEN3)


def test_a_turn_with_its_reasoning_is_trained_with_it(tmp_path: Path, tokenizer: Any) -> None:
    prepared = prepare_rows(tmp_path, tokenizer, QWEN3, [ONE_TURN], "assistant-only")
    assert trained_text(tokenizer, prepared.dataset[0]) == \
        "<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>"


def test_a_turn_whose_reasoning_the_template_drops_is_not_trained_in_silence(
        tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(MaskingError, match=r"train\.jsonl:1: .*message 1 is trained, but .*"
                                           r"without its reasoning.*last-turn"):
        prepare_rows(tmp_path, tokenizer, QWEN3, [TWO_TURNS], "assistant-only")
    skipped = prepare_rows(tmp_path, tokenizer, QWEN3, [TWO_TURNS, ONE_TURN], "assistant-only",
                      on_bad_example="skip")
    assert skipped.report.skipped == {"reasoning_dropped": 1} and skipped.report.kept == 1
    last = prepare_rows(tmp_path, tokenizer, QWEN3, [TWO_TURNS], "last-turn")
    assert trained_text(tokenizer, last.dataset[0]) == \
        "<think>\nThree and three make six.\n</think>\n\n6<|im_end|>"


def test_without_reasoning_in_earlier_turns_every_turn_trains(tmp_path: Path,
                                                              tokenizer: Any) -> None:
    plain = {"messages": [{"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"},
                          *turn("3+3?", "Three and three make six.", "6")]}
    prepared = prepare_rows(tmp_path, tokenizer, QWEN3, [plain], "assistant-only")
    assert trained_text(tokenizer, prepared.dataset[0]) == \
        "4<|im_end|><think>\nThree and three make six.\n</think>\n\n6<|im_end|>"


def test_a_think_block_in_the_content_counts_as_reasoning(tmp_path: Path,
                                                          tokenizer: Any) -> None:
    """Reasoning written inline (``<think>...</think>`` before the answer) is dropped from
    history by Qwen3 and from every turn by DeepSeek-R1's template: not trained in silence."""
    first = "<think>\nTwo and two.\n</think>\n\n4"
    second = "<think>\nThree and three.\n</think>\n\n6"
    inline = {"messages": [{"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": first},
                           {"role": "user", "content": "3+3?"},
                           {"role": "assistant", "content": second}]}
    skipped = prepare_rows(tmp_path, tokenizer, QWEN3, [inline, ONE_TURN], "assistant-only",
                      on_bad_example="skip")
    assert skipped.report.skipped == {"reasoning_dropped": 1}
    last = prepare_rows(tmp_path, tokenizer, QWEN3, [inline], "last-turn")
    assert "Three and three." in trained_text(tokenizer, last.dataset[0])


def test_deepseek_r1s_template_drops_inline_reasoning_from_every_turn() -> None:
    """The deepseek-v3 template (DeepSeek-R1's) keeps only what follows ``</think>``, even in
    the last turn: its reasoning can never be trained, and the turn is marked so."""
    from sft_plugins.masking import render_example

    row = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"}]}
    rendered = render_example(row, MANAGER.templates.get("deepseek-v3"), None)
    assert "Two and two." not in rendered.text
    assert [t.reasoning_dropped for t in rendered.turns] == [False, True]
