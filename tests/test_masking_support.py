"""Shared pieces of the masking and collator tests (no tests here): the shipped tokenizer
and a hand template.

``HandTemplate`` renders the Llama 3 chat format in plain Python and computes its spans by
hand, so the masking core is tested without depending on the jinja machinery.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from transformers import AutoTokenizer

from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.errors import TemplateError
from sft_plugins.masking import IGNORE_INDEX
from sft_plugins.templates import MessageSpan, RenderedConversation

BOS, EOT, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)


def llama_tokenizer() -> Any:
    """A fresh copy of the shipped fast tokenizer (tests may change its settings)."""
    import copy

    return copy.deepcopy(_tokenizer())


class HandTemplate:
    """The Llama 3 chat format, rendered by hand: bos, then per message a header, the content
    and ``<|eot_id|>``; an assistant turn's trained span is its content plus the eot."""

    name = "hand-llama3"
    eos_token = EOT
    pad_token = PAD
    bos_token = BOS

    def render(self, messages: Sequence[Mapping[str, Any]], *, tools: Any = None,
               add_generation_prompt: bool = False) -> RenderedConversation:
        text, spans = BOS, []
        for index, message in enumerate(messages):
            if message.get("role") not in ("system", "user", "assistant", "tool"):
                raise TemplateError(f"message {index}: unknown role {message.get('role')!r}")
            start = len(text)
            text += f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"
            content_start = len(text)
            text += f"{message['content']}{EOT}"
            trained = (content_start, len(text)) if message["role"] == "assistant" else None
            spans.append(MessageSpan(index, message["role"], start, len(text), trained))
        if add_generation_prompt:
            text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
        return RenderedConversation(text, tuple(spans))


def trained_text(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int]) -> str:
    """The decoded tokens whose label is not ignored."""
    return tokenizer.decode([t for t, label in zip(input_ids, labels, strict=True)
                             if label != IGNORE_INDEX])
