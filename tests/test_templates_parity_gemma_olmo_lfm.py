"""Gemma 4, OLMo 3, LFM2 and LFM2.5: byte parity with the official templates (see
``test_templates_parity.py`` for the three checks), detection of every published version (older
ones with their bugs), refusals, and what is trained.

The Gemma 4 conversations have a system message first or after a user message, tool lists with
parameters named like schema keys, tool calls (objects of arguments, reasoning beside them or
not) answered by tool messages named by ``name`` or by ``tool_call_id``, several tool rounds in
one model turn, answers after the results, and ``enable_thinking``. The OLMo 3 ones have OLMo's
``functions``/``function_calls`` strings and ``environment`` results, system messages anywhere
and inline ``<think>`` blocks. The LFM ones have tool lists, tool calls with arguments of every
JSON type (and, for LFM2, quotes, backslashes and newlines in strings) with or without content
beside them, tool results, and for LFM2.5 reasoning under any of its three keys and
``preserve_thinking``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import datasets.config
import pytest
from hypothesis import given
from hypothesis import strategies as st
from template_parity import (
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
from transformers.utils.chat_template_utils import render_jinja_template

from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.data import load_sft_dataset, messages_from_row
from sft_plugins.errors import ConversationError, DataError, MaskingError
from sft_plugins.templates import ChatTemplate

FAMILIES = {
    "gemma-4": "gemma4_v4.jinja",
    "olmo-3": "olmo3.jinja",
    "lfm2": "lfm2_v2.jinja",
    "lfm2.5": "lfm2_2_5_v2.jinja",
}
OLDER_VERSIONS = {
    "gemma4_v3.jinja": ("gemma-4", True),
    "gemma4_v2.jinja": ("gemma-4", True),
    "lfm2.jinja": ("lfm2", True),
    "lfm2_2_5.jinja": ("lfm2.5", False),
}
"""Earlier published texts: the family each is recognised as, and whether it has known bugs
(LFM2.5's first text reads reasoning from ``thinking`` only, which ``transformers`` fills from
``reasoning_content``: no bug where it renders)."""



@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)


def official_render(filename: str, messages: list[dict[str, Any]], **options: Any) -> str:
    """What ``transformers`` renders with an official fixture (for the older versions)."""
    rendered, _ = render_jinja_template(conversations=[messages],
                                        chat_template=official_text(filename), **options)
    return rendered[0]


# --------------------------------------------------------------------------- strategies

VALUES = st.one_of(st.integers(-5, 99), st.text(max_size=6), st.booleans(), st.none(),
                   st.lists(st.integers(0, 9), max_size=2), st.just({"k": [1, "v"]}))
RICH_ARGS = st.dictionaries(st.sampled_from(["city", "q", "n"]), VALUES, max_size=2)
QUOTED = st.sampled_from(["it's", "a\\b", "two\nlines", 'say "hi"', "tab\there"])
"""Strings LFM2 escapes in its Python-style calls."""
PARAMETERS = st.sampled_from([
    {"type": "object", "properties": {"q": {"type": "string", "description": " a query "}},
     "required": ["q"]},
    {"type": "object", "properties": {"type": {"type": "string", "enum": ["a", "b"]},
                                      "description": {"type": "string", "nullable": True}}},
    {"type": "object", "properties": {"n": {"type": "array", "items": {"type": "integer"}},
                                      "where": {"type": "object", "properties": {
                                          "city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "object"},
])
"""Tool parameters, some named like schema keys (Gemma 4's earlier texts drop those)."""
RICH_TOOLS = st.lists(st.builds(lambda n, p: {"type": "function", "function": {
    "name": n, "description": "does " + n, "parameters": p}}, NAMES, PARAMETERS),
    min_size=1, max_size=2)
BLANK = st.sampled_from([None, "", " ", "\n"])
"""Content beside tool calls that Gemma 4 accepts: none at all."""


@st.composite
def gemma_exchange(draw: st.DrawFn) -> list[dict[str, Any]]:
    """One or two rounds of tool calls (reasoning beside them or not) and their results, named
    by ``tool_call_id`` or ``name``, or, for a single call without an id, not at all."""
    messages: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 2))):
        with_ids = draw(st.booleans())
        calls = []
        for number in range(draw(st.integers(1, 2)) if with_ids else 1):
            entry = call(draw(NAMES), draw(RICH_ARGS), draw(st.sampled_from(["function", None])))
            if with_ids:
                entry["id"] = f"call_{number}"
            calls.append(entry)
        message: dict[str, Any] = {"role": "assistant", "tool_calls": calls}
        content = draw(BLANK)
        if content is not None:
            message["content"] = content
        if draw(st.integers(0, 2)) == 0:
            message[draw(st.sampled_from(["reasoning_content", "thinking", "reasoning"]))] = \
                draw(TEXT)
        messages.append(message)
        for number in range(draw(st.integers(1, 2))):
            result: dict[str, Any] = {"role": "tool", "content": draw(TEXT)}
            naming = draw(st.sampled_from(["name", "id" if with_ids else None]))
            if naming == "name":
                result["name"] = draw(NAMES)
            elif naming == "id":
                result["tool_call_id"] = f"call_{min(number, len(calls) - 1)}"
            messages.append(result)
    return messages


