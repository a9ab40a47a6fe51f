"""Helpers for testing plugins in isolation.

A plugin author's test builds a fresh manager holding only the plugins it names, so that the
result does not depend on what else happens to be installed::

    from sft_plugins.testing import plugin_manager
    import my_plugin

    def test_registers_my_template():
        manager = plugin_manager(my_plugin)
        assert manager.templates.get("my-chat").eos_token == "<|end|>"

Add ``with_first_party=True`` to check the plugin alongside the built-in ones (for example, that
its names do not clash with them).
"""

from __future__ import annotations

from sft_plugins.manager import DEFAULT_PLUGINS, PluginManager, get_plugin_manager


def plugin_manager(*plugins: object | str, with_first_party: bool = False,
                   trace: bool = False) -> PluginManager:
    """A fresh manager with exactly ``plugins`` (modules, objects or module names).

    Entry points are not loaded and ``SFT_PLUGINS_DISABLE`` is ignored, so the manager is the
    same on every machine. Registration errors raise, naming the plugin.
    """
    first_party: tuple[object | str, ...] = DEFAULT_PLUGINS if with_first_party else ()
    return get_plugin_manager(plugins=(*first_party, *plugins), load_entry_points=False,
                              disabled=(), trace=trace)


__all__ = ["plugin_manager"]
