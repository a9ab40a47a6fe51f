"""Every hook a plugin can implement. These docstrings are the hook reference.

A plugin is a module (or object) with functions decorated by :data:`sft_plugins.hookimpl`
whose names match the functions below. It implements only the hooks it needs. Third-party
plugins are found through the ``sft_plugins`` entry-point group; see ``docs/plugins.md``.

The three ``register_*`` hooks are called once per plugin when a plugin manager is built. Each
receives a ``register`` callback; call it once per item the plugin provides. Every item has a
``name`` (looked up case-insensitively), ``aliases`` (a tuple of other names) and a one-line
``description``. Two plugins registering the same name is an error that names both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from sft_plugins.masking import MaskingCollator
    from sft_plugins.perturb import Perturber
    from sft_plugins.templates import ChatTemplate

PROJECT_NAME = "sft_plugins"
"""The pluggy project name, which is also the entry-point group third-party plugins use."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Decorator that marks a function in a plugin module as the implementation of a hook
(re-exported as ``sft_plugins.hookimpl``)."""


@hookspec
def register_chat_templates(register: Callable[[ChatTemplate], None]) -> None:
    """Register chat templates: how a conversation becomes text, and what of it is trained.

    Call ``register(template)`` with a :class:`sft_plugins.templates.ChatTemplate` instance for
    each template this plugin provides. The template's jinja source marks what the assistant
    says with ``{% generation %}`` blocks; its special tokens (bos, end of turn, pad, stop
    tokens) and fingerprints of the official template texts it replaces let the host configure
    tokenizers and recognise the family.

    Example::

        @hookimpl
        def register_chat_templates(register):
            register(ChatTemplate(name="my-chat", source=MY_JINJA, eos_token="<|end|>", ...))
    """


@hookspec
def register_collators(register: Callable[[type[MaskingCollator]], None]) -> None:
    """Register masking collators: which tokens carry loss, and with what weight.

    Call ``register(cls)`` with a subclass of :class:`sft_plugins.masking.MaskingCollator`.
    The class attributes ``name``, ``aliases`` and ``description`` identify it; the keyword
    arguments of its constructor are its options (``--collator_<option>`` on the command
    line).

    Example::

        @hookimpl
        def register_collators(register):
            register(LastTwoTurns)
    """


@hookspec
def register_perturbers(register: Callable[[type[Perturber]], None]) -> None:
    """Register embedding perturbers: noise added to the input embeddings while training.

    Call ``register(cls)`` with a subclass of :class:`sft_plugins.perturb.Perturber`. The class
    attributes ``name``, ``aliases`` and ``description`` identify it; the keyword arguments of
    its constructor are its options (``--perturber_<option>`` on the command line).

    Example::

        @hookimpl
        def register_perturbers(register):
            register(MyNoise)
    """


@hookspec(firstresult=True)
def select_chat_template(tokenizer: Any, chat_template: str | None) -> str | None:
    """Name the registered chat template that fits a tokenizer, or return ``None`` to pass.

    Called when the user did not name a template. ``tokenizer`` is the loaded tokenizer and
    ``chat_template`` the template text it carries (``None`` if it has none). The first
    plugin that returns a name wins; third-party plugins are asked before the first-party
    ones, so a plugin can teach auto-detection a new family or override a built-in choice.

    Example::

        @hookimpl
        def select_chat_template(tokenizer, chat_template):
            if chat_template and "<|my_turn|>" in chat_template:
                return "my-chat"
            return None
    """
