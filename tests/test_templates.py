"""The ChatTemplate type: validation, spans, Llama 3.1's fixes, unknown templates, detection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from sft_plugins import hookimpl
from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.errors import ConversationError, TemplateError
from sft_plugins.templates import ChatTemplate, strip_message_markers
from sft_plugins.testing import plugin_manager

OFFICIAL_TEMPLATES = Path(__file__).parent / "fixtures" / "official_templates"
"""The publishers' templates, byte for byte (provenance in its README.md)."""

CHAT = [
    {"role": "system", "content": " Be brief. "},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "  Hello!\n"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def manager() -> Any:
    return plugin_manager("sft_plugins_templates")


@pytest.fixture(scope="module")
def llama(manager: Any) -> ChatTemplate:
    return manager.templates.get("llama-3.1")


@pytest.fixture
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)


# ---------------------------------------------------------------------------- validation

@pytest.mark.parametrize(("messages", "index", "rule"), [
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], 1, "unknown-role"),
    ([{"role": "user", "content": ["a"]}], 0, "content-not-string"),
    ([{"role": "user"}], 0, "content-not-string"),
    ([{"role": "system", "content": "a"}, {"role": "system", "content": "b"}], 1,
     "system-not-first"),
    (["hello"], 0, "not-an-object"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": {}}}, {"function": {"name": "g", "arguments": {}}},
    ]}], 1, "one-tool-call"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "I will call f",
                                          "tool_calls": [{"function": {"name": "f",
                                                                       "arguments": {}}}]}],
     1, "tool-call-content"),
    ([{"role": "user", "content": "a"}, {"role": "ipython", "content": "42"}], 1,
     "tool-result-without-call"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "tool", "content": "42"}], 2, "tool-result-without-call"),
    ([{"role": "tool", "content": "42"}], 0, "tool-result-without-call"),
])
def test_bad_conversations_name_the_message_and_rule(llama: ChatTemplate, messages: Any,
                                                     index: int, rule: str) -> None:
    with pytest.raises(ConversationError) as caught:
        llama.render(messages)
    assert caught.value.message_index == index
    assert caught.value.rule == rule
    assert f"message {index}" in str(caught.value)