@st.composite
def olmo_assistant(draw: st.DrawFn) -> dict[str, Any]:
    message = {"role": "assistant", "content": draw(TEXT)}
    if draw(st.integers(0, 3)) == 0:
        message["function_calls"] = draw(st.sampled_from(['get_weather(city="Oslo")',
                                                          "search(q='x')\nadd(n=1)"]))
    return message


@st.composite
def olmo_exchange(draw: st.DrawFn) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": draw(TEXT),
             "function_calls": draw(st.sampled_from(['search(q="x")', "add(n=2)"]))},
            {"role": "environment", "content": draw(TEXT)}]


def lfm_exchange(arguments: Any) -> Any:
    @st.composite
    def exchange(draw: st.DrawFn) -> list[dict[str, Any]]:
        calls = [call(draw(NAMES), draw(arguments), draw(st.sampled_from(["function", None])))
                 for _ in range(draw(st.integers(1, 2)))]
        message: dict[str, Any] = {"role": "assistant", "tool_calls": calls}
        if draw(st.booleans()):
            message["content"] = draw(TEXT)
        results = [{"role": "tool", "content": draw(TEXT)} for _ in range(draw(st.integers(1, 2)))]
        return [message, *results]
    return exchange()


@st.composite
def lfm2_5_assistant(draw: st.DrawFn) -> dict[str, Any]:
    message = {"role": "assistant", "content": draw(TEXT)}
    if draw(st.integers(0, 2)) == 0:
        key = draw(st.sampled_from(["reasoning_content", "thinking", "reasoning"]))
        message[key] = draw(TEXT)
    return message


