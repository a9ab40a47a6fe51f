"""gpt-oss (harmony) and Mistral-7B-Instruct-v0.3: byte parity with the official templates (see
``test_templates_parity.py`` for the three checks), detection, refusals, and what is trained.

The gpt-oss conversations have what its template handles: a system or developer message first,
user turns, answers with or without reasoning (``thinking``, the field the template reads, or
``reasoning_content`` or ``reasoning``, which ``transformers`` and the project copy into it), one
tool call per assistant message with an object of arguments and reasoning or not, its results,
tools whose parameters use every kind of type the template writes in TypeScript,
``reasoning_effort``, ``model_identity`` and ``builtin_tools``.

The Mistral ones: user/assistant alternation with tool calls (nine-character ids, one or two per
message) and their results in between, and the tool list; no system message, which the family
refuses since the template drops it from every training example.
"""

from __future__ import annotations

import string
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
from sft_plugins.errors import ConversationError, MaskingError
from sft_plugins.templates import RenderedConversation

FAMILIES = {"gpt-oss": "gptoss.jinja", "mistral": "mistral.jinja"}



@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)


# --------------------------------------------------------------------------- strategies

PARAMETER_SPECS = st.sampled_from([
    {"type": "string", "description": "a city"},
    {"type": "string", "enum": ["c", "f"], "default": "c"},
    {"type": "string", "nullable": True},
    {"type": "integer", "default": 3},
    {"type": "number"},
    {"type": "boolean", "default": False},
    {"type": "array", "items": {"type": "string"}},
    {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "integer"}}}},
    {"type": "array"},
    {"type": ["string", "number"]},
    {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
    {"type": "object"},
    {"description": "anything"},
])


@st.composite
def harmony_tool(draw: st.DrawFn) -> dict[str, Any]:
    """A function tool whose parameters cover the template's TypeScript rendering."""
    properties = draw(st.dictionaries(st.sampled_from(["city", "unit", "days", "q"]),
                                      PARAMETER_SPECS, max_size=3))
    function: dict[str, Any] = {"name": draw(NAMES), "description": "does it"}
    if properties or draw(st.booleans()):
        function["parameters"] = {"type": "object", "properties": properties}
        if properties and draw(st.booleans()):
            function["parameters"]["required"] = sorted(properties)[:1]
    return {"type": "function", "function": function}


REASONING_KEYS = st.sampled_from(["thinking", "reasoning_content", "reasoning"])
"""The template reads ``thinking``; ``transformers`` and the project copy the others into it."""


@st.composite
def harmony_answer(draw: st.DrawFn) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": draw(TEXT)}
    if draw(st.integers(0, 2)) == 0:
        message[draw(REASONING_KEYS)] = draw(TEXT)
    return message


@st.composite
def harmony_exchange(draw: st.DrawFn) -> list[dict[str, Any]]:
    """One or two tool calls, each in its own message (reasoning or not, content empty or
    absent), each followed by one or two results."""
    messages: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 2))):
        message: dict[str, Any] = {"role": "assistant", "tool_calls": [call(draw(NAMES),
                                                                        draw(ARGS))]}
        if draw(st.booleans()):
            message[draw(REASONING_KEYS)] = draw(TEXT)
        if draw(st.booleans()):
            message["content"] = ""
        messages.append(message)
        messages.extend({"role": "tool", "content": draw(TEXT)}
                        for _ in range(draw(st.integers(1, 2))))
    return messages