def test_a_tool_result_follows_its_call_or_another_result(manager: Any) -> None:
    """Results of one call, several in a row, are accepted; a template that takes no
    ``tool_calls`` (calls written in the content) needs only an assistant message before."""
    call = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": {}}}]}
    results = [{"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}]
    manager.templates.get("qwen3").validate([{"role": "user", "content": "a"}, call, *results])
    in_content = ChatTemplate(name="calls-in-content", source="{{ messages }}",
                              roles=("user", "assistant", "tool"))
    in_content.validate([{"role": "user", "content": "a"},
                         {"role": "assistant", "content": "<call>f()</call>"}, *results])
    with pytest.raises(ConversationError, match="calls-in-content: message 1: a 'tool' message "
                                                "must follow the assistant message"):
        in_content.validate([{"role": "user", "content": "a"}, *results])


def test_llama_tools_go_into_a_first_user_message(llama: ChatTemplate) -> None:
    with pytest.raises(ConversationError, match="message 1: with tools") as caught:
        llama.render([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
                     tools=[{"name": "f"}])
    assert caught.value.rule == "tools-need-user-message"
    with pytest.raises(TemplateError, match="Cannot put tools in the first user message"):
        llama.render([{"role": "system", "content": "s"}], tools=[{"name": "f"}])


def test_families_refuse_what_they_cannot_express(manager: Any) -> None:
    gemma = manager.templates.get("gemma-3")
    with pytest.raises(ConversationError, match="cannot express tools") as caught:
        gemma.render([{"role": "user", "content": "a"}], tools=[{"name": "f"}])
    assert caught.value.message_index is None
    with pytest.raises(ConversationError, match="message 2: roles must alternate"):
        gemma.render([{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                      {"role": "user", "content": "b"}])
    with pytest.raises(ConversationError, match="cannot express tool calls"):
        manager.templates.get("phi-3.5").render([{"role": "assistant", "content": "",
                                                  "tool_calls": [{"function": {"name": "f"}}]}])
    with pytest.raises(ConversationError, match="no messages"):
        gemma.render([])


def test_a_template_that_raises_reports_its_own_message() -> None:
    template = ChatTemplate(name="strict", source="{{ raise_exception('only pirates here') }}")
    with pytest.raises(TemplateError, match="refused the conversation: only pirates here"):
        template.render([{"role": "user", "content": "a"}])


def test_template_errors_are_never_jinja_tracebacks() -> None:
    broken = ChatTemplate(name="broken", source="{% for m in messages %}")
    with pytest.raises(TemplateError, match="not valid jinja"):
        broken.render([{"role": "user", "content": "a"}])
    undefined = ChatTemplate(name="undef", source="{{ messages[0].content + nothing.here }}")
    with pytest.raises(TemplateError, match="undef"):
        undefined.render([{"role": "user", "content": "a"}])


def test_templates_run_sandboxed() -> None:
    escape = ChatTemplate(name="escape",
                          source="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateError):
        escape.render([{"role": "user", "content": "a"}])
    namespace = ChatTemplate(name="ns", source="{% set ns = namespace(_x=1) %}{{ ns._x }}")
    with pytest.raises(TemplateError):
        namespace.render([{"role": "user", "content": "a"}])


def test_render_does_not_change_the_callers_messages(llama: ChatTemplate) -> None:
    messages = [{"role": "user", "content": " a ", "extra": None}]
    llama.render(messages)
    assert messages == [{"role": "user", "content": " a ", "extra": None}]


# ------------------------------------------------------------------------------ llama 3.1

def test_llama_3_1_spans_decode_to_content_and_eot(llama: ChatTemplate, tokenizer: Any) -> None:
    rendered = llama.render(CHAT)
    encoding = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    for span, expected in zip(rendered.trained_spans, ["Hello!", "4"], strict=True):
        tokens = [i for i, (s, e) in enumerate(encoding["offset_mapping"])
                  if s < span[1] and e > span[0]]
        ids = [encoding["input_ids"][i] for i in tokens]
        assert tokenizer.decode(ids) == expected + "<|eot_id|>"


def test_llama_3_1_tokenization_has_one_bos(llama: ChatTemplate, tokenizer: Any) -> None:
    assert llama.renders_bos
    ids = tokenizer(llama.render(CHAT).text, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.convert_tokens_to_ids("<|begin_of_text|>")) == 1
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|begin_of_text|>")


def test_llama_3_1_respects_add_generation_prompt(llama: ChatTemplate) -> None:
    assert llama.render(CHAT).text.endswith("4<|eot_id|>")
    prompted = llama.render(CHAT[:-1], add_generation_prompt=True).text
    assert prompted.endswith("2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama_3_1_can_leave_out_the_knowledge_date(llama: ChatTemplate) -> None:
    assert "Cutting Knowledge Date" in llama.render(CHAT).text
    text = llama.render(CHAT, omit_knowledge_date=True).text
    assert "Cutting Knowledge Date" not in text and "Today Date" not in text
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                           "Be brief.<|eot_id|>")
    bare = llama.render(CHAT[1:], omit_knowledge_date=True).text
    assert bare.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")


def test_llama_3_1_ipython_tool_calls_end_with_eom(llama: ChatTemplate) -> None:
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "tool_calls": [{"function": {
                    "name": "brave_search", "arguments": {"query": "weather"}}}]}]
    rendered = llama.render(messages, builtin_tools=["brave_search"])
    start, end = rendered.trained_spans[0]
    assert rendered.text[start:end] == '<|python_tag|>brave_search.call(query="weather")<|eom_id|>'


def test_configure_tokenizer_pads_with_finetune_right_pad(llama: ChatTemplate,
                                                          tokenizer: Any) -> None:
    vocabulary = len(tokenizer)
    llama.configure_tokenizer(tokenizer)
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"
    assert len(tokenizer) == vocabulary
    assert llama.recognise(tokenizer.chat_template) is not None
    assert "{% message" not in tokenizer.chat_template
    out = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(trained) == "Hello!<|eot_id|>4<|eot_id|>"
    assert llama.stop_token_ids(tokenizer)[0] == tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_configure_tokenizer_never_pads_with_end_of_turn(tokenizer: Any) -> None:
    chatml_like = ChatTemplate(name="t", source="x", end_of_turn="<|eot_id|>",
                               pad_token="<|eot_id|>")
    with pytest.raises(TemplateError, match="stop signal"):
        chatml_like.configure_tokenizer(tokenizer)
    missing = ChatTemplate(name="t", source="x", end_of_turn="<|eot_id|>", pad_token="<pad>")
    with pytest.raises(TemplateError, match="add_missing_tokens"):
        missing.configure_tokenizer(tokenizer)
    missing.configure_tokenizer(tokenizer, add_missing_tokens=True)
    assert tokenizer.pad_token == "<pad>"


# ------------------------------------------------------------------- unknown templates

def test_unknown_templates_get_spans_by_prefix_diffing(llama: ChatTemplate,
                                                       tokenizer: Any) -> None:
    tokenizer.chat_template = (OFFICIAL_TEMPLATES / "llama3_1.jinja").read_text()
    unknown = ChatTemplate.from_tokenizer(tokenizer)
    ours, theirs = llama.render(CHAT), unknown.render(CHAT)
    assert theirs.text == ours.text
    assert theirs.trained_spans == ours.trained_spans
    assert [(m.start, m.end) for m in theirs.messages][1:] == \
        [(m.start, m.end) for m in ours.messages][1:]


def test_day_one_template_cannot_be_diffed_and_says_where(tokenizer: Any) -> None:
    tokenizer.chat_template = (OFFICIAL_TEMPLATES / "llama3_1_day_one.jinja").read_text()
    with pytest.raises(TemplateError, match=r"message 0: .* not render as a prefix"):
        ChatTemplate.from_tokenizer(tokenizer).render(CHAT)


def test_unknown_template_with_generation_markers_uses_them(tokenizer: Any) -> None:
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m.role }}]{% if m.role == 'assistant' %}{% generation %}"
        "{{ m.content }}</s>{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}")
    rendered = ChatTemplate.from_tokenizer(tokenizer).render(CHAT[1:3])
    (start, end), = rendered.trained_spans
    assert rendered.text[start:end] == "  Hello!\n</s>"


