"""Exceptions raised by sft-plugins.

Every message says what was wrong, where (plugin, file:line, example index) and what to do,
so that a user can act on it without reading a traceback.
"""

from __future__ import annotations


class SFTPluginsError(Exception):
    """Base class of every error this package raises on purpose."""


class PluginLoadError(SFTPluginsError):
    """A plugin failed to import or raised while registering what it provides."""

    def __init__(self, plugin: str, detail: str, *, distribution: str | None = None,
                 entry_point: str | None = None, cause: BaseException | None = None) -> None:
        self.plugin = plugin
        self.distribution = distribution
        self.entry_point = entry_point
        self.cause = cause
        where = f"plugin {plugin!r}"
        if entry_point:
            where += f" (entry point {entry_point!r}"
            where += f" from distribution {distribution!r})" if distribution else ")"
        super().__init__(
            f"{where} {detail}. Fix or uninstall it, or disable it with "
            f"SFT_PLUGINS_DISABLE={plugin}"
        )


class DuplicateNameError(SFTPluginsError):
    """Two plugins registered the same name (or alias) for the same kind of item."""


class UnknownNameError(SFTPluginsError, LookupError):
    """A template, collator or perturber was asked for by a name nobody registered."""


class PluginOptionError(SFTPluginsError, ValueError):
    """A plugin item was given an option it does not accept, or a value it cannot use."""


class TemplateError(SFTPluginsError, ValueError):
    """A conversation cannot be rendered by a chat template, or a template is unusable."""


class DataError(SFTPluginsError, ValueError):
    """A data set, file or example is malformed."""


class PerturberError(SFTPluginsError, ValueError):
    """An embedding perturber was misconfigured or cannot be installed on a model."""


class MaskingError(SFTPluginsError, ValueError):
    """An example cannot be tokenized and masked as its collator requires."""


class ModelLoadError(SFTPluginsError, ValueError):
    """A model or tokenizer cannot be loaded as asked, or the flags asking for it conflict."""


class ConfigError(SFTPluginsError, ValueError):
    """Arguments, options or a config file ask for something that cannot be done."""


class LaunchError(SFTPluginsError, RuntimeError):
    """The processes were launched for distributed training but would not train together."""


class ConversationError(TemplateError):
    """A conversation breaks a rule of the chat template it is rendered with.

    ``message_index`` is the position of the offending message in the input list (``None`` when
    the problem is the conversation as a whole, such as tools for a family without tools) and
    ``rule`` a short name of the rule (``"unknown-role"``, ``"content-not-string"``, ...).
    """

    def __init__(self, message: str, *, message_index: int | None = None,
                 rule: str = "invalid") -> None:
        super().__init__(message)
        self.message_index = message_index
        self.rule = rule


class SkipExample(SFTPluginsError):
    """One example cannot be trained on: raised by a data-set rule, a chat template's rule or a
    collator, and counted under ``reason`` when the bad-example policy is ``skip``
    (:mod:`sft_plugins.bad_examples`).

    ``reason`` is a short, stable key (``missing_field``, ``no_trained_token``, ``too_long``...);
    ``field`` names the part of the example at fault and ``expected`` what would be accepted,
    when the rule is about one field.
    """

    def __init__(self, reason: str, problem: str, *, field: str = "",
                 expected: str = "") -> None:
        self.reason = reason
        self.field = field
        self.problem = problem
        self.expected = expected
        where = f"field {field!r}: " if field else ""
        super().__init__(where + problem + (f"; expected {expected}" if expected else ""))
