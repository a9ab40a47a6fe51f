"""Plugin options and template variables given as text (flags, ``-o NAME=VALUE``, config files),
turned into Python values one way everywhere.

A template variable is read as a YAML scalar or collection (``true``, ``5``, ``0.5``,
``[a, b]``), except that a calendar date stays the text it was written as
(``date_string=2024-07-26`` must reach the template as that string). A plugin option is
converted to the type its constructor declares, so ``--perturber_alpha 5`` is a float and
``--collator_strict yes`` a bool.
"""

from __future__ import annotations

import datetime
import inspect
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from sft_plugins.errors import ConfigError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    """``true``/``yes``/``on``/``1`` and their opposites, any case; else ``ValueError``."""
    lowered = text.strip().lower()
    if lowered in TRUE:
        return True
    if lowered in FALSE:
        return False
    raise ValueError(text)


def parse_value(text: str) -> Any:
    """One template variable's value from its text (see the module docstring)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, (datetime.date, datetime.datetime)) else value


def split_pairs(pairs: Sequence[str], what: str = "option") -> dict[str, str]:
    """``NAME=VALUE`` pairs as ``{name: text}``; ``what`` names them in the error."""
    split: dict[str, str] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"{what} {pair!r} is not NAME=VALUE")
        split[name.strip()] = text
    return split


def parse_variables(values: Mapping[str, str] | Sequence[str]) -> dict[str, Any]:
    """Template variables from ``{name: text}`` or from ``NAME=VALUE`` pairs."""
    if not isinstance(values, Mapping):
        values = split_pairs(values, "template variable")
    return {name: parse_value(text) for name, text in values.items()}


def _target_type(annotation: Any, default: Any) -> type | None:
    if isinstance(annotation, type):
        return annotation
    concrete = [a for a in typing.get_args(annotation) if a is not type(None)]
    if concrete and isinstance(concrete[0], type):  # Optional[X] and friends: the first type
        return concrete[0]
    if default is not None and default is not inspect.Parameter.empty:
        return type(default)
    return None


def _convert(raw: str, annotation: Any, default: Any, where: str) -> Any:
    target = _target_type(annotation, default)
    if raw.lower() in ("none", "null") and (default is None or type(None) in
                                            typing.get_args(annotation)):
        return None
    try:
        if target is bool:
            return parse_bool(raw)
        if target in (int, float):
            return target(raw)  # type: ignore[misc]
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number"}[target]
        raise ConfigError(f"{where}: {raw!r} is not {expected}") from None
    return raw


def typed_options(factory: Any, raw: Mapping[str, str], flag: str) -> dict[str, Any]:
    """Plugin options from text to the types ``factory``'s constructor declares; ``flag`` names
    an option in errors as the user wrote it (``--collator_{name}`` for ``sft-plugins train``,
    ``-c {name}`` for the commands that take ``-c NAME=VALUE``)."""
    try:
        hints = typing.get_type_hints(getattr(factory, "__init__", factory))
    except Exception:  # unresolvable annotations: fall back to the defaults' types
        hints = {}
    parameters = inspect.signature(factory).parameters
    typed: dict[str, Any] = {}
    for name, value in raw.items():
        parameter = parameters.get(name)
        default = parameter.default if parameter is not None else None
        typed[name] = _convert(value, hints.get(name), default, flag.format(name=name))
    return typed


__all__ = ["parse_bool", "parse_value", "parse_variables", "split_pairs", "typed_options"]
