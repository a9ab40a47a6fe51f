"""What every family's parity test shares: the official fixtures, hypothesis settings,
conversation strategies and the three checks (see ``test_templates_parity.py``).

A family module ``test_templates_parity_<group>.py`` defines ``FAMILIES`` (family name ->
fixture file) and its own ``case`` strategy, and calls ``check_parity``;
``test_every_registered_family_has_a_parity_test`` collects ``FAMILIES`` from every such module.
The group modules also share how they train a family: :func:`shipped_tokenizer` with the
family's tokens, :func:`prepare_rows` and :func:`trained_text`, and the two reasoning turns.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.data import load_sft_dataset
from sft_plugins.loss import IGNORE_INDEX
from sft_plugins.masking import PreparedDataset
from sft_plugins.templates import ChatTemplate, RenderedConversation
from sft_plugins.testing import plugin_manager

OFFICIAL_TEMPLATES = Path(__file__).parent / "fixtures" / "official_templates"
"""The publishers' templates, byte for byte (provenance in its README.md)."""
PARITY_EXAMPLES = 200

PARITY = settings(max_examples=PARITY_EXAMPLES, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


MANAGER = plugin_manager("sft_plugins_templates", "sft_plugins_collators")


def official_text(filename: str) -> str:
    return (OFFICIAL_TEMPLATES / filename).read_text()


def template(name: str) -> ChatTemplate:
    """A first-party template by name."""
    return MANAGER.templates.get(name)


# ------------------------------------------------------------------------ training a family

def shipped_tokenizer(special_tokens: Iterable[str] = ()) -> Any:
    """The shipped tokenizer with ``special_tokens`` added, as a family's own tokenizer has
    them."""
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return tokenizer


def prepare_rows(tmp_path: Path, tokenizer: Any, chat: ChatTemplate, rows: list[dict[str, Any]],
                 collator: str, **options: Any) -> PreparedDataset:
    """``rows`` as a user gives them: a JSON Lines file, loaded and validated with ``chat``,
    prepared by ``collator`` (with ``options``) on ``tokenizer`` configured by ``chat``."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat.configure_tokenizer(tokenizer)
    data = load_sft_dataset(str(path), template=chat)
    return MANAGER.collators.create(collator, **options).prepare(data.train, tokenizer, chat,
                                                                 desc=None)


def trained_text(tokenizer: Any, row: dict[str, Any]) -> str:
    """The text of a prepared row's tokens that carry loss."""
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True)
                             if label != IGNORE_INDEX])


def turn(question: str, reasoning: str, answer: str, key: str = "reasoning_content"
         ) -> list[dict[str, Any]]:
    """A user question and an answer whose reasoning is under ``key``."""
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": answer, key: reasoning}]


ONE_TURN = {"messages": turn("2+2?", "Two and two make four.", "4")}
TWO_TURNS = {"messages": [*turn("2+2?", "Two and two make four.", "4"),
                          *turn("3+3?", "Three and three make six.", "6")]}
"""Reasoning on both answers: a template that keeps only the last turn's drops the first's."""


# --------------------------------------------------------------------------- strategies

_FRAGMENTS = st.sampled_from(["", " ", "\n", "  \n\t", "\n\n"])
_WORDS = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=12),
    st.sampled_from(["Hello!", "naïve café 東京 🦙", "a\nb", "x = {\"k\": [1, 2]}", "</think>",
                     "<think>\nhm\n</think>\n\nok", "<tool_response>r</tool_response>"]),
)
TEXT = st.builds(lambda a, b, c: a + b + c, _FRAGMENTS, _WORDS, _FRAGMENTS)
NAMES = st.sampled_from(["get_weather", "search", "add"])
ARGS = st.dictionaries(st.sampled_from(["city", "q", "n"]),
                       st.one_of(st.integers(-5, 99), st.text(max_size=6)), max_size=2)
TOOLS = st.lists(st.builds(lambda n: {"type": "function", "function": {
    "name": n, "description": "does " + n,
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}, NAMES),
    min_size=1, max_size=2)


def call(name: str, arguments: Any, type_: str | None = "function") -> dict[str, Any]:
    out: dict[str, Any] = {"function": {"name": name, "arguments": arguments}}
    if type_:
        out["type"] = type_
    return out


@st.composite
def conversation(draw: st.DrawFn, *, system: bool = True, tool_exchange: Any = None,
                 assistant: Any = None) -> list[dict[str, Any]]:
    """system?, then turns of user [tool exchange] [assistant]; the last may stop early."""
    messages: list[dict[str, Any]] = []
    if system and draw(st.booleans()):
        messages.append({"role": "system", "content": draw(TEXT)})
    turns = draw(st.integers(1, 4))
    for turn in range(turns):
        messages.append({"role": "user", "content": draw(TEXT)})
        if tool_exchange is not None and draw(st.integers(0, 3)) == 0:
            messages.extend(draw(tool_exchange))
        if turn < turns - 1 or draw(st.booleans()):
            messages.append(draw(assistant) if assistant is not None
                            else {"role": "assistant", "content": draw(TEXT)})
    return messages



# ------------------------------------------------------------------------------- checks

def special_tokens(template: ChatTemplate) -> dict[str, Any]:
    return {"bos_token": template.bos_token, "eos_token": template.eos_token}


def check_spans(template: ChatTemplate, rendered: RenderedConversation,
                messages: list[dict[str, Any]]) -> None:
    text = rendered.text
    assert [m.index for m in rendered.messages] == list(range(len(messages)))
    previous_end = 0
    for span in rendered.messages:
        assert span.role == messages[span.index]["role"]
        assert previous_end <= span.start <= span.end <= len(text)
        previous_end = span.end
        if span.role != "assistant":
            assert span.trained is None
            continue
        assert span.trained is not None
        start, end = span.trained
        assert span.start <= start <= end <= span.end
        assert text[start:end].endswith((template.end_of_turn, *template.stop_tokens))


def check_parity(template: ChatTemplate, tokenizer: Any, official: str,
                 messages: list[dict[str, Any]], options: dict[str, Any]) -> None:
    """Our render equals ``official`` run by ``transformers``; the source we install renders
    the same text with the same ``{% generation %}`` spans; the spans are well formed."""
    ours = template.render(messages, **options)
    official = tokenizer.apply_chat_template(
        messages, chat_template=official, tokenize=False,
        **special_tokens(template), **options)
    assert ours.text == official
    installed, indices = render_jinja_template(
        conversations=[messages], chat_template=template.tokenizer_source,
        return_assistant_tokens_mask=True, **special_tokens(template), **options)
    assert installed[0] == ours.text
    assert [tuple(i) for i in indices[0]] == list(ours.trained_spans)
    check_spans(template, ours, messages)
