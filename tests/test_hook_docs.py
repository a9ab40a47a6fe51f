"""Every hook is documented (docstring and docs page) and exercised by a test.

A hook added without a reference entry or a test fails here, which is how the docs stay whole.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from sft_plugins import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(
    name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if hasattr(fn, "sft_plugins_spec")
)


def test_there_are_hooks():
    assert {"register_chat_templates", "register_collators", "register_perturbers",
            "select_chat_template"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_reference_docstring_with_an_example(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert len(doc.splitlines()) >= 5, f"{hook}: the docstring is its reference; say more"
    assert "Example::" in doc, f"{hook}: show a runnable example in the docstring"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_section_in_the_plugin_guide(hook):
    guide = (ROOT / "docs" / "plugins.md").read_text()
    assert re.search(rf"^#+ `{hook}`", guide, re.MULTILINE), f"docs/plugins.md: no `{hook}`"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_implemented_by_some_test(hook):
    here = Path(__file__).name
    users = [p.name for p in (ROOT / "tests").glob("test_*.py")
             if p.name != here and re.search(rf"def {hook}\(", p.read_text())]
    assert users, f"no test implements {hook}"
