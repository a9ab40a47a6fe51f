"""Preparation is cached: a second run with the same data, template, collator, options, tokenizer
and package version labels nothing again (also in another process), any change to one of them
prepares again, and a damaged cache file is never trusted."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets.config
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

import sft_plugins.masking.preparation as preparation
from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.cache_files import is_whole
from sft_plugins.data import load_sft_dataset
from sft_plugins.testing import plugin_manager

MANAGER = plugin_manager("sft_plugins_templates", "sft_plugins_collators")
ROWS = [{"messages": [{"role": "user", "content": f"Sort the letters: {w}"},
                      {"role": "assistant", "content": " ".join(sorted(w.split()))}]}
        for w in ("c a b", "q p r", "z x y", "m k l", "f d e", "j h i") * 50]


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A data file, a cache directory of its own, and a count of the rows labelled."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    labelled: list[int] = []
    original = preparation.label_rows

    def counting(collator: Any, rows: Any, *args: Any) -> Any:
        labelled.append(len(rows))
        return original(collator, rows, *args)

    monkeypatch.setattr(preparation, "label_rows", counting)
    return {"data": data, "cache": tmp_path / "cache", "labelled": labelled}


def prepare(setup: dict[str, Any], *, template: str = "llama-3.1",
            variables: dict[str, Any] | None = None, collator: str = "assistant-only",
            options: dict[str, Any] | None = None, tokenizer: Any = None
            ) -> tuple[int, list, list[str]]:
    """(rows labelled, prepared rows, the cache files they come from) of one preparation, as a
    run does it."""
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    chosen = MANAGER.resolve_template(template, tokenizer, variables)
    data = load_sft_dataset(str(setup["data"]), template=chosen)
    before = sum(setup["labelled"])
    prepared = MANAGER.collators.create(collator, **(options or {})).prepare(
        data.train, tokenizer, chosen, desc=None, batch_size=100)  # several record batches
    return (sum(setup["labelled"]) - before, prepared.dataset.to_list(),
            [f["filename"] for f in prepared.dataset.cache_files])


def test_the_same_inputs_label_nothing_again(setup: dict[str, Any]) -> None:
    cold, rows, _ = prepare(setup)
    warm, again, _ = prepare(setup)
    assert cold == len(ROWS) and warm == 0
    assert again == rows


def _edit_data(setup: dict[str, Any]) -> dict[str, Any]:
    with setup["data"].open("a") as handle:
        handle.write(json.dumps(ROWS[0]) + "\n")
    return {}


def _added_token() -> Any:
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|new_token|>"]})
    return tokenizer


CHANGES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "data file": _edit_data,
    "template variables": lambda s: {"variables": {"omit_knowledge_date": True}},
    "template": lambda s: {"template": "llama-3.2"},
    "collator": lambda s: {"collator": "last-turn"},
    "collator option": lambda s: {"options": {"literal_special_tokens": False}},
    "max_length": lambda s: {"options": {"max_length": 40}},
    "tokenizer": lambda s: {"tokenizer": _added_token()},
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_change_prepares_again(setup: dict[str, Any], change: str) -> None:
    prepare(setup)
    assert prepare(setup)[0] == 0
    labelled, _, _ = prepare(setup, **CHANGES[change](setup))
    assert labelled > 0, f"a changed {change} reused the cache"


def test_another_package_version_prepares_again(setup: dict[str, Any],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import sft_plugins._version

    prepare(setup)
    monkeypatch.setattr(sft_plugins._version, "__version__", "999.0")
    assert prepare(setup)[0] > 0


def test_the_code_fingerprint_follows_the_files_that_define_functions_and_classes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a template's checks (functions) and a collator (an object) add to the key."""
    import importlib

    from sft_plugins._version import code_fingerprint

    module = tmp_path / "a_check.py"
    module.write_text("def check(messages, tools):\n    pass\n\n\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import a_check

    before = code_fingerprint(a_check.check), code_fingerprint(a_check.Thing())
    assert before == (code_fingerprint(a_check.check), code_fingerprint(a_check.Thing()))
    assert code_fingerprint() not in before and code_fingerprint(1) == code_fingerprint()
    module.write_text(module.read_text() + "# edited\n")
    importlib.reload(a_check)
    after = code_fingerprint(a_check.check), code_fingerprint(a_check.Thing())
    assert after[0] != before[0] and after[1] != before[1]


PLUGIN = """
from sft_plugins.masking import MaskingCollator, WeightedSpan, Weighting


class Edited(MaskingCollator):
    name = "edited"

    def weigh(self, example):
        return Weighting(tuple(WeightedSpan(a, b) for a, b in example.assistant_spans),
                         background={background})
"""


def test_a_collator_whose_code_changed_prepares_again(setup: dict[str, Any], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin being written keeps its name, options and version while its code changes: its
    source is in the cache key, not only its version."""
    import importlib

    module = tmp_path / "edited_collator.py"
    module.write_text(PLUGIN.format(background=0.0))
    monkeypatch.syspath_prepend(str(tmp_path))
    import edited_collator

    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    template = MANAGER.resolve_template("llama-3.1", tokenizer)
    data = load_sft_dataset(str(setup["data"]), template=template).train

    def labelled() -> tuple[int, list[Any]]:
        before = sum(setup["labelled"])
        prepared = edited_collator.Edited().prepare(data, tokenizer, template, desc=None)
        return sum(setup["labelled"]) - before, prepared.dataset["labels"]

    cold, assistant_only = labelled()
    assert cold == len(ROWS) and labelled() == (0, assistant_only)
    module.write_text(PLUGIN.format(background=1.0))  # every token trained
    importlib.reload(edited_collator)
    changed, every_token = labelled()
    assert changed == len(ROWS), "the edited collator's labels came from the cache"
    assert every_token != assistant_only and -100 not in every_token[0]


def _cache_files(setup: dict[str, Any]) -> list[Path]:
    """The files ``datasets.map``/``filter`` wrote (not the copy of the data file, whose
    rewrite would change every later fingerprint and so hide a damaged later file)."""
    return sorted(setup["cache"].rglob("cache-*.arrow"))


def _batch_boundaries(data: bytes) -> list[int]:
    """Where the schema and each record batch of an Arrow stream end."""
    source = pa.BufferReader(data)
    reader = pa.ipc.open_stream(source)
    ends = [source.tell()]
    for _ in reader:
        ends.append(source.tell())
    return ends


DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "cut at a batch boundary": lambda data: data[:_batch_boundaries(data)[-2]],
    "cut in half": lambda data: data[:len(data) // 2],
    "garbage": lambda data: b"\x00" * len(data),
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_cache_file_is_never_trusted(setup: dict[str, Any], damage: str) -> None:
    _, rows, _ = prepare(setup)
    files = _cache_files(setup)
    assert files and all(is_whole(f) for f in files)
    for file in files:
        file.write_bytes(DAMAGES[damage](file.read_bytes()))
    assert not any(is_whole(f) for f in files)
    labelled, again, used = prepare(setup)
    assert labelled == len(ROWS) and again == rows
    assert used and all(is_whole(f) for f in used)


SCRIPT = """
import json, sys
import sft_plugins.masking.preparation as preparation
from transformers import AutoTokenizer
from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.data import load_sft_dataset
from sft_plugins.testing import plugin_manager

labelled = []
original = preparation.label_rows
preparation.label_rows = lambda c, rows, *a: labelled.append(len(rows)) or original(c, rows, *a)
manager = plugin_manager("sft_plugins_templates", "sft_plugins_collators")
tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
template = manager.resolve_template("llama-3.1", tokenizer)
data = load_sft_dataset(sys.argv[1], template=template)
prepared = manager.collators.create("assistant-only").prepare(data.train, tokenizer, template)
print(json.dumps({"labelled": sum(labelled), "rows": len(prepared.dataset)}))
"""


def test_a_second_process_reuses_the_cache(setup: dict[str, Any], tmp_path: Path) -> None:
    """What a second run, or another rank, does: every process must compute the same cache
    key (an unordered set in the key once made each process miss the other's cache)."""
    env = {"HF_DATASETS_CACHE": str(setup["cache"]), "PATH": "/usr/bin:/bin"}
    runs = [json.loads(subprocess.run(
        [sys.executable, "-c", SCRIPT, str(setup["data"])], env=env, check=True,
        capture_output=True, text=True, timeout=300).stdout.splitlines()[-1])
        for _ in range(2)]
    assert runs[0] == {"labelled": len(ROWS), "rows": len(ROWS)}
    assert runs[1] == {"labelled": 0, "rows": len(ROWS)}
