"""Gemma 3 instruction-tuned: ``<start_of_turn>user|model`` turns, the system prompt folded into
the first user turn, strict user/model alternation."""

from __future__ import annotations

from sft_plugins.templates import ChatTemplate, Fingerprint
from sft_plugins_templates._sources import load

GEMMA_3 = ChatTemplate(
    name="gemma-3",
    aliases=("gemma3",),
    description="Gemma 3 IT: system folded into the first user turn, strict alternation.",
    source=load("gemma3.jinja"),
    bos_token="<bos>", eos_token="<eos>", end_of_turn="<end_of_turn>", pad_token="<pad>",
    stop_tokens=("<end_of_turn>", "<eos>"), renders_bos=True,
    fingerprints=(Fingerprint(
        "8d9e3a3c114fb2053ec500184677af4f7e5f8ec2582443cd535834e68b3ade29",
        "Gemma 3 IT, official template"),),
    fixes=("marks each model turn (content plus <end_of_turn>) with {% generation %}",
           "renders <bos> itself: tokenize with add_special_tokens=False (no double BOS)"),
    alternate=True,
)

TEMPLATES = (GEMMA_3,)
