"""Plain ChatML (``<|im_start|>role ... <|im_end|>``), for models trained on it from scratch."""

from __future__ import annotations

from sft_plugins.templates import ChatTemplate, Fingerprint
from sft_plugins_templates._sources import load

CHATML = ChatTemplate(
    name="chatml",
    description="Plain ChatML: <|im_start|>role\\ncontent<|im_end|>, any system placement.",
    source=load("chatml.jinja"),
    eos_token="<|im_end|>", end_of_turn="<|im_end|>", stop_tokens=("<|im_end|>",),
    # ChatML defines no pad token; these are what ChatML models commonly ship (Qwen, SmolLM)
    pad_fallbacks=("<|endoftext|>", "<pad>", "<|pad|>"),
    system="anywhere",
    fingerprints=(Fingerprint(
        "fcf7a096fe99a48fd9ad2b250bf9237e96e8f48bffec1c7ea4d3f225176cd40e",
        "ChatML, the template of the transformers chat-templating documentation"),),
    fixes=("marks each assistant turn (content and <|im_end|>) with {% generation %}",),
)

TEMPLATES = (CHATML,)
