"""Typed registries of what plugins provide, with look-up by name or alias.

One registry per kind of item (chat templates, masking collators, embedding perturbers). Names
are case-insensitive. A name registered twice is an error that names both plugins; an unknown
name is an error that lists what exists and suggests the closest match.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sft_plugins.errors import (
    DuplicateNameError,
    PluginLoadError,
    PluginOptionError,
    SFTPluginsError,
    UnknownNameError,
)
from sft_plugins.options import typed_options

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered item and the plugin that registered it."""

    name: str
    aliases: tuple[str, ...]
    description: str
    plugin: str
    item: T


def _key(name: str) -> str:
    return name.strip().casefold()


def describe_item(item: object) -> tuple[str, tuple[str, ...], str]:
    """Read ``name``, ``aliases`` and the first line of ``description`` off a registered item.

    Raises ``TypeError`` with what is missing, which the manager reports against the plugin.
    """
    name = getattr(item, "name", None)
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"registered {item!r}, which has no non-empty string attribute 'name'")
    aliases = tuple(getattr(item, "aliases", ()) or ())
    if not all(isinstance(a, str) and a.strip() for a in aliases):
        raise TypeError(f"registered {name!r} with aliases {aliases!r}; aliases must be strings")
    description = getattr(item, "description", "") or ""
    if not isinstance(description, str):
        raise TypeError(f"registered {name!r} with a description that is not a string")
    first_line = description.strip().splitlines()[0] if description.strip() else ""
    return name.strip(), tuple(a.strip() for a in aliases), first_line


class Registry(Generic[T]):
    """The items of one kind that the loaded plugins registered."""

    def __init__(self, kind: str, broken_plugins: Sequence[PluginLoadError] = ()) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._by_key: dict[str, Entry[T]] = {}
        self._broken = broken_plugins

    def add(self, item: T, plugin: str) -> Entry[T]:
        """Register ``item`` on behalf of ``plugin``; a taken name or alias is an error."""
        name, aliases, description = describe_item(item)
        entry = Entry(name=name, aliases=aliases, description=description, plugin=plugin,
                      item=item)
        for key in dict.fromkeys(_key(n) for n in (name, *aliases)):
            taken = self._by_key.get(key)
            if taken is not None:
                raise DuplicateNameError(
                    f"{self.kind} name {key!r} is registered by plugin {taken.plugin!r} "
                    f"(as {taken.name!r}) and again by plugin {plugin!r} (as {name!r}). "
                    f"Rename one of them, or disable one plugin with "
                    f"SFT_PLUGINS_DISABLE={plugin}"
                )
        for key in (_key(n) for n in (name, *aliases)):
            self._by_key[key] = entry
        self._entries[name] = entry
        return entry

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _key(name) in self._by_key

    def names(self) -> list[str]:
        """The primary names, sorted."""
        return sorted(self._entries)

    def entry(self, name: str) -> Entry[T]:
        """The entry registered under ``name`` or one of its aliases."""
        found = self._by_key.get(_key(name))
        if found is not None:
            return found
        message = f"unknown {self.kind} {name!r}."
        close = difflib.get_close_matches(_key(name), list(self._by_key), n=1, cutoff=0.5)
        if close:
            message += f" Did you mean {self._by_key[close[0]].name!r}?"
        available = ", ".join(self.names()) or "none"
        message += f" Available: {available}."
        for broken in self._broken:
            message += (
                f" Plugin {broken.plugin!r} failed to load and may provide it: {broken}"
            )
        raise UnknownNameError(message)

    def get(self, name: str) -> T:
        """The item registered under ``name`` or one of its aliases."""
        return self.entry(name).item

    def create_from_text(self, name: str, text_options: Mapping[str, str], flag: str,
                         **defaults: Any) -> Any:
        """:meth:`create` with options given as text (``--collator_max_length 512``, ``-c
        max_length=512``), converted to the types the constructor declares; ``flag``
        (``"--collator_{name}"``, ``"-c {name}"``) names one in errors. ``defaults`` apply where
        the text gives no value."""
        typed = typed_options(self.get(name), text_options, flag)
        return self.create(name, **{**defaults, **typed})

    def create(self, name: str, **options: Any) -> Any:
        """Instantiate the class registered under ``name`` with validated keyword options."""
        entry = self.entry(name)
        factory = entry.item
        if not callable(factory):
            raise TypeError(f"{self.kind} {entry.name!r} is not a class and takes no options")
        check_options(factory, options, what=f"{self.kind} {entry.name!r} "
                                             f"(plugin {entry.plugin!r})")
        try:
            return factory(**options)
        except SFTPluginsError:
            raise  # the plugin's own clear refusal (an option out of range, ...)
        except Exception as exc:
            raise PluginLoadError(entry.plugin, f"raised {type(exc).__name__}: {exc} when "
                                  f"building {self.kind} {entry.name!r} with options "
                                  f"{options or '{}'}", cause=exc) from exc


def check_options(factory: Any, options: dict[str, Any], *, what: str) -> None:
    """Reject options that ``factory``'s signature does not accept, listing those it does."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    parameters = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = [p.name for p in parameters
                if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                              inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise PluginOptionError(
            f"{what} has no option {', '.join(map(repr, unknown))}. "
            f"Accepted: {', '.join(accepted) or 'none'}"
        )


__all__ = ["Entry", "PluginLoadError", "Registry", "check_options", "describe_item"]