def test_a_tokenizer_without_template_is_an_error(tokenizer: Any) -> None:
    with pytest.raises(TemplateError, match="has no chat template"):
        ChatTemplate.from_tokenizer(tokenizer)


def test_strip_message_markers_removes_what_trim_blocks_ate() -> None:
    source = "{% for m in messages %}\n    {% message m %}\n{{ m }}{% message m %}x{% endfor %}"
    assert strip_message_markers(source) == "{% for m in messages %}\n{{ m }}x{% endfor %}"


# ------------------------------------------------------------------------- detection

@pytest.mark.parametrize(("filename", "family"), [
    ("llama3_1.jinja", "llama-3.1"), ("llama3_1_day_one.jinja", "llama-3.1"),
    ("llama3.jinja", "llama-3"), ("llama3_2.jinja", "llama-3.2"), ("qwen2_5.jinja", "qwen2.5"),
    ("qwen3.jinja", "qwen3"), ("gemma3.jinja", "gemma-3"), ("phi3_5.jinja", "phi-3.5"),
    ("deepseekv3.jinja", "deepseek-v3"),
])
def test_detection_by_fingerprint(manager: Any, tokenizer: Any, filename: str,
                                  family: str) -> None:
    tokenizer.chat_template = (OFFICIAL_TEMPLATES / filename).read_text()
    assert manager.select_chat_template(tokenizer).name == family


