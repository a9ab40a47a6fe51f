"""The plugin host: loading order, entry points, disabling, broken plugins, tracing."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sft_plugins import get_plugin_manager, hookimpl
from sft_plugins.errors import DuplicateNameError, PluginLoadError, UnknownNameError
from sft_plugins.manager import DEFAULT_PLUGINS
from sft_plugins.testing import plugin_manager


@dataclass(frozen=True)
class Item:
    name: str
    description: str = "an item"
    aliases: tuple[str, ...] = ()


class FirstParty:
    """Stands in for a built-in plugin that recognises every tokenizer as 'builtin-chat'."""

    @hookimpl
    def register_chat_templates(self, register):
        register(Item("builtin-chat", "the built-in answer"))

    @hookimpl
    def select_chat_template(self, tokenizer, chat_template):
        return "builtin-chat"


THIRD_PARTY = {
    "acme_sft/__init__.py": """
        from dataclasses import dataclass
        from sft_plugins import hookimpl

        @dataclass(frozen=True)
        class Item:
            name: str
            description: str
            aliases: tuple = ()

        @hookimpl
        def register_chat_templates(register):
            register(Item("acme-chat", "Acme's chat format", ("acme",)))

        @hookimpl
        def register_perturbers(register):
            register(Item("acme-noise", "Acme's noise"))

        @hookimpl
        def select_chat_template(tokenizer, chat_template):
            return "acme-chat" if chat_template and "<acme>" in chat_template else None
    """,
}


class Tok:
    def __init__(self, chat_template):
        self.chat_template = chat_template


def test_default_manager_registers_first_party_plugins_in_order():
    manager = get_plugin_manager(load_entry_points=False, disabled=())
    assert manager.plugin_names() == list(DEFAULT_PLUGINS)
    assert manager.errors == []


def test_entry_point_plugin_is_discovered_and_attributed(install):
    install("acme-sft", THIRD_PARTY, {"acme": "acme_sft"})
    manager = get_plugin_manager(plugins=[FirstParty()])
    entry = manager.templates.entry("ACME")  # alias, any case
    assert (entry.name, entry.plugin) == ("acme-chat", "acme")
    assert manager.perturbers.entry("acme-noise").plugin == "acme"
    assert manager.distributions == {"acme": "acme-sft"}


def test_third_party_selection_is_asked_before_first_party(install):
    install("acme-sft", THIRD_PARTY, {"acme": "acme_sft"})
    manager = get_plugin_manager(plugins=[FirstParty()])
    assert manager.select_chat_template(Tok("<acme>{{ x }}")).name == "acme-chat"
    # The third party passes (returns None), so the first party answers.
    assert manager.select_chat_template(Tok("other")).name == "builtin-chat"
    assert manager.select_chat_template(Tok({"default": "<acme>"})).name == "acme-chat"


@pytest.mark.parametrize("how", ["entry point", "distribution"])
def test_disable_blocks_before_import(install, monkeypatch, how):
    broken_on_import = {"acme_sft/__init__.py": "raise RuntimeError('must not be imported')"}
    install("acme-sft", broken_on_import, {"acme": "acme_sft"})
    monkeypatch.setenv("SFT_PLUGINS_DISABLE", "acme" if how == "entry point" else "acme-sft")
    manager = get_plugin_manager()
    assert manager.errors == []
    assert "acme" not in manager.plugin_names()
    assert manager.pm.is_blocked("acme")


def test_disable_a_first_party_plugin(monkeypatch):
    monkeypatch.setenv("SFT_PLUGINS_DISABLE", " sft_plugins_perturbers ,")
    manager = get_plugin_manager(load_entry_points=False)
    assert "sft_plugins_perturbers" not in manager.plugin_names()
    assert len(manager.perturbers) == 0


def test_plugin_failing_to_import_is_reported_not_fatal(install):
    install("broken-sft", {"broken_sft.py": "import no_such_module_anywhere\n"},
            {"broken": "broken_sft"})
    manager = get_plugin_manager(plugins=[FirstParty()])
    [error] = manager.errors
    assert (error.plugin, error.distribution) == ("broken", "broken-sft")
    message = str(error)
    assert "ModuleNotFoundError" in message and "no_such_module_anywhere" in message
    assert "SFT_PLUGINS_DISABLE=broken" in message
    assert manager.templates.get("builtin-chat").name == "builtin-chat"
    with pytest.raises(UnknownNameError) as excinfo:
        manager.templates.get("broken-chat")
    assert "'broken'" in str(excinfo.value) and "SFT_PLUGINS_DISABLE=broken" in str(excinfo.value)


def test_plugin_raising_while_registering_is_reported_not_fatal(install):
    source = """
        from sft_plugins import hookimpl

        @hookimpl
        def register_collators(register):
            raise ValueError("config file missing")
    """
    install("flaky-sft", {"flaky_sft.py": source}, {"flaky": "flaky_sft"})
    manager = get_plugin_manager(plugins=[])
    [error] = manager.errors
    assert "ValueError: config file missing in register_collators" in str(error)
    assert error.distribution == "flaky-sft"


def test_plugin_with_misspelled_hook_is_reported(install):
    source = """
        from sft_plugins import hookimpl

        @hookimpl
        def register_templates(register):
            pass
    """
    install("typo-sft", {"typo_sft.py": source}, {"typo": "typo_sft"})
    manager = get_plugin_manager(plugins=[])
    [error] = manager.errors
    assert "register_templates" in str(error)
    assert "typo" not in manager.plugin_names()


def test_plugin_registering_an_item_without_name_is_reported(install):
    source = """
        from sft_plugins import hookimpl

        @hookimpl
        def register_perturbers(register):
            register(object())
    """
    install("nameless-sft", {"nameless_sft.py": source}, {"nameless": "nameless_sft"})
    [error] = get_plugin_manager(plugins=[]).errors
    assert "no non-empty string attribute 'name'" in str(error)


def test_first_party_failure_raises_instead_of_hiding():
    class Bad:
        @hookimpl
        def register_perturbers(self, register):
            raise RuntimeError("bug")

    with pytest.raises(PluginLoadError, match="RuntimeError: bug"):
        plugin_manager(Bad())


def test_duplicate_name_from_entry_point_is_listed_naming_both_plugins(install):
    """A third-party plugin that takes a name already registered is a broken plugin, listed
    like one that fails to import: the manager (and so `sft-plugins list`) still works."""
    source = """
        from dataclasses import dataclass
        from sft_plugins import hookimpl

        @dataclass(frozen=True)
        class Item:
            name: str
            description: str = ""
            aliases: tuple = ()

        @hookimpl
        def register_chat_templates(register):
            register(Item("copycat", aliases=("Builtin-Chat",)))
    """
    install("copy-sft", {"copy_sft.py": source}, {"copy": "copy_sft"})
    manager = get_plugin_manager(plugins=[FirstParty()])
    [error] = manager.errors
    message = str(error)
    assert isinstance(error.cause, DuplicateNameError)
    assert "'builtin-chat'" in message  # the alias clashes case-insensitively
    assert "plugin 'FirstParty'" in message and "plugin 'copy'" in message
    assert "copy-sft" in message and "SFT_PLUGINS_DISABLE=copy" in message
    assert manager.templates.get("builtin-chat").name == "builtin-chat"


def test_trace_prints_every_hook_call(capsys):
    manager = plugin_manager(FirstParty(), trace=True)
    manager.select_chat_template(Tok("anything"))
    err = capsys.readouterr().err
    assert "register_chat_templates" in err and "'builtin-chat'" in err
    assert "select_chat_template" in err


def test_trace_from_environment(monkeypatch, capsys):
    monkeypatch.setenv("SFT_PLUGINS_TRACE", "1")
    get_plugin_manager(plugins=[FirstParty()], load_entry_points=False)
    assert "register_chat_templates" in capsys.readouterr().err
    monkeypatch.setenv("SFT_PLUGINS_TRACE", "0")
    get_plugin_manager(plugins=[FirstParty()], load_entry_points=False)
    assert capsys.readouterr().err == ""


def test_testing_manager_ignores_installed_and_disabled_plugins(install, monkeypatch):
    install("acme-sft", THIRD_PARTY, {"acme": "acme_sft"})
    monkeypatch.setenv("SFT_PLUGINS_DISABLE", "FirstParty")
    manager = plugin_manager(FirstParty())
    assert "acme-chat" not in manager.templates
    assert "builtin-chat" in manager.templates
    both = plugin_manager(FirstParty(), with_first_party=True)
    assert both.plugin_names()[: len(DEFAULT_PLUGINS)] == list(DEFAULT_PLUGINS)


def test_each_call_builds_a_fresh_manager():
    assert get_plugin_manager(load_entry_points=False) is not get_plugin_manager(
        load_entry_points=False)


def test_resolve_template_named_detected_own_or_none():
    from transformers import AutoTokenizer

    from sft_plugins.assets import LLAMA3_TOKENIZER_DIR

    manager = get_plugin_manager(load_entry_points=False)
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    assert manager.resolve_template(None, tokenizer) is None  # no template: plain text only
    assert manager.resolve_template("llama-3.3", tokenizer).name == "llama-3.1"
    manager.templates.get("llama-3.1").configure_tokenizer(tokenizer)
    assert manager.resolve_template(None, tokenizer).name == "llama-3.1"
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    own = manager.resolve_template(None, tokenizer)
    assert own.render([{"role": "user", "content": "hi"}]).text == "hi\n"


# ------------------------------------------------------------------ hostile plugins --------


def test_a_plugin_that_exits_on_import_is_listed_not_fatal(install):
    install("exit-sft", {"exit_sft.py": "import sys\nsys.exit(3)\n"}, {"exiter": "exit_sft"})
    manager = get_plugin_manager(plugins=[FirstParty()])
    [error] = manager.errors
    assert "plugin 'exiter'" in str(error) and "SystemExit: 3" in str(error)


@pytest.mark.parametrize(("body", "expected"), [
    ("return 1 / 0", "raised ZeroDivisionError: division by zero in select_chat_template"),
    ("return 42", "returned 42 from select_chat_template, which must return a registered "
                  "template name or None"),
    ("return 'no-such-template'", "returned 'no-such-template' from select_chat_template"),
])
def test_a_selection_hook_that_fails_is_an_error_naming_the_plugin(install, body, expected):
    source = f"""
        from sft_plugins import hookimpl

        @hookimpl
        def select_chat_template(tokenizer, chat_template):
            {body}
    """
    install("pick-sft", {"pick_sft.py": source}, {"picker": "pick_sft"})
    manager = get_plugin_manager(plugins=[FirstParty()])
    with pytest.raises(PluginLoadError) as excinfo:
        manager.select_chat_template(Tok("anything"))
    message = str(excinfo.value)
    assert expected in message
    assert "plugin 'picker' (entry point 'picker' from distribution 'pick-sft')" in message


def test_a_plugin_class_that_raises_when_built_names_the_plugin():
    class Broken:
        name = "broken"
        description = "raises when built"
        aliases = ()

        def __init__(self, size: int = 1) -> None:
            raise RuntimeError("out of cheese")

    class Plugin:
        @hookimpl
        def register_collators(self, register):
            register(Broken)

    manager = plugin_manager(Plugin())
    with pytest.raises(PluginLoadError, match=r"plugin 'Plugin' raised RuntimeError: out of "
                                              r"cheese when building collator 'broken' with "
                                              r"options \{'size': 2\}"):
        manager.collators.create("broken", size=2)
