"""Validation with the registered chat templates, and rendering of prepared rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sft_plugins import get_plugin_manager
from sft_plugins.data import load_sft_dataset, messages_from_row, tools_from_row
from sft_plugins.errors import DataError


@pytest.fixture(scope="module")
def templates() -> Any:
    return get_plugin_manager().templates


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
TWO_SYSTEMS = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                            {"role": "system", "content": "again"},
                            {"role": "assistant", "content": "A"}]}
TOOL_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
        {"role": "tool", "content": "-3"},
        {"role": "assistant", "content": "It is -3 degrees."}],
    "tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"type": "string"}}}}}],
}


def test_llama_rules_name_the_line_and_message(tmp_path: Path, templates: Any) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, TWO_SYSTEMS])
    with pytest.raises(DataError, match=r"train\.jsonl:2: field 'messages\[2\]': llama-3\.1: "
                                        "message 2: a system message"):
        load_sft_dataset(path, template=templates.get("llama-3.1"), cache_dir=str(tmp_path))
    data = load_sft_dataset(path, template=templates.get("llama-3.1"), on_bad_example="skip",
                            cache_dir=str(tmp_path))
    assert data.summary.splits[0].skipped == {"template llama-3.1: system-not-first": 1}


def test_alternation_in_sharegpt_names_the_sharegpt_field(tmp_path: Path, templates: Any) -> None:
    rows = [{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                               {"from": "gpt", "value": "c"}]}]
    path = write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    with pytest.raises(DataError, match=r"sharegpt\.jsonl:1: field 'conversations\[1\]': "
                                        "gemma-3: message 1: roles must alternate"):
        load_sft_dataset(path, template=templates.get("gemma-3"), cache_dir=str(tmp_path))


def test_tools_need_a_template_that_has_them(tmp_path: Path, templates: Any) -> None:
    path = write_jsonl(tmp_path / "tools.jsonl", [TOOL_ROW])
    assert len(load_sft_dataset(path, template=templates.get("llama-3.1"),
                                cache_dir=str(tmp_path)).train) == 1
    with pytest.raises(DataError, match=r"tools\.jsonl:1: chatml: this template cannot express "
                                        "tools"):
        load_sft_dataset(path, template=templates.get("chatml"), cache_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["llama-3.1", "qwen2.5"])
def test_prepared_rows_render_exactly_like_the_source(tmp_path: Path, templates: Any,
                                                      name: str) -> None:
    """Canonical form is lossless: rendering a prepared row gives the text of the source row."""
    template = templates.get(name)
    source = [TOOL_ROW, GOOD]
    data = load_sft_dataset(write_jsonl(tmp_path / "rows.jsonl", source), template=template,
                            cache_dir=str(tmp_path))
    for row, original in zip(data.train, source, strict=True):
        expected = json.loads(json.dumps(original["messages"]))
        for message in expected:  # the one normalisation: arguments decoded, content ""
            for call in message.get("tool_calls") or ():
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
            if message["content"] is None:
                message["content"] = ""
        assert (template.render(messages_from_row(row), tools=tools_from_row(row)).text
                == template.render(expected, tools=original.get("tools")).text)


def test_real_template_in_worker_processes(tmp_path: Path, templates: Any) -> None:
    rows = [GOOD] * 150 + [TWO_SYSTEMS] + [GOOD] * 49
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = load_sft_dataset(path, template=templates.get("llama-3.1"), on_bad_example="skip",
                            num_proc=2, cache_dir=str(tmp_path))
    assert len(data.train) == 199
    assert data.summary.splits[0].samples[0].startswith(f"{path}:151: field 'messages[2]'")


def test_prepared_rows_render_like_the_source_in_transformers(tmp_path: Path,
                                                              templates: Any) -> None:
    """The same losslessness through transformers' own ``apply_chat_template`` (the tokenizer
    carrying the llama-3.1 template), with tool-call arguments given as objects."""
    from transformers import AutoTokenizer

    from sft_plugins.assets import LLAMA3_TOKENIZER_DIR

    tokenizer = templates.get("llama-3.1").configure_tokenizer(
        AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR))
    source = json.loads(json.dumps(TOOL_ROW))
    source["messages"][1]["content"] = ""
    call = source["messages"][1]["tool_calls"][0]["function"]
    call["arguments"] = json.loads(call["arguments"])
    data = load_sft_dataset(write_jsonl(tmp_path / "rows.jsonl", [source, GOOD]),
                            cache_dir=str(tmp_path))
    for row, original in zip(data.train, [source, GOOD], strict=True):
        assert (tokenizer.apply_chat_template(messages_from_row(row), tools=tools_from_row(row),
                                              tokenize=False)
                == tokenizer.apply_chat_template(original["messages"],
                                                 tools=original.get("tools"), tokenize=False))
