"""GLM-4-MoE, Nemotron 3 (Nano, Super, Ultra), Nemotron 3.5 Lightning and DeepSeek-R1-Distill:
byte parity with the official templates (see ``test_templates_parity.py`` for the three
checks), detection, refusals, and what is trained.

The GLM conversations have system messages first or after a user message, reasoning as a field
or a ``<think>`` block in the content, tool calls with objects of arguments (and content beside
them or not) and their results, the tool list, ``enable_thinking``. Our GLM template closes a
conversation's last assistant turn with ``<|user|>``, which the official text leaves open, so its
parity is checked against the official text plus exactly that token (and, separately, against
the bare official text with ``close_last_turn=False``). The Nemotron ones have the same kinds of
turns with richer tool lists (enums, required lists, extra keys), argument values of every JSON
type, ``enable_thinking``, ``truncate_history_thinking`` and each checkpoint's effort flag. The
R1-Distill ones are plain chats whose answers may hold a ``<think>`` block.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import datasets.config
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from template_parity import (
    ARGS,
    MANAGER,
    NAMES,
    OFFICIAL_TEMPLATES,
    PARITY,
    TEXT,
    TOOLS,
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
from sft_plugins.templates import ChatTemplate

FAMILIES = {
    "glm-4-moe": "glm4moe.jinja",
    "nemotron-3-nano": "nemotron_3_nano.jinja",
    "nemotron-3-super": "nemotron_3_super.jinja",
    "nemotron-3-ultra": "nemotron_3_ultra.jinja",
    "nemotron-3.5-lightning": "nemotron_3_5_lightning.jinja",
    "deepseek-r1-distill": "deepseek_r1_distill.jinja",
}
GLM_4_6 = "glm4_6.jinja"
"""GLM-4.6's template, recognised as glm-4-moe (see the README of the fixtures)."""
NEMOTRON = ["nemotron-3-nano", "nemotron-3-super", "nemotron-3-ultra", "nemotron-3.5-lightning"]
EFFORT_FLAG = {"nemotron-3-super": "low_effort", "nemotron-3-ultra": "medium_effort"}


GLM_CLOSED_LAST_TURN = (
    "{%- if not add_generation_prompt and messages[-1].role == 'assistant' %}<|user|>{% endif %}")
"""What our GLM template adds to the official text: <|user|> after a last assistant turn."""


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)


def official_source(family: str) -> str:
    text = official_text(FAMILIES[family])
    return text + GLM_CLOSED_LAST_TURN if family == "glm-4-moe" else text


# --------------------------------------------------------------------------- strategies

VALUES = st.one_of(st.integers(-5, 99), st.text(max_size=6), st.booleans(),
                   st.lists(st.integers(0, 9), max_size=2), st.just({"k": [1, "v"]}))
RICH_ARGS = st.dictionaries(st.sampled_from(["city", "q", "n"]), VALUES, max_size=2)
PARAMETERS = st.sampled_from([
    {"type": "object", "properties": {"q": {"type": "string", "description": " a query "}},
     "required": ["q"]},
    {"type": "object", "properties": {"unit": {"type": "string", "enum": ["c", "f"],
                                               "default": "c"}}},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                            "items": {"type": "integer"}}},
     "additionalProperties": False},
    {"type": "object"},
])
RICH_TOOLS = st.lists(st.builds(lambda n, p: {"type": "function", "function": {
    "name": n, "description": "does " + n, "parameters": p}}, NAMES, PARAMETERS),
    min_size=1, max_size=2)


@st.composite
def reasoning_assistant(draw: st.DrawFn) -> dict[str, Any]:
    """An answer; a third of them with reasoning as a field (a <think> block in the content
    comes from TEXT's samples)."""
    message = {"role": "assistant", "content": draw(TEXT)}
    if draw(st.integers(0, 2)) == 0:
        message["reasoning_content"] = draw(TEXT)
    return message