def gpt_oss_case(draw: st.DrawFn, options: dict[str, Any]) -> list[dict[str, Any]]:
    messages = draw(conversation(system=False, tool_exchange=harmony_exchange(),
                                 assistant=harmony_answer()))
    if draw(st.booleans()):
        role = draw(st.sampled_from(["system", "developer"]))
        messages.insert(0, {"role": role, "content": draw(st.sampled_from(["", "Be brief."]))
                            if draw(st.booleans()) else draw(TEXT)})
    if draw(st.booleans()):
        options["tools"] = draw(st.one_of(TOOLS, st.lists(harmony_tool(), min_size=1,
                                                          max_size=2)))
    if draw(st.booleans()):
        options["reasoning_effort"] = draw(st.sampled_from(["low", "medium", "high"]))
    if draw(st.integers(0, 3)) == 0:
        options["model_identity"] = draw(TEXT)
    if draw(st.integers(0, 3)) == 0:
        options["builtin_tools"] = draw(st.lists(st.sampled_from(["browser", "python"]),
                                                 max_size=2, unique=True))
    return messages


CALL_IDS = st.text(string.ascii_letters + string.digits, min_size=9, max_size=9)


@st.composite
def mistral_exchange(draw: st.DrawFn) -> list[dict[str, Any]]:
    """An assistant message with one or two calls (content empty or absent), then a result
    for each, naming its call."""
    ids = draw(st.lists(CALL_IDS, min_size=1, max_size=2, unique=True))
    calls = [{**call(draw(NAMES), draw(ARGS)), "id": i} for i in ids]
    message: dict[str, Any] = {"role": "assistant", "tool_calls": calls}
    if draw(st.booleans()):
        message["content"] = ""
    return [message, *({"role": "tool", "content": draw(TEXT), "tool_call_id": i}
                       for i in ids)]


def mistral_case(draw: st.DrawFn, options: dict[str, Any]) -> list[dict[str, Any]]:
    messages = draw(conversation(system=False, tool_exchange=mistral_exchange()))
    users = [m for m in messages if m["role"] == "user"]
    if users.count(users[-1]) == 1 and draw(st.booleans()):  # else refused: tools-repeated
        options["tools"] = draw(TOOLS)
    return messages


