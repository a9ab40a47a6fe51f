"""The package's imports run one way, as docs/architecture.md draws them.

The layer table of docs/architecture.md is read here: every module of ``sft_plugins`` must be
in exactly one layer, and may import only modules of its own layer or of layers below it (imports
under ``if TYPE_CHECKING:`` are annotations, not dependencies, and do not count). No module may
be part of an import cycle, and nothing below the command line prints: the library returns
results and the command line shows them. A module added without a row, or an import that runs
back up, fails here, which is how the map stays true.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sft_plugins"
MAP = ROOT / "docs" / "architecture.md"
COMMAND_LINE = "command line"


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


MODULES = module_names()


def layers() -> list[tuple[str, list[str]]]:
    """``(layer name, module patterns)`` from the table under "## Layers", bottom first."""
    text = MAP.read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].isdigit():
            continue
        rows.append((int(cells[0]), cells[1], re.findall(r"`(sft_plugins[\w.*]*)`", cells[2])))
    rows.sort()
    return [(name, patterns) for _, name, patterns in rows]


LAYERS = layers()


def layer_of(module: str) -> int:
    found = [i for i, (_, patterns) in enumerate(LAYERS)
             if any(fnmatch.fnmatchcase(module, p) for p in patterns)]
    assert len(found) == 1, (f"{module} is in {len(found)} layers of docs/architecture.md; "
                             "put it in exactly one")
    return found[0]


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Modules of the package that ``module`` imports (at module level or inside functions)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(_known(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: len(module.split(".")) - node.level
                                         + (1 if is_package else 0)]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(_known(submodule if submodule in MODULES else base))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m and m != module}


def _known(name: str) -> str:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


GRAPH = {m: _imports(ast.parse(p.read_text()), m, p.name == "__init__.py")
         for m, p in MODULES.items()}


def test_the_map_has_layers_and_a_command_line_on_top():
    assert len(LAYERS) >= 5
    assert LAYERS[-1][0] == COMMAND_LINE


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_import_runs_down_or_across(module):
    mine = layer_of(module)
    upward = sorted(t for t in GRAPH[module] if layer_of(t) > mine)
    assert not upward, (f"{module} ({LAYERS[mine][0]}) imports {', '.join(upward)} from a layer "
                        "above it; move the shared piece down, or pass a value in")


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in GRAPH:
        if v not in index:
            connect(v)
    assert not cycles, f"import cycles: {cycles}"


LIBRARY = sorted(m for m in MODULES  # a module missing from the map fails the test above
                 if not any(fnmatch.fnmatchcase(m, p) for p in LAYERS[-1][1]))


@pytest.mark.parametrize("module", LIBRARY)
def test_the_library_does_not_print(module):
    tree = ast.parse(MODULES[module].read_text())
    printing = [f"line {n.lineno}" for n in ast.walk(tree)
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                and n.func.id == "print"]
    consoles = [f"line {n.lineno}" for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("rich")]
    assert not printing and not consoles, (
        f"{module} prints ({', '.join(printing + consoles)}); return the result or log it, and "
        "let the command line show it")


def test_the_checker_sees_an_upward_import(tmp_path):
    """The test above can fail: a library module importing the command line is caught."""
    tree = ast.parse("from sft_plugins.commands.train import parse\n")
    imported = _imports(tree, "sft_plugins.masking", True)
    assert "sft_plugins.commands.train" in imported
    assert layer_of("sft_plugins.commands.train") > layer_of("sft_plugins.masking")
    typing_only = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                            "    from sft_plugins.trainer import SFTPluginTrainer\n")
    assert _imports(typing_only, "sft_plugins.masking", True) == set()