def test_detecting_the_day_one_template_warns_about_its_bug(
        manager: Any, tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    tokenizer.chat_template = (OFFICIAL_TEMPLATES / "llama3_1_day_one.jinja").read_text()
    with caplog.at_level("WARNING"):
        assert manager.select_chat_template(tokenizer).name == "llama-3.1"
    assert "day-one" in caplog.text and "add_generation_prompt=False" in caplog.text


def test_detection_knows_our_own_installed_sources(manager: Any, tokenizer: Any) -> None:
    for entry in manager.templates:
        tokenizer.chat_template = entry.item.tokenizer_source
        assert manager.select_chat_template(tokenizer).name == entry.name


def test_unrecognised_templates_are_not_guessed(manager: Any, tokenizer: Any) -> None:
    tokenizer.chat_template = "{{ messages }}"
    assert manager.select_chat_template(tokenizer) is None


def test_aliases(manager: Any) -> None:
    assert manager.templates.get("llama-3.3").name == "llama-3.1"
    assert manager.templates.get("Qwen2.5").name == "qwen2.5"


# ------------------------------------------------------------------------ properties

_CONTENT = st.text(st.characters(exclude_categories=("Cs",)), max_size=16)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_CONTENT, _CONTENT), min_size=1, max_size=4), st.booleans())
def test_llama_3_1_trained_spans_are_exactly_trimmed_content_plus_eot(
        turns: list[tuple[str, str]], system: bool) -> None:
    llama = plugin_manager("sft_plugins_templates").templates.get("llama-3.1")
    messages = [{"role": "system", "content": "s"}] if system else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": assistant}]
    rendered = llama.render(messages)
    trained = [rendered.text[s:e] for s, e in rendered.trained_spans]
    assert trained == [a.strip() + "<|eot_id|>" for _, a in turns]
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    for span in rendered.messages:
        if span.trained:
            assert rendered.text[span.start:span.trained[0]] == header


def test_messages_marked_out_of_order_or_twice_get_their_first_start() -> None:
    """A template that writes the system message last and marks a message twice: each message
    starts at its first mark and ends where the next one (by position) starts. A message left
    unmarked is the template's bug, named."""
    source = ("{% for m in messages[1:] %}{% message m %}<{{ m.role }}>"
              "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}|{% endgeneration %}"
              "{% else %}{% message m %}{{ m.content }}|{% endif %}{% endfor %}"
              "{% message messages[0] %}<system>{{ messages[0].content }}{% endmessages %}!")
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}]
    rendered = ChatTemplate(name="reordered", source=source).render(chat)
    assert rendered.text == "<user>U|<assistant>A|<system>S!"
    assert [(m.index, m.start, m.end) for m in rendered.messages] == [
        (0, 21, 30), (1, 0, 8), (2, 8, 21)]
    unmarked = ChatTemplate(name="unmarked", source=source.replace("{% message messages[0] %}",
                                                                   ""))
    with pytest.raises(TemplateError, match="did not mark where message 0 starts"):
        unmarked.render(chat)


class _MyChatPlugin:
    """A third-party template plugin, as in docs/templates.md."""

    template = ChatTemplate(
        name="my-chat",
        source=(
            "{% for m in messages %}{% message m %}<|{{ m.role }}|>"
            "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|end|>"
            "{% endgeneration %}{% else %}{{ m.content }}<|end|>{% endif %}{% endfor %}"
            "{% endmessages %}{% if add_generation_prompt %}<|assistant|>{% endif %}"),
        eos_token="<|end|>", end_of_turn="<|end|>", pad_token="<|pad|>")

    @hookimpl
    def register_chat_templates(self, register: Any) -> None:
        register(self.template)

    @hookimpl
    def select_chat_template(self, tokenizer: Any, chat_template: str | None) -> str | None:
        return "my-chat" if chat_template and "<|{{ m.role }}|>" in chat_template else None


def test_a_third_party_template_plugin_registers_and_is_selected_first(tokenizer: Any) -> None:
    manager = plugin_manager(_MyChatPlugin(), with_first_party=True)
    template = manager.templates.get("my-chat")
    rendered = template.render(CHAT[1:3], add_generation_prompt=False)
    assert rendered.text == "<|user|>Hi there<|end|><|assistant|>  Hello!\n<|end|>"
    (start, end), = rendered.trained_spans
    assert rendered.text[start:end] == "  Hello!\n<|end|>"
    assert [(m.start, m.end) for m in rendered.messages] == [(0, 23), (23, len(rendered.text))]
    tokenizer.chat_template = template.tokenizer_source
    assert manager.select_chat_template(tokenizer).name == "my-chat"
