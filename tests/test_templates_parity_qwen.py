"""Qwen3-Instruct-2507, Qwen 3.5 (think and nothink), Qwen 3.6 and Qwen 3.8: byte parity with
the official templates (see ``test_templates_parity.py`` for the three checks), detection,
refusals, and how their reasoning trains.

The 3.5 / 3.6 / 3.8 conversations have what those templates handle: a system prompt first, user
queries (and user messages that are only a ``<tool_response>`` block, which the templates do not
count as queries), reasoning as a field or (3.5, 3.6) as a ``<think>`` block in the content, tool
calls with arguments as an object whose values are strings, numbers, booleans, ``null``, lists or
objects (each written as a ``<parameter=...>`` block; 3.8 also ``""``), multi-step tool
exchanges, ``enable_thinking``, ``preserve_thinking`` (3.6, 3.8) and ``reasoning_effort`` (3.8).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets.config
import pytest
from hypothesis import given
from hypothesis import strategies as st
from template_parity import (
    ARGS,
    MANAGER,
    NAMES,
    OFFICIAL_TEMPLATES,
    ONE_TURN,
    PARITY,
    TEXT,
    TOOLS,
    TWO_TURNS,
    call,
    check_parity,
    conversation,
    official_text,
    prepare_rows,
    shipped_tokenizer,
    template,
    trained_text,
)
from transformers import AutoTokenizer

from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.errors import ConversationError, MaskingError, TemplateError
from sft_plugins.masking import render_example

FAMILIES = {
    "qwen3-instruct-2507": "qwen3_instruct_2507.jinja",
    "qwen3.5-think": "qwen3_5_think.jinja",
    "qwen3.5-nothink": "qwen3_5_nothink.jinja",
    "qwen3.6": "qwen3_6.jinja",
    "qwen3.8": "qwen3_8.jinja",
}
HERMES = ["qwen3.5-think", "qwen3.5-nothink", "qwen3.6", "qwen3.8"]
"""The families with ``<function=...>`` tool calls and ``<think>`` blocks."""
SPLITTING = HERMES[:3]
"""Those that take a ``<think>`` block out of the content as the turn's reasoning (not 3.8)."""
NO_THINK_TAG = TEXT.filter(lambda text: "</think>" not in text)



@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)


# --------------------------------------------------------------------------- strategies

VALUES = st.one_of(
    st.text(max_size=8), st.integers(-5, 99), st.booleans(), st.none(),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.lists(st.integers(0, 9), max_size=2),
    st.dictionaries(st.sampled_from(["a", "b"]), st.text("xy", max_size=3), max_size=2),
)
OBJECT_ARGS = st.dictionaries(st.sampled_from(["city", "q", "n", "flag"]), VALUES, max_size=3)