@st.composite
def systems_after_users(draw: st.DrawFn, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A system message right after some user messages (these templates render one anywhere)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        out.append(message)
        if message["role"] == "user" and draw(st.integers(0, 5)) == 0:
            out.append({"role": "system", "content": draw(TEXT)})
    return out


def with_functions(draw: st.DrawFn, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OLMo's function list, a string, on some system and user messages."""
    return [{**m, "functions": '[{"name": "search"}]'}
            if m["role"] in ("system", "user") and draw(st.integers(0, 3)) == 0 else m
            for m in messages]


@st.composite
def case(draw: st.DrawFn, family: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A conversation and the keyword arguments to render it with."""
    options: dict[str, Any] = {"add_generation_prompt": draw(st.booleans())}
    if family == "gemma-4":
        messages = draw(systems_after_users(draw(conversation(tool_exchange=gemma_exchange()))))
        if draw(st.booleans()):
            options["tools"] = draw(st.one_of(TOOLS, RICH_TOOLS))
        thinking = draw(st.sampled_from([None, True, False]))
        if thinking is not None:
            options["enable_thinking"] = thinking
    elif family == "olmo-3":
        messages = draw(conversation(tool_exchange=olmo_exchange(), assistant=olmo_assistant()))
        messages = with_functions(draw, draw(systems_after_users(messages)))
    elif family == "lfm2":
        arguments = st.one_of(RICH_ARGS, st.dictionaries(st.just("q"), QUOTED, max_size=1))
        messages = draw(conversation(tool_exchange=lfm_exchange(arguments)))
        messages = draw(systems_after_users(messages))
        if draw(st.booleans()):
            options["tools"] = draw(st.one_of(TOOLS, RICH_TOOLS))
    else:
        safe = RICH_ARGS.filter(lambda a: not any("'" in v for v in a.values()
                                                  if isinstance(v, str)))
        messages = draw(systems_after_users(draw(conversation(
            tool_exchange=lfm_exchange(safe), assistant=lfm2_5_assistant()))))
        if draw(st.booleans()):
            options["tools"] = draw(st.one_of(TOOLS, RICH_TOOLS))
        preserve = draw(st.sampled_from([None, True, False]))
        if preserve is not None:
            options["preserve_thinking"] = preserve
    return messages, options


# ------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_with_official_template(family: str, tokenizer: Any) -> None:
    ours = template(family)

    @PARITY
    @given(case(family))
    def run(example: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
        check_parity(ours, tokenizer, official_text(FAMILIES[family]), *example)

    run()


# ---------------------------------------------------------------------------- detection

@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_official_text_is_recognised_with_no_bugs(family: str, tokenizer: Any) -> None:
    text = (OFFICIAL_TEMPLATES / FAMILIES[family]).read_text()
    found = template(family).recognise(text)
    assert found is not None and not found.bugs
    others = [name for name in MANAGER.templates.names()
              if name != family and template(name).recognise(text)]
    assert others == []
    tokenizer.chat_template = text
    assert MANAGER.select_chat_template(tokenizer).name == family
    tokenizer.chat_template = template(family).tokenizer_source
    assert MANAGER.select_chat_template(tokenizer).name == family


@pytest.mark.parametrize(("filename", "family", "buggy"),
                         [(f, *known) for f, known in OLDER_VERSIONS.items()])
def test_an_older_version_is_recognised_with_its_bugs(filename: str, family: str, buggy: bool,
                                                      tokenizer: Any) -> None:
    found = template(family).recognise((OFFICIAL_TEMPLATES / filename).read_text())
    assert found is not None and bool(found.bugs) == buggy
    tokenizer.chat_template = official_text(filename)
    assert MANAGER.select_chat_template(tokenizer).name == family


@pytest.mark.parametrize("filename", [*FAMILIES.values(), *OLDER_VERSIONS])
def test_the_fixture_is_the_text_its_provenance_row_names(filename: str) -> None:
    """The sha256 in the fixtures' README is the file's: nobody changed it since."""
    rows = (OFFICIAL_TEMPLATES / "README.md").read_text().splitlines()
    row = next(line for line in rows if line.startswith(f"| `{filename}` |"))
    digest = hashlib.sha256((OFFICIAL_TEMPLATES / filename).read_bytes()).hexdigest()
    assert row.rstrip().endswith(f"| `{digest}` |")


TOOL_WITH_A_TYPE_PARAMETER = [{"type": "function", "function": {
    "name": "pick", "description": "d", "parameters": {
        "type": "object", "properties": {"type": {"type": "string"}, "q": {"type": "string"}}}}}]
GEMMA_TOOL_TURN = [{"role": "user", "content": "weather?"},
                   {"role": "assistant", "content": "", "reasoning_content": "look it up",
                    "tool_calls": [{"id": "c1", "type": "function", "function": {
                        "name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                   {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                   {"role": "assistant", "content": "Sunny."}]


def test_the_gemma_4_bugs_are_what_the_older_texts_render() -> None:
    """The earlier texts drop a parameter named 'type'; the first one also renders a tool
    message as a turn of its own, closes the model turn after the calls and drops the
    reasoning. The current one does none of this."""
    tools = {"tools": TOOL_WITH_A_TYPE_PARAMETER, "bos_token": "<bos>"}
    current = official_render("gemma4_v4.jinja", GEMMA_TOOL_TURN, **tools)
    assert "type:{type:" in current and "<|turn>tool" not in current
    assert "<|channel>thought\nlook it up\n<channel|>" in current
    assert "<tool_call|><|tool_response>response:get_weather{value:" in current
    for older in ("gemma4_v3.jinja", "gemma4_v2.jinja"):
        assert "type:{type:" not in official_render(older, GEMMA_TOOL_TURN, **tools)
    first = official_render("gemma4_v2.jinja", GEMMA_TOOL_TURN, **tools)
    assert "<tool_call|><turn|>\n<|turn>tool\nsunny<turn|>" in first
    assert "look it up" not in first
    assert template("gemma-4").render_text(GEMMA_TOOL_TURN, tools=TOOL_WITH_A_TYPE_PARAMETER) \
        == current


def test_the_lfm_bugs_are_what_the_older_texts_render() -> None:
    calling = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": "",
                "tool_calls": [call("get_weather", {"city": "Oslo"})]},
               {"role": "tool", "content": "sunny"}]
    first = official_render("lfm2.jinja", calling, bos_token="<|startoftext|>")
    assert "get_weather" not in first
    assert "<|tool_call_start|>[get_weather(city='Oslo')]<|tool_call_end|>" in \
        template("lfm2").render_text(calling)
    thinking = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "two and two"}]
    bos = {"bos_token": "<|startoftext|>"}
    assert official_render("lfm2_2_5.jinja", thinking, **bos) == \
        official_render("lfm2_2_5_v2.jinja", thinking, **bos) == \
        template("lfm2.5").render_text(thinking)


def tokenizer_dir(root: Path, text: str) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    tokenizer.chat_template = text
    tokenizer.save_pretrained(root)
    return root


def test_doctor_reports_the_first_lfm2_template(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sft_plugins.cli import main

    directory = tokenizer_dir(tmp_path / "lfm2", official_text("lfm2.jinja"))
    result = CliRunner().invoke(main, ["doctor", str(directory), "--json"])
    report = json.loads(result.output)
    assert result.exit_code == 1 and report["family"] == "lfm2"
    bug = next(f for f in report["findings"] if f["code"] == "known-bug")
    assert "tool_calls" in bug["message"] and "renders tool calls" in bug["advice"]


# ----------------------------------------------------------------------------- refusals

def ask(content: str = "q") -> dict[str, Any]:
    return {"role": "user", "content": content}


def calls(arguments: Any, content: str | None = None, **extra: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "tool_calls": [call("search", arguments)],
                               **extra}
    if content is not None:
        message["content"] = content
    return message


RESULT = {"role": "tool", "content": "r"}
ANSWER = {"role": "assistant", "content": "a"}


@pytest.mark.parametrize(("family", "messages", "options", "index", "rule"), [
    ("gemma-4", [ask(), calls('{"q": "x"}'), RESULT], {}, 1, "tool-call-arguments"),
    ("gemma-4", [ask(), calls({"q": "x"}, "Let me look."), RESULT], {}, 1, "tool-call-content"),
    ("gemma-4", [ask(), {**ANSWER, "reasoning_content": "hm"}], {}, 1,
     "reasoning-needs-tool-call"),
    ("gemma-4", [ask(), {**ANSWER, "content": "<|channel>thought\nhm<channel|>a"}], {}, 1,
     "thinking-in-content"),
    ("gemma-4", [ask(), RESULT], {}, 1, "tool-result-without-call"),
    ("gemma-4", [ask(), ANSWER, RESULT], {}, 2, "tool-result-without-call"),
    ("gemma-4", [ask(), ANSWER, ANSWER], {}, 2, "consecutive-assistant"),
    ("gemma-4", [ask(), calls({"q": "x"}), ANSWER], {}, 2, "consecutive-assistant"),
    ("gemma-4", [ask(), calls({"q": "x"}, tool_responses=[{"name": "search", "response": "r"}])],
     {}, 1, "tool-responses"),
    ("gemma-4", [{"role": "ipython", "content": "x"}], {}, 0, "unknown-role"),
    ("gemma-4", [ask(), {"role": "assistant", "tool_calls": [{**call("a", {}), "id": "c1"}]},
                 RESULT], {}, 2, "tool-result-name"),
    ("gemma-4", [ask(), {"role": "assistant", "tool_calls": [call("a", {}), call("b", {})]},
                 {**RESULT, "name": "a"}], {}, 2, "tool-result-name"),
    ("olmo-3", [ask(), calls({"q": "x"})], {}, 1, "no-tool-calls"),
    ("olmo-3", [ask()], {"tools": [{"type": "function", "function": {"name": "f"}}]}, None,
     "no-tools"),
    ("olmo-3", [ask(), RESULT], {}, 1, "unknown-role"),
    ("olmo-3", [ask(), {**ANSWER, "reasoning_content": "hm"}], {}, 1, "no-reasoning"),
    ("olmo-3", [ask(), {**ANSWER, "function_calls": [{"name": "f"}]}], {}, 1,
     "function-fields"),
    ("olmo-3", [{**ask(), "function_calls": "f()"}], {}, 0, "function-fields"),
    ("lfm2", [ask(), calls('{"q": "x"}'), RESULT], {}, 1, "tool-call-arguments"),
    ("lfm2", [ask(), calls({"q": "x"}, "null"), RESULT], {}, 1, "tool-call-content"),
    ("lfm2", [ask(), {**ANSWER, "thinking": "hm"}], {}, 1, "no-reasoning"),
    ("lfm2.5", [ask(), calls('{"q": "x"}'), RESULT], {}, 1, "tool-call-arguments"),
    ("lfm2.5", [ask(), calls({"q": "it's"}), RESULT], {}, 1, "tool-call-argument-quote"),
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

def trained(chat: ChatTemplate, messages: list[dict[str, Any]], **options: Any) -> list[str]:
    rendered = chat.render(messages, **options)
    return [rendered.text[a:b] for a, b in rendered.trained_spans]


def test_a_gemma_4_tool_turn_trains_the_calls_up_to_where_the_model_stops() -> None:
    """The model writes its thinking and calls and stops at <|tool_response>; the result is the
    environment's, and the answer that follows it, in the same model turn, is trained again."""
    assert trained(template("gemma-4"), GEMMA_TOOL_TURN) == [
        "<|channel>thought\nlook it up\n<channel|><|tool_call>call:get_weather"
        "{city:<|\"|>Oslo<|\"|>}<tool_call|><|tool_response>",
        "Sunny.<turn|>",
    ]


def test_olmo_3_ends_the_last_turn_with_its_end_of_text() -> None:
    messages = [ask("2+2?"), {"role": "assistant", "content": "<think>two and two</think>4"},
                ask("3+3?"), {"role": "assistant", "content": "6",
                              "function_calls": 'add(a=3, b=3)'}]
    rendered = template("olmo-3").render(messages)
    assert rendered.text.startswith("<|im_start|>system\nYou are OLMo")
    assert [rendered.text[a:b] for a, b in rendered.trained_spans] == [
        "<think>two and two</think>4<|im_end|>",
        "6<function_calls>add(a=3, b=3)</function_calls><|endoftext|>",
    ]


def test_lfm_trains_the_calls_after_the_content() -> None:
    messages = [ask("weather?"), calls({"city": "Oslo", "days": 2}, "Checking."), RESULT,
                {"role": "assistant", "content": "Sunny.", "reasoning_content": "easy"}]
    expected_call = "Checking.<|tool_call_start|>[search(city='Oslo', days=2)]<|tool_call_end|>"
    assert trained(template("lfm2"), [*messages[:3], ANSWER]) == \
        [expected_call + "<|im_end|>", "a<|im_end|>"]
    assert trained(template("lfm2.5"), messages) == \
        [expected_call + "<|im_end|>", "<think>easy</think>Sunny.<|im_end|>"]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))


def family_tokenizer(chat: ChatTemplate) -> Any:
    """The shipped tokenizer with the family's special tokens, configured by the template."""
    tokens = {*chat.special_tokens, "<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>",
              "<|turn>", "<|im_start|>"}
    tokenizer = shipped_tokenizer(sorted(tokens))
    chat.configure_tokenizer(tokenizer)
    return tokenizer




def gemma_round(question: str, reasoning: str, answer: str) -> list[dict[str, Any]]:
    return [ask(question),
            {"role": "assistant", "content": "", "reasoning_content": reasoning,
             "tool_calls": [call("calc", {"expr": question})]},
            {"role": "tool", "content": answer},
            {"role": "assistant", "content": answer}]


GEMMA_TWO_ROUNDS = {"messages": [*gemma_round("2+2", "Add two and two.", "4"),
                                 *gemma_round("3+3", "Add three and three.", "6")]}
LFM_TWO_TURNS = {"messages": [ask("2+2?"), {"role": "assistant", "content": "4",
                                            "reasoning_content": "Two and two make four."},
                              ask("3+3?"), {"role": "assistant", "content": "6",
                                            "reasoning_content": "Three and three make six."}]}


@pytest.mark.parametrize(("family", "row", "first", "last"), [
    ("gemma-4", GEMMA_TWO_ROUNDS, "Add two and two.", "Add three and three."),
    ("lfm2.5", LFM_TWO_TURNS, "Two and two make four.", "Three and three make six."),
])
def test_reasoning_of_an_earlier_turn_is_not_trained_in_silence(
        family: str, row: dict[str, Any], first: str, last: str, tmp_path: Path) -> None:
    """Both templates keep the reasoning of the turns after the last user message only: such a
    row stops preparation, or is skipped, and expanded, every turn trains with its reasoning."""
    chat = template(family)
    tokenizer = family_tokenizer(chat)
    with pytest.raises(MaskingError, match="reasoning"):
        prepare_rows(tmp_path, tokenizer, chat, [row], "assistant-only")
    skipped = prepare_rows(tmp_path, tokenizer, chat, [row], "assistant-only",
                           on_bad_example="skip")
    assert skipped.report.skipped == {"reasoning_dropped": 1}
    expanded = prepare_rows(tmp_path, tokenizer, chat, [row], "assistant-only", expand="reasoning")
    assert all(reasoning in "".join(trained_text(tokenizer, r) for r in expanded.dataset)
               for reasoning in (first, last))


def test_lfm2_5_keeps_every_turns_reasoning_when_asked(tmp_path: Path) -> None:
    chat = template("lfm2.5").with_variables({"preserve_thinking": True})
    tokenizer = family_tokenizer(chat)
    prepared = prepare_rows(tmp_path, tokenizer, chat, [LFM_TWO_TURNS], "assistant-only")
    text = trained_text(tokenizer, prepared.dataset[0])
    assert "Two and two make four." in text and "Three and three make six." in text


def test_olmo_3_trains_inline_reasoning_in_every_turn(tmp_path: Path) -> None:
    row = {"messages": [ask("2+2?"), {"role": "assistant", "content": "<think>Two.</think>4"},
                        ask("3+3?"), {"role": "assistant", "content": "<think>Three.</think>6"}]}
    chat = template("olmo-3")
    tokenizer = family_tokenizer(chat)
    prepared = prepare_rows(tmp_path, tokenizer, chat, [row], "assistant-only")
    assert trained_text(tokenizer, prepared.dataset[0]) == \
        "<think>Two.</think>4<|im_end|><think>Three.</think>6<|endoftext|>"


OLMO_FUNCTION_CALLING = {"messages": [
    {"role": "system", "content": "Use the tools.", "functions": '[{"name": "add"}]'},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "", "function_calls": "add(a=3, b=3)"},
    {"role": "environment", "content": "6"},
    {"role": "assistant", "content": "<think>The tool said 6.</think>6"},
]}


