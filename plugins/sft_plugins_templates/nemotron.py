"""NVIDIA Nemotron 3 (Nano, Super, Ultra) and Nemotron 3.5 Lightning: ChatML turns, every
assistant turn opening with a ``<think>`` block (empty when it has no reasoning), tool calls as
``<tool_call><function=NAME>`` with one ``<parameter=KEY>`` block per argument, tool results in
``<tool_response>`` blocks of a user turn.

Each checkpoint ships its own text: Super adds ``low_effort`` (a ``{reasoning effort: low}``
hint on the last user message), Ultra adds ``medium_effort`` (``{reasoning effort: efficient}``)
and writes the ``<think>`` block without newlines around ``</think>``, and Lightning is Ultra's
text without the effort flag. So each is its own template, with its own parity test against its
own text.

All of them drop the reasoning of assistant turns before the last user message
(``truncate_history_thinking``, on by default); ``truncate_history_thinking=False`` keeps every
turn's reasoning, which is how one example trains the reasoning of all its turns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sft_plugins.errors import ConversationError
from sft_plugins.templates import ChatTemplate, Check, Fingerprint
from sft_plugins_templates._sources import load

IM_END = "<|im_end|>"


def _arguments_are_objects(name: str) -> Check:
    """The template writes one ``<parameter=KEY>`` block per item of the arguments object (none
    when a call has no arguments); a JSON string cannot be rendered that way."""
    def check(messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
        for index, message in enumerate(messages):
            for call in message.get("tool_calls") or ():
                function = call["function"]
                if "arguments" in function and not isinstance(function["arguments"], Mapping):
                    raise ConversationError(
                        f"{name}: message {index}: tool call arguments must be an object (one "
                        "<parameter=KEY> block per argument); decode the JSON string first",
                        message_index=index, rule="tool-call-arguments")
    return check


def _nemotron(name: str, model: str, filename: str, sha256: str,
              description: str = "") -> ChatTemplate:
    return ChatTemplate(
        name=name,
        aliases=(name.replace("-", "", 1), f"nvidia-{name}"),
        description=(
            f"NVIDIA {model}: ChatML with a <think> block in every assistant turn, "
            "<tool_call><function=...><parameter=...> tool calls.\n"
            "Reasoning ('reasoning_content' or a <think> block in the content) is kept for the "
            "turns after the last user message unless truncate_history_thinking=False; "
            "enable_thinking=False closes the generation prompt's <think> block." + description),
        source=load(filename),
        # the checkpoints' config pads with id 0, <unk>; the template renders no BOS
        eos_token=IM_END, end_of_turn=IM_END, pad_token="<unk>", stop_tokens=(IM_END,),
        fingerprints=(Fingerprint(sha256, f"NVIDIA {model}, official template"),),
        fixes=("marks each assistant turn (the <think> block, content, tool calls and "
               "<|im_end|>) with {% generation %}",),
        roles=("system", "user", "assistant", "tool"), system="anywhere",
        tools=True, tool_calls=True, reasoning=True,
        checks=(_arguments_are_objects(name),),
    )


NEMOTRON_3_NANO = _nemotron(
    "nemotron-3-nano", "Nemotron 3 Nano", "nemotron_3_nano.jinja",
    "43a92aacc2e169bb37055e4d8b0df31edfdc8657d8c387fcf98254cb246e626a")
NEMOTRON_3_SUPER = _nemotron(
    "nemotron-3-super", "Nemotron 3 Super", "nemotron_3_super.jinja",
    "3b74d76d8b903752e764cae114ae8ae2f24cd260466cf672570c745219573d28",
    "\nlow_effort=True appends '{reasoning effort: low}' to the last user message.")
NEMOTRON_3_ULTRA = _nemotron(
    "nemotron-3-ultra", "Nemotron 3 Ultra", "nemotron_3_ultra.jinja",
    "82753bef5cedc4932c1ed509b5c9a12be680fd86d1adb65bc3f7398d11c8eebc",
    "\nmedium_effort=True appends '{reasoning effort: efficient}' to the last user message.")
NEMOTRON_3_5_LIGHTNING = _nemotron(
    "nemotron-3.5-lightning", "Nemotron 3.5 Lightning", "nemotron_3_5_lightning.jinja",
    "58933db77d3099b4f78c55a38347a72e1ea05b97d6bd8f38775303dc0194e0a9")

TEMPLATES = (NEMOTRON_3_NANO, NEMOTRON_3_SUPER, NEMOTRON_3_ULTRA, NEMOTRON_3_5_LIGHTNING)
