"""sft-plugins: supervised fine-tuning with pluggable chat templates, loss masks and noise.

Plugin authors import :data:`hookimpl` and implement the hooks documented in
:mod:`sft_plugins.hookspecs`; users call :func:`get_plugin_manager` (or the ``sft-plugins``
command) to see and use what is registered.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import pluggy

PROJECT_NAME = "sft_plugins"
"""The pluggy project name, which is also the entry-point group third-party plugins use."""

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Decorator that marks a function in a plugin module as the implementation of a hook."""

try:
    __version__ = version("sft-plugins")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from sft_plugins.manager import PluginManager, get_plugin_manager  # noqa: E402

__all__ = ["PROJECT_NAME", "PluginManager", "__version__", "get_plugin_manager", "hookimpl"]
