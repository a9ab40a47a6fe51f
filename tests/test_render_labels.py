"""``render --collator NAME`` shows exactly what training trains: for generated conversations and
every registered collator, the ``input_ids``/``labels``/``loss_weights`` that ``render --json``
prints equal the rows the trainer's preparation (``load_sft_dataset`` then ``collator.prepare``)
makes of the same file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_masking_properties import conversations
from transformers import AutoTokenizer

from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.cli import main
from sft_plugins.data import load_sft_dataset
from sft_plugins.loss import WEIGHTS_KEY
from sft_plugins.options import typed_options
from sft_plugins.testing import plugin_manager

MANAGER = plugin_manager("sft_plugins_templates", "sft_plugins_collators")
OPTIONS = {
    "prompt-weighted": {"prompt_loss_weight": "0.25"},
    "response-template": {"response_template": "<|start_header_id|>assistant<|end_header_id|>"},
}
"""Options a collator needs, or that make its labels differ from its neighbours' (fractional
weights), as text, the way the command line takes them."""
PROMPT_COMPLETION = ("completion-only",)
"""Collators that train only prompt/completion data: the other collators get either format."""


def collator_names() -> list[str]:
    return MANAGER.collators.names()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped tokenizer with the llama-3.1 template installed, so render detects it."""
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    MANAGER.templates.get("llama-3.1").configure_tokenizer(tokenizer)
    path = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(path)
    return path


def options_as_flags(collator: str) -> list[str]:
    return [flag for name, value in OPTIONS.get(collator, {}).items()
            for flag in ("-c", f"{name}={value}")]


def rendered(path: Path, tokenizer_dir: Path, collator: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(main, ["render", str(path), "--tokenizer", str(tokenizer_dir),
                                       "--collator", collator, *options_as_flags(collator),
                                       "--json"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


def prepared(path: Path, tokenizer_dir: Path, collator: str) -> list[dict[str, Any]]:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    template = MANAGER.resolve_template(None, tokenizer)
    options = typed_options(MANAGER.collators.get(collator), OPTIONS.get(collator, {}), "")
    instance = MANAGER.collators.create(collator, **options)
    data = load_sft_dataset(str(path), template=template)
    return list(instance.prepare(data.train, tokenizer, template, desc=None).dataset)


@pytest.mark.parametrize("collator", collator_names())
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(chats=st.lists(conversations(), min_size=1, max_size=4), split=st.booleans())
def test_render_labels_are_the_prepared_labels(chats: list[list[dict[str, str]]], split: bool,
                                               collator: str, tokenizer_dir: Path,
                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    """``split``: the file holds prompt/completion rows (the last assistant message is the
    completion) instead of whole conversations."""
    rows = ([{"prompt": m[:-1], "completion": m[-1:]} for m in chats]
            if split or collator in PROMPT_COMPLETION else [{"messages": m} for m in chats])
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    shown = rendered(path, tokenizer_dir, collator)
    trained = prepared(path, tokenizer_dir, collator)
    assert len(shown) == len(trained) == len(chats)
    for view, row in zip(shown, trained, strict=True):
        assert view["input_ids"] == row["input_ids"]
        assert view["labels"] == row["labels"]
        if WEIGHTS_KEY in row:
            assert view.get(WEIGHTS_KEY) == pytest.approx(row[WEIGHTS_KEY])
        else:
            assert WEIGHTS_KEY not in view or all(w in (0, 1) for w in view[WEIGHTS_KEY])


def test_collators_differ_in_what_render_shows(tokenizer_dir: Path, tmp_path: Path) -> None:
    """The property above would hold vacuously if render ignored --collator: it does not."""
    path = tmp_path / "two-turns.jsonl"
    path.write_text(json.dumps({"messages": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}) + "\n")
    every = rendered(path, tokenizer_dir, "assistant-only")[0]
    last = rendered(path, tokenizer_dir, "last-turn")[0]
    weighted = rendered(path, tokenizer_dir, "prompt-weighted")[0]
    trained = sum(label != -100 for label in every["labels"])
    assert 0 < sum(label != -100 for label in last["labels"]) < trained
    assert sum(label != -100 for label in weighted["labels"]) > trained
    assert any(0 < w < 1 for w in weighted[WEIGHTS_KEY])


def test_collator_without_tokenizer_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}) + "\n")
    result = CliRunner().invoke(main, ["render", str(path), "--template", "llama-3.1",
                                       "--collator", "last-turn"])
    assert result.exit_code == 2
    assert "--collator" in result.output and "--tokenizer" in result.output
    assert "Traceback" not in result.output
