"""Each assistant turn trained in the context the model sees when it generates it.

With the collator option ``expand``, a conversation becomes one example per assistant turn. The
property, for every shipped family on generated multi-turn conversations: the tokens before each
trained turn are exactly the official template's rendering of the history with
``add_generation_prompt=True`` (what the model is given at inference), and the trained tokens are
what the official template renders for that turn after it (what the model must generate:
reasoning, answer, end of turn). Every assistant turn is trained exactly once, and reasoning that
the template keeps for the last turn is trained with it.
"""

from __future__ import annotations

from typing import Any

import datasets.config
import pytest
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from template_parity import PARITY, TEXT, shipped_tokenizer, special_tokens
from test_templates_parity import official_sources
from test_templates_train import family_tokenizer

from sft_plugins.errors import MaskingError, PluginOptionError, SkipExample
from sft_plugins.loss import IGNORE_INDEX
from sft_plugins.masking import Labelled, label_examples
from sft_plugins.templates import ChatTemplate
from sft_plugins.testing import plugin_manager

MANAGER = plugin_manager("sft_plugins_templates", "sft_plugins_collators")
FAMILIES = sorted(MANAGER.templates.names())
OFFICIAL = official_sources()
OPENED_BY_THE_GENERATION_PROMPT = {
    "deepseek-v3": "<think>\n",
    "qwen3.5-think": "<think>\n", "qwen3.6": "<think>\n", "qwen3.8": "<think>\n",
    "qwen3.5-nothink": "<think>\n\n</think>\n\n",
    "deepseek-r1-distill": "<think>\n", "nemotron-3-nano": "<think>\n",
    "nemotron-3-super": "<think>\n", "nemotron-3-ultra": "<think>\n",
    "nemotron-3.5-lightning": "<think>\n",
    "olmo-3": "<think>",  # its trained turn starts after the header: the data writes <think>
}
"""Families whose official generation prompt ends in text their trained turn does not follow:
DeepSeek-R1's template opens a block that its rendering of an answered turn never holds (it
strips everything up to ``</think>``); Qwen 3.5 / 3.6 / 3.8 open the turn's ``<think>`` block
(3.5 nothink: write an empty one), and their trained turn starts at its own ``<think>`` right
after ``<|im_start|>assistant\n``, as qwen3's does, so the model learns to write the block
itself. The R1-Distill template opens ``<think>\n`` as DeepSeek-R1's does; Nemotron 3 opens
``<think>\n`` and trains the turn from its own ``<think>`` block (empty without reasoning).
Their turns are trained after the prompt without it, a difference the docs state and this test
pins."""
ANSWERS_WITHOUT_REASONING = {"gemma-4"}
"""Reasoning families whose template renders reasoning on tool-call turns only, never on an
answer (such an answer's reasoning is refused)."""
CLOSED_BY_THE_NEXT_ROLE = {"glm-4-moe": "<|user|>"}
"""Families with no end-of-turn token: a GLM turn ends at the next message's role token, the
token the model stops at, and ours closes the last turn with it where the official text ends."""


@pytest.fixture(autouse=True)
def _cache(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))


def _plain(text: str) -> str:
    """Text the tokenizer reads back as written: no special-token strings, no edge spaces
    (which some templates strip)."""
    return text.replace("<", "(").strip() or "ok"


@st.composite
def exchanges(draw: st.DrawFn, template: ChatTemplate) -> list[dict[str, Any]]:
    """system? then 2-4 user/assistant exchanges; reasoning on some turns where the family has
    it."""
    messages: list[dict[str, Any]] = []
    if template.system != "none" and draw(st.booleans()):
        messages.append({"role": "system", "content": _plain(draw(TEXT))})
    for _ in range(draw(st.integers(2, 4))):
        messages.append({"role": "user", "content": _plain(draw(TEXT))})
        answer: dict[str, Any] = {"role": "assistant", "content": _plain(draw(TEXT))}
        if template.reasoning and template.name not in ANSWERS_WITHOUT_REASONING \
                and draw(st.booleans()):
            answer["reasoning_content"] = _plain(draw(TEXT))
        messages.append(answer)
    return messages


def trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of each maximal run of tokens that carry loss."""
    runs, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_each_turn_is_trained_after_the_official_generation_prompt(family: str) -> None:
    template = MANAGER.templates.get(family)
    tokenizer = family_tokenizer(family)
    collator = MANAGER.collators.create("assistant-only", expand="all")
    collator.bind(tokenizer, template)

    def official(messages: list[dict[str, Any]], **options: Any) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=OFFICIAL[family],
                                             tokenize=False, **special_tokens(template),
                                             **options)

    @settings(PARITY, max_examples=25)
    @given(exchanges(template))
    def run(messages: list[dict[str, Any]]) -> None:
        [results] = label_examples(collator, [{"messages": messages}], tokenizer, template)
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        assert len(results) == len(answers)  # one example per assistant turn
        for index, result in zip(answers, results, strict=True):
            assert isinstance(result, Labelled), result
            [(start, end)] = trained_runs(result.labels)  # only this turn
            prompt = official(messages[:index], add_generation_prompt=True)
            opened = OPENED_BY_THE_GENERATION_PROMPT.get(family, "")
            assert prompt.endswith(opened)
            prompt = prompt[:len(prompt) - len(opened)]
            ids = tokenizer(prompt, add_special_tokens=False).input_ids
            assert result.input_ids[:start] == ids
            turn = official(messages[:index + 1])[len(prompt):]
            turn += CLOSED_BY_THE_NEXT_ROLE.get(family, "")
            generated = tokenizer.decode(result.input_ids[start:end])
            assert turn.startswith(generated)
            assert generated.endswith((template.end_of_turn, *template.stop_tokens))
            assert messages[index]["content"] in generated
            reasoning = messages[index].get("reasoning_content")
            assert reasoning is None or reasoning in generated

    run()


QWEN3_TWO_TURNS = {"messages": [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "6", "reasoning_content": "Three and three make six."}]}
PLAIN_TWO_TURNS = {"messages": [
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]}


@pytest.fixture(scope="module")
def qwen3() -> tuple[ChatTemplate, Any]:
    template = MANAGER.templates.get("qwen3")
    tokenizer = shipped_tokenizer(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    template.configure_tokenizer(tokenizer)
    return template, tokenizer


def test_expand_reasoning_splits_only_the_rows_that_would_drop_reasoning(qwen3: Any) -> None:
    template, tokenizer = qwen3
    collator = MANAGER.collators.create("assistant-only", expand="reasoning")
    prepared = collator.prepare(Dataset.from_list([QWEN3_TWO_TURNS, PLAIN_TWO_TURNS]),
                                tokenizer, template, desc=None)
    assert (prepared.report.total, prepared.report.kept, prepared.report.rows) == (3, 3, 2)
    assert "expanded from 2 rows" in prepared.report.summary()
    texts = [tokenizer.decode(row["input_ids"]) for row in prepared.dataset]
    assert "Two and two make four." in texts[0] and "Three and three" not in texts[0]
    assert "Two and two" not in texts[1] and "Three and three make six." in texts[1]
    assert "Hello" in texts[2] and "Goodbye" in texts[2]  # not expanded: both turns trained
    assert len(trained_runs(prepared.dataset[2]["labels"])) == 2


def test_without_expand_the_dropped_reasoning_stops_preparation_naming_the_option(
        qwen3: Any) -> None:
    template, tokenizer = qwen3
    collator = MANAGER.collators.create("assistant-only")
    with pytest.raises(MaskingError, match=r"example 0: message 1 is trained.*expand=reasoning"):
        collator.prepare(Dataset.from_list([QWEN3_TWO_TURNS]), tokenizer, template, desc=None)


def test_a_skipped_turn_is_counted_and_named_with_its_row(qwen3: Any) -> None:
    """A turn too long for max_length is dropped on its own; the others train."""
    template, tokenizer = qwen3
    long = {"messages": [*PLAIN_TWO_TURNS["messages"][:2],
                         {"role": "user", "content": "word " * 200},
                         {"role": "assistant", "content": "done"}]}
    collator = MANAGER.collators.create("assistant-only", expand="all", max_length=40,
                                        truncation="drop")
    collator.bind(tokenizer, template)
    [results] = label_examples(collator, [long], tokenizer, template)
    assert isinstance(results[0], Labelled)
    assert isinstance(results[1], SkipExample) and results[1].reason == "too_long"
    prepared = collator.prepare(Dataset.from_list([long]), tokenizer, template, desc=None)
    assert (prepared.report.total, prepared.report.kept) == (2, 1)
    assert prepared.report.first_skips[0].startswith("example 0, turn 2 of 2: too_long")


def test_rows_that_are_not_plain_conversations_are_never_expanded(qwen3: Any) -> None:
    template, tokenizer = qwen3
    collator = MANAGER.collators.create("completion-only", expand="all")
    messages = PLAIN_TWO_TURNS["messages"]
    row = {"prompt": messages[:3], "completion": messages[3:]}
    collator.bind(tokenizer, template)
    [results] = label_examples(collator, [row], tokenizer, template)
    assert len(results) == 1 and isinstance(results[0], Labelled)


def test_an_unknown_expand_value_names_the_option() -> None:
    with pytest.raises(PluginOptionError, match="expand='yes' is invalid; expected off or "
                                                "reasoning or all"):
        MANAGER.collators.create("assistant-only", expand="yes")
