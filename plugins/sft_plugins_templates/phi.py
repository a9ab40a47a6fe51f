"""Phi-3.5-mini-instruct: ``<|user|>`` ... ``<|end|>`` turns, ``<|endoftext|>`` closing a
training sample."""

from __future__ import annotations

from sft_plugins.templates import ChatTemplate, Fingerprint
from sft_plugins_templates._sources import load

PHI_3_5 = ChatTemplate(
    name="phi-3.5",
    aliases=("phi3.5", "phi-3"),
    description="Phi-3.5-mini-instruct: <|user|>/<|assistant|> turns closed by <|end|>.",
    source=load("phi3_5.jinja"),
    bos_token="<s>", eos_token="<|endoftext|>", end_of_turn="<|end|>",
    pad_token="<|endoftext|>", stop_tokens=("<|end|>", "<|endoftext|>"),
    fingerprints=(Fingerprint(
        "78d976a442bcde2f0be15aafbb8e3050e1104f86732266f68403251b89982a90",
        "Phi-3.5-mini-instruct, official template"),),
    fixes=("marks each assistant turn (content plus <|end|>) with {% generation %}",),
    system="anywhere",
)

TEMPLATES = (PHI_3_5,)
