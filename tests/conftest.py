"""Shared fixtures: making real (entry-point carrying) distributions without pip."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DistributionMaker = Callable[..., Path]


def write_distribution(root: Path, name: str, modules: dict[str, str],
                       entry_points: dict[str, str], version: str = "0.1.0") -> Path:
    """Lay out ``root`` as a site directory holding one installed distribution.

    ``modules`` maps a module file path (``pkg/__init__.py``) to its source; ``entry_points``
    maps entry-point names of the ``sft_plugins`` group to ``module:attr`` targets. The
    ``*.dist-info`` folder is what pip writes, so ``importlib.metadata`` finds it exactly as
    it finds an installed package.
    """
    for relative, source in modules.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    dist_info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = ["[sft_plugins]", *(f"{k} = {v}" for k, v in entry_points.items())]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def site_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on ``sys.path`` (and ``PYTHONPATH`` for subprocesses) to install into."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.delenv("SFT_PLUGINS_DISABLE", raising=False)
    monkeypatch.delenv("SFT_PLUGINS_TRACE", raising=False)
    before = set(sys.modules)
    yield site
    for module in set(sys.modules) - before:  # let the next test import its own copies
        del sys.modules[module]
    importlib.invalidate_caches()


@pytest.fixture
def install(site_dir: Path) -> DistributionMaker:
    """Install a distribution into ``site_dir``: ``install(name, modules, entry_points)``."""

    def _install(name: str, modules: dict[str, str], entry_points: dict[str, str]) -> Path:
        write_distribution(site_dir, name, modules, entry_points)
        importlib.invalidate_caches()
        return site_dir

    return _install