@st.composite
def json_exchange(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Qwen3-2507: calls with arguments as an object or a JSON string, then tool results."""
    calls = []
    for _ in range(draw(st.integers(1, 2))):
        arguments: Any = draw(ARGS)
        if draw(st.booleans()):
            arguments = json.dumps(arguments)
        calls.append(call(draw(NAMES), arguments, draw(st.sampled_from(["function", None]))))
    message: dict[str, Any] = {"role": "assistant", "tool_calls": calls}
    if draw(st.booleans()):
        message["content"] = draw(TEXT)
    return [message, *[{"role": "tool", "content": draw(TEXT)}
                       for _ in range(draw(st.integers(1, 2)))]]


def assistant_text(family: str) -> Any:
    """Qwen 3.8 refuses ``</think>`` in the content (it would render it as the answer)."""
    return NO_THINK_TAG if family == "qwen3.8" else TEXT


@st.composite
def reasoning_assistant(draw: st.DrawFn, text: Any = TEXT, **fields: Any) -> dict[str, Any]:
    """An assistant turn, with reasoning in a field one time in three (``TEXT`` also writes
    ``<think>`` blocks into the content)."""
    message: dict[str, Any] = {"role": "assistant", "content": draw(text), **fields}
    if draw(st.integers(0, 2)) == 0:
        key = draw(st.sampled_from(["reasoning_content", "thinking", "reasoning"]))
        message[key] = draw(TEXT)
    return message


@st.composite
def hermes_call(draw: st.DrawFn, empty: bool) -> dict[str, Any]:
    """A call with arguments as an object, none, or (where ``empty``) ``""``."""
    function: dict[str, Any] = {"name": draw(NAMES)}
    kind = draw(st.integers(0, 5))
    if kind:
        function["arguments"] = "" if empty and kind == 1 else draw(OBJECT_ARGS)
    out: dict[str, Any] = {"function": function}
    if draw(st.booleans()):
        out["type"] = "function"
    return out


@st.composite
def hermes_exchange(draw: st.DrawFn, family: str) -> list[dict[str, Any]]:
    """One or two rounds of assistant tool calls (with content and reasoning or not) and their
    results, as tool messages or as a user message holding only a ``<tool_response>``."""
    messages: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 2))):
        calls = draw(st.lists(hermes_call(family == "qwen3.8"), min_size=1, max_size=2))
        message = draw(reasoning_assistant(assistant_text(family), tool_calls=calls))
        if draw(st.integers(0, 3)) == 0:
            message["content"] = None if draw(st.booleans()) else ""
        messages.append(message)
        if draw(st.integers(0, 4)) == 0:
            messages.append({"role": "user", "content": "<tool_response>\nr\n</tool_response>"})
        else:
            messages.extend({"role": "tool", "content": draw(TEXT)}
                            for _ in range(draw(st.integers(1, 2))))
    return messages


def with_a_query(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The 3.5 templates need one user query: ``TEXT`` may make every user message a bare
    ``<tool_response>`` block, so the first becomes a question then."""
    if any(m["role"] == "user" and not m["content"].strip().startswith("<tool_response>")
           for m in messages):
        return messages
    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    return [*messages[:first], {"role": "user", "content": "Hello!"}, *messages[first + 1:]]


@st.composite
def case(draw: st.DrawFn, family: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A conversation ``family`` can express and the keyword arguments to render it with."""
    options: dict[str, Any] = {"add_generation_prompt": draw(st.booleans())}
    if draw(st.booleans()):
        options["tools"] = draw(TOOLS)
    if family == "qwen3-instruct-2507":
        messages = draw(conversation(tool_exchange=json_exchange()))
        if draw(st.integers(0, 3)) == 0:  # a system message anywhere but between a call
            free = [i for i in range(1, len(messages) + 1)  # and its results
                    if i == len(messages) or messages[i]["role"] != "tool"]
            messages.insert(draw(st.sampled_from(free)), {"role": "system", "content": draw(TEXT)})
        return messages, options
    messages = with_a_query(draw(conversation(
        tool_exchange=hermes_exchange(family),
        assistant=reasoning_assistant(assistant_text(family)))))
    thinking = draw(st.sampled_from([None, True, False]))
    if thinking is not None:
        options["enable_thinking"] = thinking
    if family in ("qwen3.6", "qwen3.8") and draw(st.booleans()):
        options["preserve_thinking"] = draw(st.booleans())
    if family == "qwen3.8" and draw(st.booleans()):
        options["reasoning_effort"] = draw(st.sampled_from(["xhigh", "medium", "low"]))
    return messages, options


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_with_official_template(family: str, tokenizer: Any) -> None:
    ours = template(family)
    official = official_text(FAMILIES[family])

    @PARITY
    @given(case(family))
    def run(example: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
        check_parity(ours, tokenizer, official, *example)

    run()


# ------------------------------------------------------------------------------ detection

@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_official_text_is_recognised_without_bugs(family: str, tokenizer: Any) -> None:
    text = (OFFICIAL_TEMPLATES / FAMILIES[family]).read_text()
    found = template(family).recognise(text)
    assert found is not None and not found.bugs
    tokenizer.chat_template = text
    assert MANAGER.select_chat_template(tokenizer).name == family


# ------------------------------------------------------------------------------- refusals

USER = {"role": "user", "content": "Weather in Paris?"}


def calling(arguments: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function",
                            "function": {"name": "get_weather", "arguments": arguments}}]}


@pytest.mark.parametrize("family", HERMES)
@pytest.mark.parametrize(("messages", "index", "rule"), [
    ([USER, calling('{"city": "Paris"}')], 1, "tool-call-arguments"),
    ([USER, calling(["Paris"])], 1, "tool-call-arguments"),
    ([{"role": "user", "content": " <tool_response>r</tool_response>\n"},
      {"role": "assistant", "content": "a"}], None, "no-user-query"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], None,
     "no-user-query"),
    ([{"role": "tool", "content": "r"}, USER], 0, "tool-result-without-call"),
    ([USER, {"role": "assistant", "content": "Sure. <think>r</think>Paris"}], 1,
     "think-in-content"),
    ([USER, {"role": "assistant", "content": "<think>r</think>a</think>b"}], 1,
     "think-in-content"),
    ([USER, {"role": "assistant", "content": "<think><think>r</think>a"}], 1,
     "think-in-content"),
    ([USER, {"role": "assistant", "content": "a"}, {"role": "system", "content": "late"}], 2,
     "system-not-first"),
])
def test_hermes_families_refuse_what_they_would_render_wrongly(
        family: str, messages: list[dict[str, Any]], index: int | None, rule: str) -> None:
    with pytest.raises(ConversationError) as caught:
        template(family).render(messages)
    assert caught.value.rule == rule and caught.value.message_index == index
    assert str(caught.value).startswith(f"{family}:")  # the general rules name it too
    if index is not None:
        assert f"message {index}" in str(caught.value)


@pytest.mark.parametrize("family", SPLITTING)
def test_a_think_block_opening_the_content_is_reasoning(family: str, tokenizer: Any) -> None:
    """What the refusal leaves: one ``<think>`` block (or reasoning closed by ``</think>``,
    as the generation prompt opens it) before the answer renders as the official text does,
    and a reasoning field keeps a ``</think>`` in the content as it is."""
    for content in ("<think>r</think>Paris", " r\n</think>\n\nParis", "</think>"):
        messages = [USER, {"role": "assistant", "content": content}]
        check_parity(template(family), tokenizer, official_text(FAMILIES[family]), messages,
                     {})
    kept = template(family).render(
        [USER, {"role": "assistant", "content": "a</think>b</think>", "reasoning_content": "r"}])
    assert "<think>\nr\n</think>\n\na</think>b</think><|im_end|>" in kept.text


def test_qwen3_8_takes_reasoning_from_the_field_only() -> None:
    """Qwen 3.8 renders the content as it is: a ``<think>`` block there would follow an empty
    one and be trained as the answer, so it is refused; the field is rendered in the block."""
    ours = template("qwen3.8")
    with pytest.raises(ConversationError, match="reads reasoning only from") as caught:
        ours.render([USER, {"role": "assistant", "content": "<think>r</think>Paris"}])
    assert caught.value.rule == "think-in-content" and caught.value.message_index == 1
    text = ours.render_text([USER, {"role": "assistant", "content": "Paris", "thinking": "r"}])
    assert text.endswith("<|im_start|>assistant\n<think>\nr\n</think>\n\nParis<|im_end|>\n")


def test_qwen3_8_reasoning_effort_writes_the_system_prompt(tokenizer: Any) -> None:
    ours = template("qwen3.8")
    messages = [USER, {"role": "assistant", "content": "Sunny."}]
    assert "Reasoning effort is set to xhigh" in ours.render_text(messages)
    assert "Reasoning effort is set to low" in ours.render_text(messages, reasoning_effort="low")
    assert "<|im_start|>system" not in ours.render_text(messages, reasoning_effort="medium")
    assert "<|im_start|>system" not in ours.render_text(messages, enable_thinking=False)
    with pytest.raises(TemplateError, match="Unexpected reasoning effort max"):
        ours.render(messages, reasoning_effort="max")
    empty = {"role": "assistant", "content": "",
             "tool_calls": [{"function": {"name": "now", "arguments": ""}}]}
    check_parity(ours, tokenizer, official_text("qwen3_8.jinja"), [USER, empty], {})
    with pytest.raises(ConversationError) as caught:
        template("qwen3.6").render([USER, empty])
    assert caught.value.rule == "tool-call-arguments"


def test_qwen3_instruct_2507_refusals() -> None:
    ours = template("qwen3-instruct-2507")
    with pytest.raises(ConversationError,
                       match=r"message 1: .*cannot express reasoning") as caught:
        ours.render([USER, {"role": "assistant", "content": "a", "reasoning_content": "r"}])
    assert caught.value.rule == "no-reasoning"
    no_arguments = {"role": "assistant", "content": "",
                    "tool_calls": [{"function": {"name": "get_weather"}}]}
    with pytest.raises(ConversationError, match=r"^qwen3-instruct-2507: message 1:") as caught:
        ours.render([USER, no_arguments])
    assert caught.value.rule == "tool-call-arguments"


def test_qwen3_instruct_2507_trains_a_think_block_in_the_content_as_text() -> None:
    rendered = template("qwen3-instruct-2507").render(
        [USER, {"role": "assistant", "content": "<think>\nr\n</think>\n\nParis"}])
    start, end = rendered.trained_spans[0]
    assert rendered.text[start:end] == "<think>\nr\n</think>\n\nParis<|im_end|>"


def test_qwen3_5_writes_python_literals_and_qwen3_6_json_for_argument_values() -> None:
    """A difference of the official texts, kept for parity: Qwen 3.5 writes a boolean or null
    argument as Python writes it (``True``, ``None``), Qwen 3.6 as JSON (``true``, ``null``)."""
    messages = [USER, calling({"metric": True, "unit": None, "days": [1, 2]})]
    old = template("qwen3.5-think").render_text(messages)
    new = template("qwen3.6").render_text(messages)
    assert "<parameter=metric>\nTrue\n" in old and "<parameter=unit>\nNone\n" in old
    assert "<parameter=metric>\ntrue\n" in new and "<parameter=unit>\nnull\n" in new
    assert "<parameter=days>\n[1, 2]\n" in old and "<parameter=days>\n[1, 2]\n" in new


# ------------------------------------------------------------------------------ reasoning

@pytest.fixture
def qwen_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The shipped tokenizer with Qwen's special tokens (and a data cache of its own)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    return shipped_tokenizer(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_pad|>"])


@pytest.mark.parametrize("family", HERMES)
def test_reasoning_of_an_earlier_turn_is_not_trained_in_silence(
        family: str, tmp_path: Path, qwen_tokenizer: Any) -> None:
    ours = template(family)
    if family == "qwen3.8":  # it keeps every turn's reasoning unless told not to
        ours = ours.with_variables({"preserve_thinking": False})
    with pytest.raises(MaskingError, match=r"message 1 is trained, but .*without its reasoning"):
        prepare_rows(tmp_path, qwen_tokenizer, ours, [TWO_TURNS], "assistant-only")
    skipped = prepare_rows(tmp_path, qwen_tokenizer, ours, [TWO_TURNS, ONE_TURN], "assistant-only",
                      on_bad_example="skip")
    assert skipped.report.skipped == {"reasoning_dropped": 1} and skipped.report.kept == 1
    last = prepare_rows(tmp_path, qwen_tokenizer, ours, [TWO_TURNS], "last-turn")
    assert trained_text(qwen_tokenizer, last.dataset[0]) == \
        "<think>\nThree and three make six.\n</think>\n\n6<|im_end|>"


@pytest.mark.parametrize("family", ["qwen3.6", "qwen3.8"])
def test_preserve_thinking_trains_every_turns_reasoning(
        family: str, tmp_path: Path, qwen_tokenizer: Any) -> None:
    """Qwen 3.6 with ``preserve_thinking=True``, Qwen 3.8 by default."""
    ours = template(family)
    if family == "qwen3.6":
        ours = ours.with_variables({"preserve_thinking": True})
    prepared = prepare_rows(tmp_path, qwen_tokenizer, ours, [TWO_TURNS], "assistant-only")
    assert trained_text(qwen_tokenizer, prepared.dataset[0]) == (
        "<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>"
        "<think>\nThree and three make six.\n</think>\n\n6<|im_end|>")


def test_an_earlier_think_block_in_the_content_counts_as_dropped_reasoning() -> None:
    inline = {"messages": [{"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "<think>\nTwo.\n</think>\n\n4"},
                           {"role": "user", "content": "3+3?"},
                           {"role": "assistant", "content": "<think>\nThree.\n</think>\n\n6"}]}
    for family in SPLITTING:
        rendered = render_example(inline, template(family), None)
        assert [t.reasoning_dropped for t in rendered.turns] == [False, True, False, False]
