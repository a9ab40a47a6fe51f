"""First-party collators, registered through the public hooks like any third-party plugin.

Each collator only decides which characters of a rendered example carry loss, and with what
weight (:meth:`~sft_plugins.masking.MaskingCollator.weigh`); tokenization, offsets, truncation,
counting skips and padding are the host's :class:`~sft_plugins.masking.MaskingCollator`.
"""

from __future__ import annotations

from collections.abc import Callable

from sft_plugins import hookimpl
from sft_plugins.masking import MaskingCollator
from sft_plugins_collators.response_template import ResponseTemplate
from sft_plugins_collators.spans import (
    AllTokens,
    AssistantOnly,
    CompletionOnly,
    LastTurn,
    PromptWeighted,
)

COLLATORS: tuple[type[MaskingCollator], ...] = (
    CompletionOnly,
    AssistantOnly,
    LastTurn,
    AllTokens,
    PromptWeighted,
    ResponseTemplate,
)


@hookimpl
def register_collators(register: Callable[[type[MaskingCollator]], None]) -> None:
    for collator in COLLATORS:
        register(collator)


__all__ = ["COLLATORS", "AllTokens", "AssistantOnly", "CompletionOnly", "LastTurn",
           "PromptWeighted", "ResponseTemplate", "register_collators"]
