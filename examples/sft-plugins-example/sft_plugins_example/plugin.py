"""The plugin module the ``sft_plugins`` entry point names: one function per hook it implements."""

from __future__ import annotations

from sft_plugins import hookimpl
from sft_plugins.templates import ChatTemplate
from sft_plugins_example.noise import LaplaceNoise
from sft_plugins_example.reasoner import EXAMPLE_REASONER

# What the assistant says (content plus end-of-turn token) sits in {% generation %}; each message
# starts at {% message m %}, and {% endmessages %} marks where the last one ends. The markers add
# no text, so the template renders exactly what it renders without them. Special tokens are
# written literally: a tokenizer's own bos_token/eos_token may be other tokens.
EXAMPLE_CHAT_SOURCE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for m in messages %}{% message m %}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '### Assistant:\\n' }}{% generation %}{{ m['content'] + '<|end_of_text|>' }}"
    "{% endgeneration %}"
    "{{ '\\n\\n' }}"
    "{% else %}{{ '### ' + m['role'] | capitalize + ':\\n' + m['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}{% endmessages %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)

EXAMPLE_CHAT = ChatTemplate(
    name="example-chat",
    aliases=("markdown-chat",),
    description="Markdown headings per turn, <|end_of_text|> closes answers (example plugin).",
    source=EXAMPLE_CHAT_SOURCE,
    bos_token="<|begin_of_text|>",
    eos_token="<|end_of_text|>",
    end_of_turn="<|end_of_text|>",
    pad_token="<|finetune_right_pad_id|>",
    stop_tokens=("<|end_of_text|>",),
    renders_bos=True,
)


@hookimpl
def register_chat_templates(register):
    register(EXAMPLE_CHAT)
    register(EXAMPLE_REASONER)


@hookimpl
def register_perturbers(register):
    register(LaplaceNoise)


@hookimpl
def select_chat_template(tokenizer, chat_template):
    """Recognise tokenizers that carry these templates (with or without our span markers)."""
    if not chat_template or "### Assistant:" not in chat_template:
        return None
    return EXAMPLE_REASONER.name if "<call>" in chat_template else EXAMPLE_CHAT.name
