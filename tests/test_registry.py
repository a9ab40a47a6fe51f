"""Registries: case-insensitive names and aliases, duplicates, suggestions, options."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sft_plugins.errors import DuplicateNameError, PluginOptionError, UnknownNameError
from sft_plugins.registry import Registry


@dataclass(frozen=True)
class Item:
    name: str
    description: str = ""
    aliases: tuple[str, ...] = ()


class Noise:
    name = "noise"
    aliases = ("hiss",)
    description = "Adds noise.\n\nMore text that is not shown in listings."

    def __init__(self, alpha: float = 5.0, *, schedule: str = "constant") -> None:
        self.alpha, self.schedule = alpha, schedule


NAME_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._ß"
names = st.text(st.sampled_from(NAME_CHARACTERS), min_size=1, max_size=20)


@given(name=names, aliases=st.lists(names, max_size=3))
def test_found_by_name_or_alias_in_any_case(name, aliases):
    keys = {n.casefold() for n in (name, *aliases)}
    registry: Registry[Item] = Registry("thing")
    item = Item(name, aliases=tuple(a for a in aliases if a.casefold() != name.casefold()))
    if len({a.casefold() for a in item.aliases}) < len(item.aliases):
        item = Item(name)
        keys = {name.casefold()}
    registry.add(item, "p")
    for key in keys:
        assert registry.get(key.upper()) is item
        assert registry.get(key.casefold()) is item
    assert registry.names() == [name]


@given(name=names)
def test_same_name_in_other_case_is_a_duplicate(name):
    registry: Registry[Item] = Registry("thing")
    registry.add(Item(name), "first-plugin")
    with pytest.raises(DuplicateNameError, match=r"first-plugin.*second-plugin"):
        registry.add(Item(name.swapcase(), aliases=()), "second-plugin")


def test_alias_clashing_with_a_name_is_a_duplicate_and_changes_nothing():
    registry: Registry[Item] = Registry("thing")
    registry.add(Item("a"), "one")
    with pytest.raises(DuplicateNameError):
        registry.add(Item("b", aliases=("A",)), "two")
    assert "b" not in registry and registry.names() == ["a"]


def test_unknown_name_suggests_the_closest_and_lists_all():
    registry: Registry[Item] = Registry("perturber")
    for name in ("neftune", "gaussian", "symnoise"):
        registry.add(Item(name), "p")
    with pytest.raises(UnknownNameError) as excinfo:
        registry.get("neftun")
    message = str(excinfo.value)
    assert "unknown perturber 'neftun'" in message
    assert "Did you mean 'neftune'?" in message
    assert "Available: gaussian, neftune, symnoise." in message


def test_listing_shows_the_first_line_of_the_description():
    registry: Registry[type[Noise]] = Registry("perturber")
    entry = registry.add(Noise, "p")
    assert entry.description == "Adds noise."
    assert [e.name for e in registry] == ["noise"] and len(registry) == 1


def test_create_passes_options_and_rejects_unknown_ones():
    registry: Registry[type[Noise]] = Registry("perturber")
    registry.add(Noise, "noisy")
    noise = registry.create("HISS", alpha=2.0, schedule="linear")
    assert (noise.alpha, noise.schedule) == (2.0, "linear")
    with pytest.raises(PluginOptionError) as excinfo:
        registry.create("noise", alpah=1.0)
    message = str(excinfo.value)
    assert "perturber 'noise' (plugin 'noisy') has no option 'alpah'" in message
    assert "Accepted: alpha, schedule" in message


@pytest.mark.parametrize("bad", [Item(""), Item("  "), Item("x", aliases=("",)),
                                 Item("x", description=3)])  # type: ignore[arg-type]
def test_malformed_items_are_rejected(bad):
    with pytest.raises(TypeError):
        Registry("thing").add(bad, "p")