@st.composite
def case(draw: st.DrawFn, family: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A conversation ``family`` can express and the keyword arguments to render it with."""
    options: dict[str, Any] = {"add_generation_prompt": draw(st.booleans())}
    messages = (gpt_oss_case if family == "gpt-oss" else mistral_case)(draw, options)
    return messages, options


# --------------------------------------------------------------------------------- parity

HARMONY_HISTORY_END = "<|end|>"
"""gpt-oss closes an earlier answer with ``<|end|>`` (the template renders history so), which is
not a stop token: the analysis message an answer follows ends with it too. ``check_spans`` wants
every trained span to end with a stop token, so the parity run gives it ``<|end|>`` as well, and
:func:`check_harmony_turns` checks exactly which turn ends with which token."""


def check_harmony_turns(rendered: RenderedConversation, messages: list[dict[str, Any]],
                        add_generation_prompt: bool) -> None:
    """Each trained span follows its ``<|start|>assistant`` prompt and ends with ``<|call|>``
    (a tool call), ``<|return|>`` (the last answer, when no generation prompt follows) or
    ``<|end|>`` (an earlier answer)."""
    text = rendered.text
    for span in rendered.messages:
        if span.trained is None:
            continue
        start, end = span.trained
        assert text[span.start:start] == "<|start|>assistant"
        last = span.index == len(messages) - 1 and not add_generation_prompt
        if "tool_calls" in messages[span.index]:
            expected = "<|call|>"
        else:
            expected = "<|return|>" if last else HARMONY_HISTORY_END
        assert text[start:end].endswith(expected)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_with_official_template(family: str, tokenizer: Any) -> None:
    ours = template(family)
    official = official_text(FAMILIES[family])
    spans_checked_by = ours if family == "mistral" else ours.with_options(
        stop_tokens=(*ours.stop_tokens, HARMONY_HISTORY_END))

    @PARITY
    @given(case(family))
    def run(example: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
        messages, options = example
        check_parity(spans_checked_by, tokenizer, official, messages, options)
        if family == "gpt-oss":
            check_harmony_turns(ours.render(messages, **options), messages,
                                options["add_generation_prompt"])

    run()


def test_gpt_oss_does_not_stop_generation_at_the_end_of_a_message() -> None:
    """``<|end|>`` also closes the analysis message before the answer: stopping there would cut
    every answer off after its reasoning."""
    ours = template("gpt-oss")
    assert "<|end|>" not in {ours.end_of_turn, *ours.stop_tokens}
    assert {"<|return|>", "<|call|>"} <= set(ours.stop_tokens)
    assert ours.pad_token not in {ours.end_of_turn, "<|end|>"}


# ------------------------------------------------------------------------------ detection

@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_official_text_is_recognised_without_bugs(family: str, tokenizer: Any) -> None:
    text = (OFFICIAL_TEMPLATES / FAMILIES[family]).read_text()
    found = template(family).recognise(text)
    assert found is not None and not found.bugs
    tokenizer.chat_template = text
    assert MANAGER.select_chat_template(tokenizer).name == family
    tokenizer.chat_template = template(family).tokenizer_source
    assert MANAGER.select_chat_template(tokenizer).name == family


# ------------------------------------------------------------------------------- refusals

USER = {"role": "user", "content": "Weather in Paris?"}
ANSWER = {"role": "assistant", "content": "Sunny."}
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "d"}}]


def calling(arguments: Any = None, *, calls: int = 1, call_id: Any = "a1B2c3D4e",
            **fields: Any) -> dict[str, Any]:
    one = {"type": "function", "id": call_id,
           "function": {"name": "get_weather", "arguments": arguments or {"city": "Paris"}}}
    return {"role": "assistant", "content": "", "tool_calls": [one] * calls, **fields}


def result(call_id: Any = "a1B2c3D4e") -> dict[str, Any]:
    return {"role": "tool", "content": "sunny", "tool_call_id": call_id}


@pytest.mark.parametrize(("messages", "tools", "index", "rule"), [
    ([USER, {"role": "developer", "content": "late"}], None, 1, "system-not-first"),
    ([USER, {"role": "system", "content": "late"}], None, 1, "system-not-first"),
    ([{"role": "system", "content": "s"}, {"role": "developer", "content": "d"}, USER], None, 1,
     "system-not-first"),
    ([USER, calling(content="Let me look.")], None, 1, "tool-call-content"),
    ([USER, calling(calls=2)], None, 1, "one-tool-call"),
    ([USER, calling('{"city": "Paris"}')], None, 1, "tool-call-arguments"),
    ([USER, {**ANSWER, "content": "<|channel|>final<|message|>Sunny."}], None, 1,
     "channel-tags"),
    ([USER, {**ANSWER, "thinking": "<|channel|>analysis<|message|>hm"}], None, 1,
     "channel-tags"),
    ([USER, result()], None, 1, "tool-result-without-call"),
    ([USER, calling(), result(), USER, result()], None, 4, "tool-result-without-call"),
    ([USER, {"role": "ipython", "content": "x"}], None, 1, "unknown-role"),
    ([{**USER, "thinking": "hm"}], None, 0, "reasoning-not-assistant"),
])
def test_gpt_oss_refuses_what_it_would_render_wrongly(
        messages: list[dict[str, Any]], tools: Any, index: int, rule: str) -> None:
    with pytest.raises(ConversationError) as caught:
        template("gpt-oss").render(messages, tools=tools)
    assert caught.value.rule == rule and caught.value.message_index == index
    assert str(caught.value).startswith(f"gpt-oss: message {index}:")


@pytest.mark.parametrize(("messages", "tools", "index", "rule"), [
    ([{"role": "system", "content": "Be brief."}, USER, ANSWER], None, 0, "no-system"),
    ([{"role": "system", "content": "Be brief."}, USER], None, 0, "no-system"),
    ([USER, USER], None, 1, "alternation"),
    ([ANSWER, USER], None, 0, "alternation"),
    ([USER, calling(), result(), USER], None, 3, "alternation"),
    ([USER, ANSWER, {"role": "system", "content": "late"}, USER], None, 2, "no-system"),
    ([USER, calling(content="Let me look.")], None, 1, "tool-call-content"),
    ([USER, calling('{"city": "Paris"}')], None, 1, "tool-call-arguments"),
    ([USER, calling(call_id="call_1")], None, 1, "tool-call-id"),
    ([USER, calling(call_id=None)], None, 1, "tool-call-id"),
    ([USER, calling(call_id="a1B2c3D4-")], None, 1, "tool-call-id"),
    ([USER, calling(), result("call_1")], None, 2, "tool-call-id"),
    ([USER, calling(), {"role": "tool", "content": "sunny"}], None, 2, "tool-call-id"),
    ([calling(), result()], WEATHER, 1, "tools-need-user-message"),
    ([USER, ANSWER, USER], WEATHER, 0, "tools-repeated"),
    ([USER, ANSWER], [], 1, "empty-tools"),
    ([USER, {**ANSWER, "reasoning_content": "hm"}], None, 1, "no-reasoning"),
    ([USER, {"role": "tool_results", "content": "x"}], None, 1, "unknown-role"),
])
def test_mistral_refuses_what_it_would_render_wrongly(
        messages: list[dict[str, Any]], tools: Any, index: int, rule: str) -> None:
    with pytest.raises(ConversationError) as caught:
        template("mistral").render(messages, tools=tools)
    assert caught.value.rule == rule and caught.value.message_index == index
    assert str(caught.value).startswith(f"mistral: message {index}:")


def official(family: str, tokenizer: Any, messages: list[dict[str, Any]], **options: Any
             ) -> str:
    ours = template(family)
    return tokenizer.apply_chat_template(
        messages, chat_template=official_text(FAMILIES[family]), tokenize=False,
        bos_token=ours.bos_token, eos_token=ours.eos_token, **options)


def test_what_the_refusals_keep_from_happening(tokenizer: Any) -> None:
    """The official templates render these conversations, without the refused part."""
    system = {"role": "system", "content": "Answer in French."}
    assert "Answer in French." not in official("mistral", tokenizer, [system, USER, ANSWER])
    assert "Answer in French." in official("mistral", tokenizer, [system, USER])
    assert "Let me look." not in official(
        "mistral", tokenizer, [USER, calling(content="Let me look."), result(), ANSWER])
    assert '"arguments": "{\\"city\\"' in official(
        "mistral", tokenizer, [USER, calling('{"city": "Paris"}')])
    twice = official("mistral", tokenizer, [USER, ANSWER, USER], tools=WEATHER)
    assert twice.count("[AVAILABLE_TOOLS]") == 2
    assert "[AVAILABLE_TOOLS] [[/AVAILABLE_TOOLS]" in official("mistral", tokenizer, [USER],
                                                               tools=[])
    developer = {"role": "developer", "content": "Answer in French."}
    assert "Answer in French." not in official("gpt-oss", tokenizer, [USER, developer, ANSWER])
    second = calling({"city": "Lyon"})["tool_calls"][0]
    two = {**calling(), "tool_calls": [calling()["tool_calls"][0], second]}
    assert "Lyon" not in official("gpt-oss", tokenizer, [USER, two])
    assert "Let me look." not in official(
        "gpt-oss", tokenizer, [USER, calling(content="Let me look."), result(), ANSWER])
    assert '<|message|>"{\\"city\\": \\"Paris\\"}"<|call|>' in official(
        "gpt-oss", tokenizer, [USER, calling('{"city": "Paris"}')])


def test_mistral_has_no_generation_prompt_and_trains_the_space_before_an_answer() -> None:
    ours = template("mistral")
    prompt = ours.render_text([USER], add_generation_prompt=True)
    assert prompt == ours.render_text([USER]) == "<s>[INST] Weather in Paris?[/INST]"
    rendered = ours.render([USER, {"role": "assistant", "content": "  Sunny.\n"}])
    start, end = rendered.trained_spans[0]
    assert rendered.text[start:end] == " Sunny.</s>"


# ------------------------------------------------------------------------------ reasoning

HARMONY_TOKENS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>",
                  "<|constrain|>", "<|startoftext|>", "<|endoftext|>"]


@pytest.fixture
def harmony_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The shipped tokenizer with harmony's special tokens (and a data cache of its own)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    return shipped_tokenizer(HARMONY_TOKENS)


LOW_EFFORT = template("gpt-oss").with_variables({"reasoning_effort": "low"})
"""gpt-oss as the reasoning tests train it."""


def test_gpt_oss_trains_the_last_answer_with_its_analysis(tmp_path: Path,
                                                          harmony_tokenizer: Any) -> None:
    prepared = prepare_rows(tmp_path, harmony_tokenizer, LOW_EFFORT,
                            [{"messages": TWO_TURNS["messages"][2:]}], "assistant-only")
    assert trained_text(harmony_tokenizer, prepared.dataset[0]) == (
        "<|channel|>analysis<|message|>Three and three make six.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>6<|return|>")
    assert harmony_tokenizer.pad_token == "<|endoftext|>"


def test_gpt_oss_reasoning_of_an_earlier_answer_is_not_trained_in_silence(
        tmp_path: Path, harmony_tokenizer: Any) -> None:
    with pytest.raises(MaskingError, match=r"message 1 is trained, but .*without its reasoning"):
        prepare_rows(tmp_path, harmony_tokenizer, LOW_EFFORT, [TWO_TURNS], "assistant-only")
    skipped = prepare_rows(tmp_path, harmony_tokenizer, LOW_EFFORT, [TWO_TURNS, ONE_TURN],
                           "assistant-only", on_bad_example="skip")
    assert skipped.report.skipped == {"reasoning_dropped": 1} and skipped.report.kept == 1
    last = prepare_rows(tmp_path, harmony_tokenizer, LOW_EFFORT, [TWO_TURNS], "last-turn")
    assert trained_text(harmony_tokenizer, last.dataset[0]) == (
        "<|channel|>analysis<|message|>Three and three make six.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>6<|return|>")


def test_gpt_oss_reasoning_of_a_tool_call_an_answer_follows_is_not_trained_in_silence(
        tmp_path: Path, harmony_tokenizer: Any) -> None:
    """The template keeps a tool call's analysis only while no final answer follows it."""
    thinking_call = calling(reasoning_content="I need the weather.")
    answered = {"messages": [USER, thinking_call, result(), ANSWER]}
    with pytest.raises(MaskingError, match=r"message 1 is trained, but .*without its reasoning"):
        prepare_rows(tmp_path, harmony_tokenizer, LOW_EFFORT, [answered], "assistant-only")
    pending = prepare_rows(tmp_path, harmony_tokenizer, LOW_EFFORT,
                           [{"messages": [USER, thinking_call]}], "assistant-only")
    assert trained_text(harmony_tokenizer, pending.dataset[0]) == (
        "<|channel|>analysis<|message|>I need the weather.<|end|><|start|>assistant"
        ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}'
        "<|call|>")


def test_gpt_oss_expanded_trains_every_answer_as_the_model_generates_it(
        tmp_path: Path, harmony_tokenizer: Any) -> None:
    """With ``expand=all`` each answer is the last of its own example: trained with its analysis
    and closed by ``<|return|>``, not rendered as history."""
    expanded = prepare_rows(tmp_path, harmony_tokenizer, LOW_EFFORT, [TWO_TURNS], "assistant-only",
                            expand="all")
    assert [trained_text(harmony_tokenizer, row) for row in expanded.dataset] == [
        "<|channel|>analysis<|message|>Two and two make four.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>4<|return|>",
        "<|channel|>analysis<|message|>Three and three make six.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>6<|return|>"]
