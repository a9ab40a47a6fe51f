"""Building a plugin manager: first-party plugins, then third-party entry points.

``get_plugin_manager()`` is a factory: each call builds a fresh manager, so nothing global is
created at import and tests can build one with only the plugins they name. First-party plugins
are registered before entry points because pluggy calls the last registered implementation
first: third-party plugins are therefore asked first by selection hooks and can override them.

Environment variables:

``SFT_PLUGINS_DISABLE=name1,name2``
    Block plugins (entry-point names, distribution names or first-party module names) before
    they are imported.
``SFT_PLUGINS_TRACE=1``
    Print every hook call, which plugin answered and what it returned, to standard error.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import pluggy

from sft_plugins import hookspecs
from sft_plugins.errors import PluginLoadError, SFTPluginsError, TemplateError
from sft_plugins.registry import Registry

if TYPE_CHECKING:
    from sft_plugins.masking import MaskingCollator
    from sft_plugins.perturb import Perturber
    from sft_plugins.templates import ChatTemplate

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
DISABLE_ENV = "SFT_PLUGINS_DISABLE"
TRACE_ENV = "SFT_PLUGINS_TRACE"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "sft_plugins_templates",
    "sft_plugins_collators",
    "sft_plugins_perturbers",
)
"""The first-party plugins, written against the public hook API like any third-party one."""


def _disabled_from_env() -> set[str]:
    raw = os.environ.get(DISABLE_ENV, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def _trace_enabled() -> bool:
    return os.environ.get(TRACE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class PluginManager:
    """The loaded plugins and the registries they built: one method or attribute per hook.

    ``pm`` is the underlying :class:`pluggy.PluginManager` for anything not wrapped here.
    ``errors`` lists the third-party plugins that failed to load; they are reported, never
    fatal, so that ``sft-plugins list`` still works when one is broken. A first-party plugin
    (or one passed in code) that fails raises instead: that is a bug to fix, not to list.
    """

    def __init__(self, pm: pluggy.PluginManager, errors: list[PluginLoadError],
                 distributions: dict[str, str | None] | None = None,
                 trace: Callable[[str], None] | None = None) -> None:
        self.pm = pm
        self.errors = errors
        self.distributions = dict(distributions or {})
        """Entry-point plugin name -> the distribution that provides it."""
        self._trace = trace
        self.templates: Registry[ChatTemplate] = Registry("chat template", errors)
        self.collators: Registry[type[MaskingCollator]] = Registry("collator", errors)
        self.perturbers: Registry[type[Perturber]] = Registry("perturber", errors)
        self._collect("register_chat_templates", self.templates)
        self._collect("register_collators", self.collators)
        self._collect("register_perturbers", self.perturbers)

    def _collect(self, hook_name: str, registry: Registry[Any]) -> None:
        """Call one registration hook plugin by plugin, so every item and every failure is
        attributed to the plugin it came from."""
        caller = getattr(self.pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            plugin = impl.plugin_name
            registered: list[Any] = []
            try:
                impl.function(register=registered.append)
            except Exception as exc:
                self._fail(plugin, f"raised {type(exc).__name__}: {exc} in {hook_name}", exc)
                continue
            for item in registered:
                try:
                    entry = registry.add(item, plugin)
                except (TypeError, SFTPluginsError) as exc:  # bad item, or a name taken
                    self._fail(plugin, f"{exc} in {hook_name}", exc)
                    break
                if self._trace:
                    self._trace(f"{hook_name} [{plugin}] registered {registry.kind} "
                                f"{entry.name!r}\n")

    def _fail(self, plugin: str, detail: str, exc: BaseException) -> None:
        error = self._error(plugin, detail, exc)
        if plugin not in self.distributions:  # not from an entry point: a bug, not user error
            raise error from exc
        self.errors.append(error)

    def _error(self, plugin: str, detail: str, exc: BaseException | None) -> PluginLoadError:
        """An error naming ``plugin``, and its entry point and distribution when it has them."""
        if plugin not in self.distributions:
            return PluginLoadError(plugin, detail, cause=exc)
        return PluginLoadError(plugin, detail, entry_point=plugin,
                               distribution=self.distributions[plugin], cause=exc)

    def plugin_names(self) -> list[str]:
        """Names of the registered plugins, first-party first."""
        return [name for name, plugin in self.pm.list_name_plugin() if plugin is not None]

    def select_chat_template(self, tokenizer: Any) -> ChatTemplate | None:
        """The registered template a plugin recognises for ``tokenizer``, or ``None``."""
        from sft_plugins.templates import tokenizer_template_text

        arguments = {"tokenizer": tokenizer, "chat_template": tokenizer_template_text(tokenizer)}
        for impl in reversed(self.pm.hook.select_chat_template.get_hookimpls()):  # call order
            plugin = impl.plugin_name
            try:
                name = impl.function(**{a: arguments[a] for a in impl.argnames})
            except Exception as exc:
                raise self._error(plugin, f"raised {type(exc).__name__}: {exc} in "
                                          "select_chat_template", exc) from exc
            if self._trace:
                self._trace(f"select_chat_template [{plugin}] returned {name!r}\n")
            if name is None:
                continue
            if not isinstance(name, str) or name not in self.templates:
                raise self._error(plugin, f"returned {name!r} from select_chat_template, which "
                                          "must return a registered template name or None",
                                  None)
            return self.templates.get(name)
        return None

    def resolve_template(self, template: str | ChatTemplate | None, tokenizer: Any = None,
                         variables: Mapping[str, Any] | None = None) -> ChatTemplate | None:
        """The template to train or render with, the one way every command and the trainer
        choose it: the one given (a name, or a :class:`ChatTemplate`), else the one a plugin
        recognises in ``tokenizer``, else the tokenizer's own template taken as is (spans by
        prefix diffing), else ``None`` (the tokenizer has no template: plain text only).

        ``variables`` become the template's default variables (a name it never reads is a
        :class:`TemplateError`, and so are variables with no template to take them).
        """
        from sft_plugins.templates import ChatTemplate, tokenizer_template_text

        if isinstance(template, ChatTemplate):
            resolved: ChatTemplate | None = template
        elif template:
            resolved = self.templates.get(template)
        elif tokenizer is None or tokenizer_template_text(tokenizer) is None:
            resolved = None
        else:
            resolved = (self.select_chat_template(tokenizer)
                        or ChatTemplate.from_tokenizer(tokenizer))
        if variables and resolved is None:
            raise TemplateError(f"template variables {', '.join(sorted(variables))} were given, "
                                "but no chat template is in use; name one (--template)")
        return resolved.with_variables(variables or {}) if resolved else None




def _register_checked(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    """Register one plugin and validate its hooks, undoing the registration if invalid."""
    pm.register(plugin, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError:
        pm.unregister(name=name)
        raise


def _load_entry_points(pm: pluggy.PluginManager, disabled: set[str],
                       errors: list[PluginLoadError]) -> dict[str, str | None]:
    """Import and register every enabled entry point; return plugin name -> distribution."""
    loaded: dict[str, str | None] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist_name = ep.dist.name if ep.dist else None
        if ep.name in disabled or (dist_name and dist_name in disabled):
            pm.set_blocked(ep.name)
            continue
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            _register_checked(pm, plugin, ep.name)
        except (Exception, SystemExit) as exc:  # sys.exit() on import must not end our command
            errors.append(PluginLoadError(
                ep.name, f"failed to load: {type(exc).__name__}: {exc}",
                distribution=dist_name, entry_point=ep.name, cause=exc))
            continue
        loaded[ep.name] = dist_name
    return loaded


def get_plugin_manager(
    *,
    plugins: Iterable[object | str] | None = None,
    load_entry_points: bool = True,
    disabled: Iterable[str] | None = None,
    trace: bool | None = None,
) -> PluginManager:
    """Build a fresh plugin manager.

    ``plugins``: the plugins to register first, as modules, objects or importable module names
    (default: the first-party plugins). ``load_entry_points``: also load third-party plugins
    from the ``sft_plugins`` entry-point group. ``disabled``: plugin names to block (default:
    ``SFT_PLUGINS_DISABLE``). ``trace``: print every hook call (default: ``SFT_PLUGINS_TRACE``).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    blocked = set(disabled) if disabled is not None else _disabled_from_env()
    writer: Callable[[str], None] | None = None
    if trace if trace is not None else _trace_enabled():
        def writer(message: str) -> None:
            sys.stderr.write(f"[sft_plugins] {message}")

        pm.trace.root.setwriter(writer)
        pm.enable_tracing()

    for plugin in DEFAULT_PLUGINS if plugins is None else plugins:
        if isinstance(plugin, str):
            if plugin in blocked:
                pm.set_blocked(plugin)
                continue
            module = importlib.import_module(plugin)
            pm.register(module, name=plugin)
        else:
            name = getattr(plugin, "__name__", None) or type(plugin).__name__
            if name in blocked:
                continue
            pm.register(plugin, name=name)
    pm.check_pending()

    errors: list[PluginLoadError] = []
    distributions = _load_entry_points(pm, blocked, errors) if load_entry_points else {}
    return PluginManager(pm, errors, distributions, writer)


__all__ = [
    "DEFAULT_PLUGINS",
    "DISABLE_ENV",
    "ENTRY_POINT_GROUP",
    "TRACE_ENV",
    "PluginManager",
    "SFTPluginsError",
    "get_plugin_manager",
]
