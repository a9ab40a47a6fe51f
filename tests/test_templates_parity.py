"""Byte parity of every first-party template with the official one, through ``transformers``.

For each family hypothesis generates conversations the family can express (system or not,
multi-turn, unicode with surrounding whitespace, tools and tool calls where the family has
them, ``add_generation_prompt`` both ways, ``date_string``/``enable_thinking`` where they
exist) and checks three things on each:

1. our render equals ``apply_chat_template(..., tokenize=False)`` with the official template;
2. the source we install on tokenizers, run by ``transformers`` itself, renders the same text,
   and its ``{% generation %}`` spans (``return_assistant_tokens_mask``'s input) equal ours;
3. the spans are well formed: in order, inside the text, each trained span inside its message
   and ending with the family's end-of-turn token.

``PARITY_EXAMPLES`` conversations per family (the issue asks for at least 200). The checks and
strategies live in ``template_parity.py``; families added later have their own
``test_templates_parity_<group>.py``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from template_parity import (
    ARGS,
    NAMES,
    OFFICIAL_TEMPLATES,
    PARITY,
    TEXT,
    TOOLS,
    call,
    check_parity,
    conversation,
    official_text,
)
from transformers import AutoTokenizer

from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.errors import TemplateError
from sft_plugins.templates import ChatTemplate
from sft_plugins.testing import plugin_manager

CHATML_REFERENCE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The canonical ChatML template (as in the ``transformers`` chat-templating docs)."""

OFFICIAL = {
    "llama-3": "llama3.jinja", "llama-3.1": "llama3_1.jinja", "llama-3.2": "llama3_2.jinja",
    "qwen2.5": "qwen2_5.jinja", "qwen3": "qwen3.jinja", "gemma-3": "gemma3.jinja",
    "phi-3.5": "phi3_5.jinja", "deepseek-v3": "deepseekv3.jinja",
}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def templates() -> dict[str, ChatTemplate]:
    manager = plugin_manager("sft_plugins_templates")
    return {name: manager.templates.get(name) for name in manager.templates.names()}


def official_source(name: str) -> str:
    if name == "chatml":
        return CHATML_REFERENCE
    return official_text(OFFICIAL[name])


# --------------------------------------------------------------------------- strategies

def llama_exchange(builtin: bool) -> Any:
    @st.composite
    def exchange(draw: st.DrawFn) -> list[dict[str, Any]]:
        if builtin and draw(st.booleans()):
            arguments: Any = {"query": draw(st.text(max_size=8))}
            name = "brave_search"
        else:
            arguments, name = draw(ARGS), draw(NAMES)
        role = draw(st.sampled_from(["tool", "ipython"]))
        return [{"role": "assistant", "tool_calls": [call(name, arguments)]},
                {"role": role, "content": draw(TEXT)}]
    return exchange()


def qwen_exchange(string_arguments: bool) -> Any:
    @st.composite
    def exchange(draw: st.DrawFn) -> list[dict[str, Any]]:
        calls = []
        for _ in range(draw(st.integers(1, 2))):
            arguments = draw(ARGS)
            if string_arguments and draw(st.booleans()):
                arguments = '{"q": "' + draw(st.text("abc ", max_size=5)) + '"}'
            calls.append(call(draw(NAMES), arguments, draw(st.sampled_from(["function", None]))))
        message: dict[str, Any] = {"role": "assistant", "tool_calls": calls}
        if draw(st.booleans()):
            message["content"] = draw(TEXT)
        responses = [{"role": "tool", "content": draw(TEXT)}
                     for _ in range(draw(st.integers(1, 2)))]
        return [message, *responses]
    return exchange()


@st.composite
def deepseek_exchange(draw: st.DrawFn) -> list[dict[str, Any]]:
    calls = [call(draw(NAMES), '{"q": "' + draw(st.text("xyz ", max_size=4)) + '"}')
             for _ in range(draw(st.integers(1, 2)))]
    responses = [{"role": "tool", "content": draw(TEXT)} for _ in range(draw(st.integers(1, 2)))]
    return [{"role": "assistant", "content": draw(st.sampled_from(["", "Let me check."])),
             "tool_calls": calls}, *responses]


@st.composite
def qwen3_assistant(draw: st.DrawFn) -> dict[str, Any]:
    message = {"role": "assistant", "content": draw(TEXT)}
    if draw(st.integers(0, 2)) == 0:
        message["reasoning_content"] = draw(TEXT)
    return message