def test_olmo_3_function_calling_data_trains_from_a_file(tmp_path: Path) -> None:
    """OLMo's ``functions``, ``function_calls`` and ``environment`` messages come through the
    loader, render as the official template renders them, and the call is trained (a turn
    with only calls is something to train)."""
    chat = template("olmo-3")
    tokenizer = family_tokenizer(chat)
    path = tmp_path / "olmo.jsonl"
    path.write_text(json.dumps(OLMO_FUNCTION_CALLING) + "\n")
    loaded = load_sft_dataset(str(path), template=chat).train
    assert messages_from_row(loaded[0]) == OLMO_FUNCTION_CALLING["messages"]
    official = tokenizer.apply_chat_template(
        OLMO_FUNCTION_CALLING["messages"], chat_template=official_text(FAMILIES["olmo-3"]),
        tokenize=False, bos_token=chat.bos_token, eos_token=chat.eos_token)
    assert chat.render(messages_from_row(loaded[0])).text == official
    assert '<functions>[{"name": "add"}]</functions>' in official
    only_calls = {"messages": OLMO_FUNCTION_CALLING["messages"][:3]}
    prepared = prepare_rows(tmp_path, tokenizer, chat, [OLMO_FUNCTION_CALLING, only_calls],
                            "assistant-only")
    assert [trained_text(tokenizer, row) for row in prepared.dataset] == [
        "<function_calls>add(a=3, b=3)</function_calls><|im_end|>"
        "<think>The tool said 6.</think>6<|endoftext|>",
        "<function_calls>add(a=3, b=3)</function_calls><|endoftext|>",
    ]


@pytest.mark.parametrize("field", ["functions", "function_calls"])
def test_olmo_function_fields_are_refused_by_other_families(field: str, tmp_path: Path) -> None:
    """A family whose template has no place for them would drop them in silence: the loader
    names the file, line and rule, or skips the row."""
    chat = template("llama-3.1")
    if field == "functions":
        messages, index = [{**ask(), "functions": "[]"}, ANSWER], 0
    else:
        messages, index = [ask(), {**ANSWER, "function_calls": "f()"}], 1
    with pytest.raises(ConversationError) as caught:
        chat.render(messages)
    assert (caught.value.rule, caught.value.message_index) == ("no-function-fields", index)
    path = tmp_path / "llama.jsonl"
    path.write_text(json.dumps({"messages": [ask(), ANSWER]}) + "\n"
                    + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match=rf"llama\.jsonl:2: field 'messages\[{index}\]': "
                                        rf"llama-3\.1: .* cannot express OLMo's '{field}'"):
        load_sft_dataset(str(path), template=chat)
    skipped = load_sft_dataset(str(path), template=chat, on_bad_example="skip")
    assert len(skipped.train) == 1
