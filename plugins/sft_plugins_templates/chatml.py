"""Plain ChatML (``<|im_start|>role ... <|im_end|>``), for models trained on it from scratch."""

from __future__ import annotations

from sft_plugins.templates import ChatTemplate
from sft_plugins_templates._sources import load

CHATML = ChatTemplate(
    name="chatml",
    description="Plain ChatML: <|im_start|>role\\ncontent<|im_end|>, any system placement.",
    source=load("chatml.jinja"),
    eos_token="<|im_end|>", end_of_turn="<|im_end|>", stop_tokens=("<|im_end|>",),
    # ChatML defines no pad token; these are what ChatML models commonly ship (Qwen, SmolLM)
    pad_fallbacks=("<|endoftext|>", "<pad>", "<|pad|>"),
    system="anywhere",
)

TEMPLATES = (CHATML,)
