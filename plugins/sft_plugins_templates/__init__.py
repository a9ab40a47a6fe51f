"""First-party chat templates, registered through the public hooks like any third-party plugin.

One module per family; each exposes ``TEMPLATES``. ``select_chat_template`` recognises a
tokenizer's template by the fingerprints of the official texts (and of our own sources).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sft_plugins import hookimpl
from sft_plugins.templates import ChatTemplate
from sft_plugins_templates import (
    chatml,
    deepseek,
    gemma,
    gemma4,
    glm,
    gpt_oss,
    lfm,
    llama,
    mistral,
    nemotron,
    olmo,
    phi,
    qwen,
    qwen3_5,
)

logger = logging.getLogger(__name__)

TEMPLATES: tuple[ChatTemplate, ...] = (
    *llama.TEMPLATES, *qwen.TEMPLATES, *qwen3_5.TEMPLATES, *gemma.TEMPLATES, *gemma4.TEMPLATES,
    *phi.TEMPLATES, *deepseek.TEMPLATES, *gpt_oss.TEMPLATES, *mistral.TEMPLATES,
    *glm.TEMPLATES, *nemotron.TEMPLATES, *olmo.TEMPLATES, *lfm.TEMPLATES,
    *chatml.TEMPLATES,
)


@hookimpl
def register_chat_templates(register: Callable[[ChatTemplate], None]) -> None:
    for template in TEMPLATES:
        register(template)


@hookimpl
def select_chat_template(tokenizer: Any, chat_template: str | None) -> str | None:
    """The first-party template whose fingerprints include ``chat_template``'s text; a
    version with known bugs is reported (once per call) since the fixed template replaces it."""
    for template in TEMPLATES:
        version = template.recognise(chat_template)
        if version is None:
            continue
        for bug in version.bugs:
            logger.warning("the tokenizer carries the %s: %s. Using sft-plugins' %s template, "
                           "which fixes it (sft-plugins doctor explains)", version.label, bug,
                           template.name)
        return template.name
    return None
