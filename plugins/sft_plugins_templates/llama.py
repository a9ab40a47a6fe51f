"""Meta Llama 3, 3.1 (and 3.3, which ships the same template) and 3.2.

Llama 3.1 is the flagship. Its day-one template (July 2024) appended an assistant header even
with ``add_generation_prompt=False``, so "train on what follows the last assistant header"
trained on nothing; it also renders its own ``<|begin_of_text|>`` (double BOS when the text is
tokenized with special tokens), has no ``{% generation %}`` markers, and tempts people to pad
with ``<|eot_id|>``, which masking then hides, so the model never learns to stop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sft_plugins.errors import ConversationError
from sft_plugins.templates import ChatTemplate, Fingerprint
from sft_plugins_templates._sources import load

BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"
EOM = "<|eom_id|>"
PAD = "<|finetune_right_pad_id|>"
LLAMA3_PAD = "<|reserved_special_token_2|>"  # the same id (128004) before 3.1 named it

DAY_ONE_BUG = ("appends '<|start_header_id|>assistant<|end_header_id|>' even when "
               "add_generation_prompt=False: every training sample ends with an empty assistant "
               "header, and masks keyed on the last assistant header train on nothing")

FIXES = (
    "respects add_generation_prompt (the day-one template always added an assistant header)",
    "marks each assistant turn, content plus <|eot_id|> (<|eom_id|> in ipython mode), with "
    "{% generation %}",
    "renders <|begin_of_text|> itself: tokenize with add_special_tokens=False (no double BOS)",
    "pads with <|finetune_right_pad_id|>, never <|eot_id|>, so the stop token stays trained",
)


def _tool_rules(messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
    """Llama 3.x calls one tool per assistant turn, with an object of arguments, and renders no
    content beside it; with tools, the first message after the system prompt is the user's
    (the template folds the tool list into it)."""
    first = 1 if messages[0].get("role") == "system" else 0
    if tools is not None and first < len(messages) and messages[first].get("role") != "user":
        raise ConversationError(f"llama: message {first}: with tools the conversation must "
                                "start with a user message (the tool list goes into it)",
                                message_index=first, rule="tools-need-user-message")
    for index, message in enumerate(messages):
        calls = message.get("tool_calls")
        if calls is None:
            continue
        if message.get("content"):
            raise ConversationError(f"llama: message {index}: the template drops the content "
                                    "of an assistant message with tool calls; move the text to "
                                    "its own assistant message or leave content empty",
                                    message_index=index, rule="tool-call-content")
        if len(calls) != 1:
            raise ConversationError(f"llama: message {index}: this model only supports one tool "
                                    f"call per assistant message, got {len(calls)}",
                                    message_index=index, rule="one-tool-call")
        if not isinstance(calls[0]["function"].get("arguments"), Mapping):
            raise ConversationError(f"llama: message {index}: tool call arguments must be an "
                                    "object", message_index=index, rule="tool-call-arguments")


_COMMON: dict[str, Any] = {
    "bos_token": BOS, "eos_token": EOT, "end_of_turn": EOT, "renders_bos": True,
}

LLAMA_3_1 = ChatTemplate(
    name="llama-3.1",
    aliases=("llama-3.3", "llama3.1", "llama3.3"),
    description=(
        "Llama 3.1 / 3.3 Instruct, official text with the day-one bugs fixed.\n"
        "render(..., omit_knowledge_date=True) leaves out the 'Cutting Knowledge Date' and "
        "'Today Date' lines (and the system block when nothing else is in it); date_string, "
        "builtin_tools, tools_in_user_message work as in the official template."),
    source=load("llama3_1.jinja"),
    pad_token=PAD, pad_fallbacks=(LLAMA3_PAD,), stop_tokens=(EOT, EOM, "<|end_of_text|>"),
    fingerprints=(
        Fingerprint("93c0e9aa3629bbd77e68dbc0f5621f6e6b23aa8d74b932595cdb8d64684526d7",
                    "Llama 3.1 / 3.3 Instruct, current official template"),
        Fingerprint("b48c47f6443892716176eb200bf4ef108f64e06ca26ed0fa8ebc0a4b3992fcb2",
                    "Llama 3.1 Instruct, day-one template (July 2024)", bugs=(DAY_ONE_BUG,)),
    ),
    fixes=FIXES,
    roles=("system", "user", "assistant", "tool", "ipython"),
    tools=True, tool_calls=True, checks=(_tool_rules,),
    **_COMMON,
)

LLAMA_3_2 = ChatTemplate(
    name="llama-3.2",
    aliases=("llama3.2",),
    description="Llama 3.2 1B/3B Instruct, official text with {% generation %} markers.\n"
                "Today's date comes from strftime_now unless date_string is given.",
    source=load("llama3_2.jinja"),
    pad_token=PAD, pad_fallbacks=(LLAMA3_PAD,), stop_tokens=(EOT, EOM, "<|end_of_text|>"),
    fingerprints=(Fingerprint(
        "d82792f95932f1c9cef5c4bd992f171225e3bf8c7b609b4557c9e1ec96be819f",
        "Llama 3.2 Instruct, official template"),),
    fixes=FIXES[1:],
    roles=("system", "user", "assistant", "tool", "ipython"),
    tools=True, tool_calls=True, checks=(_tool_rules,),
    **_COMMON,
)

LLAMA_3 = ChatTemplate(
    name="llama-3",
    aliases=("llama3",),
    description="Meta Llama 3 Instruct (after its May 2024 fix), with {% generation %} markers.",
    source=load("llama3.jinja"),
    pad_token=LLAMA3_PAD, pad_fallbacks=(PAD,), stop_tokens=(EOT, "<|end_of_text|>"),
    fingerprints=(Fingerprint(
        "ba03a121d097859c7b5b9cd03af99aafe95275210d2876f642ad9929a150f122",
        "Llama 3 Instruct, official template"),),
    fixes=FIXES[1:],
    system="anywhere",
    **_COMMON,
)

TEMPLATES = (LLAMA_3, LLAMA_3_1, LLAMA_3_2)