def tool_exchange(arguments: Any) -> Any:
    """An assistant message with one or two tool calls (content and reasoning beside them or
    not), then one or two tool results."""
    @st.composite
    def exchange(draw: st.DrawFn) -> list[dict[str, Any]]:
        calls = [call(draw(NAMES), draw(arguments), draw(st.sampled_from(["function", None])))
                 for _ in range(draw(st.integers(1, 2)))]
        for each in calls:  # None: a call without arguments, where the family takes one
            if each["function"]["arguments"] is None:
                del each["function"]["arguments"]
        message: dict[str, Any] = {"role": "assistant", "tool_calls": calls}
        if draw(st.booleans()):
            message["content"] = draw(TEXT)
        if draw(st.integers(0, 2)) == 0:
            message["reasoning_content"] = draw(TEXT)
        results = [{"role": "tool", "content": draw(TEXT)} for _ in range(draw(st.integers(1, 2)))]
        return [message, *results]
    return exchange()


@st.composite
def system_after_users(draw: st.DrawFn, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """GLM renders a system message anywhere; put some right after a user message."""
    out: list[dict[str, Any]] = []
    for message in messages:
        out.append(message)
        if message["role"] == "user" and draw(st.integers(0, 4)) == 0:
            out.append({"role": "system", "content": draw(TEXT)})
    return out


def thinking_option(draw: st.DrawFn, options: dict[str, Any]) -> None:
    thinking = draw(st.sampled_from([None, True, False]))
    if thinking is not None:
        options["enable_thinking"] = thinking


@st.composite
def case(draw: st.DrawFn, family: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A conversation and the keyword arguments to render it with."""
    options: dict[str, Any] = {}
    if family == "glm-4-moe":
        messages = draw(conversation(tool_exchange=tool_exchange(ARGS),
                                     assistant=reasoning_assistant()))
        messages = draw(system_after_users(messages))
        if draw(st.booleans()):
            options["tools"] = draw(TOOLS)
        thinking_option(draw, options)
    elif family in NEMOTRON:
        messages = draw(conversation(tool_exchange=tool_exchange(st.one_of(RICH_ARGS,
                                                                           st.none())),
                                     assistant=reasoning_assistant()))
        if draw(st.booleans()):
            options["tools"] = draw(st.one_of(TOOLS, RICH_TOOLS))
        thinking_option(draw, options)
        truncate = draw(st.sampled_from([None, True, False]))
        if truncate is not None:
            options["truncate_history_thinking"] = truncate
        if family in EFFORT_FLAG and draw(st.booleans()):
            options[EFFORT_FLAG[family]] = draw(st.booleans())
    else:
        messages = draw(conversation())
    # a generation prompt follows a user or tool message (GLM leaves an assistant turn that the
    # prompt follows without the token that ends it)
    prompt = draw(st.booleans()) and (family != "glm-4-moe"
                                      or messages[-1]["role"] != "assistant")
    return messages, {**options, "add_generation_prompt": prompt}


# ------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_with_official_template(family: str, tokenizer: Any) -> None:
    ours = template(family)

    @PARITY
    @given(case(family))
    def run(example: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
        check_parity(ours, tokenizer, official_source(family), *example)

    run()


def test_glm_renders_the_official_text_with_close_last_turn_off(tokenizer: Any) -> None:
    """The only difference from the official text is the closing <|user|>, and it can be
    turned off (for a tokenizer-free render that must match the official text)."""
    glm = template("glm-4-moe")
    official = official_text(FAMILIES["glm-4-moe"])

    @settings(PARITY, max_examples=50)
    @given(case("glm-4-moe"))
    def run(example: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
        messages, options = example
        expected = tokenizer.apply_chat_template(messages, chat_template=official,
                                                 tokenize=False, **options)
        assert glm.render_text(messages, close_last_turn=False, **options) == expected

    run()


def test_glm_4_6_renders_what_glm_4_5_renders(tokenizer: Any) -> None:
    """GLM-4.6's text differs from GLM-4.5's only in ``tc.arguments or {}``, which changes
    nothing for the calls glm-4-moe accepts (arguments are objects)."""
    glm = template("glm-4-moe")
    official = official_text(GLM_4_6) + GLM_CLOSED_LAST_TURN

    @settings(PARITY, max_examples=50)
    @given(case("glm-4-moe"))
    def run(example: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
        check_parity(glm, tokenizer, official, *example)

    run()


# ---------------------------------------------------------------------------- detection

@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_official_text_is_recognised_with_no_bugs(family: str, tokenizer: Any) -> None:
    text = (OFFICIAL_TEMPLATES / FAMILIES[family]).read_text()
    found = template(family).recognise(text)
    assert found is not None and not found.bugs
    others = [name for name in FAMILIES if name != family and template(name).recognise(text)]
    assert others == []
    tokenizer.chat_template = text
    assert MANAGER.select_chat_template(tokenizer).name == family


@pytest.mark.parametrize("filename", [*FAMILIES.values(), GLM_4_6])
def test_the_fixture_is_the_file_its_readme_row_describes(filename: str) -> None:
    """The sha256 in the fixtures' README is the file's: nobody changed it since."""
    row = next(line for line in (OFFICIAL_TEMPLATES / "README.md").read_text().splitlines()
               if line.startswith(f"| `{filename}` |"))
    digest = hashlib.sha256((OFFICIAL_TEMPLATES / filename).read_bytes()).hexdigest()
    assert row.endswith(f"| `{digest}` |")


def test_the_glm_4_6_text_is_recognised_as_glm_4_moe(tokenizer: Any) -> None:
    text = (OFFICIAL_TEMPLATES / GLM_4_6).read_text()
    found = template("glm-4-moe").recognise(text)
    assert found is not None and not found.bugs and "4.6" in found.label
    tokenizer.chat_template = text
    assert MANAGER.select_chat_template(tokenizer).name == "glm-4-moe"


def test_our_installed_source_is_recognised(tokenizer: Any) -> None:
    for family in FAMILIES:
        tokenizer.chat_template = template(family).tokenizer_source
        assert MANAGER.select_chat_template(tokenizer).name == family


# ----------------------------------------------------------------------------- refusals

GLM_CALL = [{"role": "user", "content": "q"},
            {"role": "assistant", "tool_calls": [call("search", '{"q": "x"}')]},
            {"role": "tool", "content": "r"}]
NEMOTRON_TOOL_FIRST = [{"role": "system", "content": "s"}, {"role": "tool", "content": "r"},
                       {"role": "user", "content": "q"}]


@pytest.mark.parametrize(("family", "messages", "options", "index", "rule"), [
    ("glm-4-moe", GLM_CALL, {}, 1, "tool-call-arguments"),
    ("glm-4-moe", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "assistant", "content": "b"}], {}, 1, "assistant-turn-end"),
    ("glm-4-moe", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "system", "content": "s"}, {"role": "user", "content": "q"}], {}, 1,
     "assistant-turn-end"),
    ("glm-4-moe", [{"role": "ipython", "content": "x"}], {}, 0, "unknown-role"),
    *[(name, GLM_CALL, {}, 1, "tool-call-arguments") for name in NEMOTRON],
    *[(name, NEMOTRON_TOOL_FIRST, {}, 1, "tool-result-without-call") for name in NEMOTRON],
    ("deepseek-r1-distill", GLM_CALL, {}, 1, "no-tool-calls"),
    ("deepseek-r1-distill", [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}],
     {}, 1, "unknown-role"),
    ("deepseek-r1-distill", [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": "a", "reasoning_content": "r"}],
     {}, 1, "no-reasoning"),
    ("deepseek-r1-distill", [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                             {"role": "system", "content": "t"}], {}, 2, "system-not-first"),
    ("deepseek-r1-distill", [{"role": "user", "content": "q"}],
     {"tools": [{"type": "function", "function": {"name": "f"}}]}, None, "no-tools"),
])
def test_what_a_family_cannot_render_is_refused(family: str, messages: list[dict[str, Any]],
                                                options: dict[str, Any], index: int | None,
                                                rule: str) -> None:
    with pytest.raises(ConversationError) as caught:
        template(family).render(messages, **options)
    assert caught.value.rule == rule
    assert caught.value.message_index == index
    assert str(caught.value).startswith(f"{family}: ")


# ------------------------------------------------------------------------ what is trained

def test_a_glm_turn_is_trained_through_the_role_token_that_ends_it() -> None:
    glm = template("glm-4-moe")
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Oslo"})],
                 "reasoning_content": "look it up"},
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "Sunny."}]
    rendered = glm.render(messages)
    trained = [rendered.text[a:b] for a, b in rendered.trained_spans]
    assert trained == [
        "\n<think></think>\n4<|user|>",
        "\n<think>look it up</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>Oslo</arg_value>\n</tool_call><|observation|>",
        "\n<think></think>\nSunny.<|user|>",
    ]
    assert rendered.text.endswith("Sunny.<|user|>")
    assert glm.render_text(messages, close_last_turn=False).endswith("Sunny.")


def test_nemotron_trains_the_think_block_with_the_answer() -> None:
    for name in NEMOTRON:
        rendered = template(name).render([
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "two and two"}])
        (start, end), = rendered.trained_spans
        assert rendered.text[start:end].startswith("<think>\ntwo and two")
        assert rendered.text[start:end].endswith("4<|im_end|>")
        assert rendered.text[:start].endswith("<|im_start|>assistant\n")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))


def family_tokenizer(chat: ChatTemplate) -> Any:
    """The shipped tokenizer with the family's special tokens, configured by the template."""
    tokens = {*chat.special_tokens, *chat.pad_fallbacks[:1]}
    tokenizer = shipped_tokenizer(sorted(tokens))
    chat.configure_tokenizer(tokenizer)
    return tokenizer




def two_turns(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", **first},
                         {"role": "user", "content": "3+3?"}, {"role": "assistant", **second}]}


REASONING_BOTH = two_turns({"content": "4", "reasoning_content": "Two and two make four."},
                           {"content": "6", "reasoning_content": "Three and three make six."})
INLINE_BOTH = two_turns({"content": "<think>\nTwo and two.\n</think>\n\n4"},
                        {"content": "<think>\nThree and three.\n</think>\n\n6"})


@pytest.mark.parametrize("family", ["glm-4-moe", *NEMOTRON])
def test_reasoning_of_an_earlier_turn_is_not_trained_in_silence(family: str,
                                                                 tmp_path: Path) -> None:
    """These templates keep the reasoning of the turns after the last user message only."""
    chat = template(family)
    tokenizer = family_tokenizer(chat)
    for row in (REASONING_BOTH, INLINE_BOTH):
        with pytest.raises(MaskingError, match="reasoning"):
            prepare_rows(tmp_path, tokenizer, chat, [row], "assistant-only")
        skipped = prepare_rows(tmp_path, tokenizer, chat, [row], "assistant-only",
                               on_bad_example="skip")
        assert skipped.report.skipped == {"reasoning_dropped": 1}
    last = prepare_rows(tmp_path, tokenizer, chat, [REASONING_BOTH], "last-turn")
    assert "Three and three make six." in trained_text(tokenizer, last.dataset[0])


@pytest.mark.parametrize("family", NEMOTRON)
def test_nemotron_keeps_every_turns_reasoning_when_asked(family: str, tmp_path: Path) -> None:
    chat = template(family).with_variables({"truncate_history_thinking": False})
    tokenizer = family_tokenizer(chat)
    prepared = prepare_rows(tmp_path, tokenizer, chat, [REASONING_BOTH], "assistant-only")
    text = trained_text(tokenizer, prepared.dataset[0])
    assert "Two and two make four." in text and "Three and three make six." in text


def test_r1_distill_drops_inline_reasoning_from_every_turn(tmp_path: Path) -> None:
    chat = template("deepseek-r1-distill")
    tokenizer = family_tokenizer(chat)
    one = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"}]}
    assert "Two and two." not in chat.render_text(one["messages"])
    with pytest.raises(MaskingError, match="reasoning"):
        prepare_rows(tmp_path, tokenizer, chat, [one], "last-turn")
    plain = {"messages": [{"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}]}
    prepared = prepare_rows(tmp_path, tokenizer, chat, [plain], "assistant-only")
    assert trained_text(tokenizer, prepared.dataset[0]) == "4<｜end▁of▁sentence｜>"