@st.composite
def case(draw: st.DrawFn, family: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A conversation and the keyword arguments to render it with."""
    options: dict[str, Any] = {"add_generation_prompt": draw(st.booleans())}
    if family in ("llama-3.1", "llama-3.2"):
        builtin = family == "llama-3.1" and draw(st.booleans())
        messages = draw(conversation(tool_exchange=llama_exchange(builtin)))
        if builtin:
            options["builtin_tools"] = ["brave_search", "wolfram_alpha"]
        has_calls = any("tool_calls" in m for m in messages)
        if has_calls or draw(st.booleans()):
            options["tools"] = draw(TOOLS)
            options["tools_in_user_message"] = draw(st.booleans())
        if family == "llama-3.1" or draw(st.booleans()):
            options["date_string"] = draw(st.sampled_from(["26 Jul 2024", "01 Jan 2025"]))
    elif family in ("qwen2.5", "qwen3"):
        messages = draw(conversation(tool_exchange=qwen_exchange(family == "qwen3"),
                                     assistant=qwen3_assistant() if family == "qwen3" else None))
        if draw(st.booleans()):
            options["tools"] = draw(TOOLS)
        if family == "qwen3":
            thinking = draw(st.sampled_from([None, True, False]))
            if thinking is not None:
                options["enable_thinking"] = thinking
    elif family == "deepseek-v3":
        messages = draw(conversation(tool_exchange=deepseek_exchange()))
    else:
        messages = draw(conversation())
    return messages, options


FAMILIES = ["llama-3", "llama-3.1", "llama-3.2", "qwen2.5", "qwen3", "gemma-3", "phi-3.5",
            "deepseek-v3", "chatml"]


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_official_template(family: str, tokenizer: Any,
                                       templates: dict[str, ChatTemplate]) -> None:
    template = templates[family]

    @PARITY
    @given(case(family))
    def run(example: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
        check_parity(template, tokenizer, official_source(family), *example)

    run()


def official_sources() -> dict[str, str]:
    """The official text of every parity-tested family: ``FAMILIES`` here and in each
    ``test_templates_parity_<group>.py`` beside this file (there a dict: family -> fixture)."""
    sources = {family: official_source(family) for family in FAMILIES}
    for path in sorted(Path(__file__).parent.glob("test_templates_parity_*.py")):
        group = importlib.import_module(path.stem).FAMILIES
        assert not set(group) & set(sources), f"{path.name} tests a family twice"
        sources.update({family: official_text(file) for family, file in group.items()})
    return sources


def test_every_registered_family_has_a_parity_test(templates: dict[str, ChatTemplate]) -> None:
    assert sorted(templates) == sorted(official_sources())


def test_fingerprints_match_the_official_texts(templates: dict[str, ChatTemplate]) -> None:
    for family, filename in OFFICIAL.items():
        found = templates[family].recognise((OFFICIAL_TEMPLATES / filename).read_text())
        assert found is not None and not found.bugs, family
    day_one = templates["llama-3.1"].recognise(
        (OFFICIAL_TEMPLATES / "llama3_1_day_one.jinja").read_text())
    assert day_one is not None and day_one.bugs


DIFFABLE = ["llama-3", "llama-3.1", "llama-3.2", "qwen2.5", "gemma-3", "deepseek-v3", "chatml"]
"""Families whose official template renders every prefix of a tool-free conversation as a
prefix of the whole (phi-3.5 closes with <|endoftext|>, qwen3 drops earlier reasoning)."""


@pytest.mark.parametrize("family", DIFFABLE)
def test_prefix_diffing_finds_the_same_trained_spans_as_markers(
        family: str, tokenizer: Any, templates: dict[str, ChatTemplate]) -> None:
    """The official text taken as an unknown template (no markers) gets the trained spans our
    marked source records: prefix diffing is right wherever it applies."""
    ours = templates[family]
    tokenizer.chat_template = official_source(family)
    try:  # a fixed date where the template reads one (an unread variable is an error)
        ours.check_variables(["date_string"])
        date = {"date_string": "26 Jul 2024"}
    except TemplateError:
        date = {}
    unknown = ChatTemplate.from_tokenizer(tokenizer).with_options(
        bos_token=ours.bos_token, eos_token=ours.eos_token, end_of_turn=ours.end_of_turn,
        variables=date)

    @settings(PARITY, max_examples=50)
    @given(conversation())
    def run(messages: list[dict[str, Any]]) -> None:
        expected = ours.render(messages, **date)
        found = unknown.render(messages)
        assert found.text == expected.text
        assert found.trained_spans == expected.trained_spans

    run()
