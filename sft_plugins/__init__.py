"""sft-plugins: supervised fine-tuning with pluggable chat templates, loss masks and noise.

Plugin authors import :data:`hookimpl` and implement the hooks documented in
:mod:`sft_plugins.hookspecs`; users call :func:`get_plugin_manager` (or the ``sft-plugins``
command) to see and use what is registered.
"""

from __future__ import annotations

from sft_plugins._version import __version__
from sft_plugins.hookspecs import PROJECT_NAME, hookimpl
from sft_plugins.manager import PluginManager, get_plugin_manager

__all__ = ["PROJECT_NAME", "PluginManager", "__version__", "get_plugin_manager", "hookimpl"]
