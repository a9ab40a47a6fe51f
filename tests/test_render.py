"""``sft-plugins render``: text, highlighting, --json round trip, --html, tokens and labels."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.cli import main
from sft_plugins.testing import plugin_manager

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hi <b>there</b> & 東京"},
                  {"role": "assistant", "content": " Hello! "}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]},
]


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in CONVERSATIONS) + "\n\n",
                    encoding="utf-8")
    return path


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    """The shipped tokenizer with the llama-3.1 template installed, so it can be detected."""
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    plugin_manager("sft_plugins_templates").templates.get("llama-3.1").configure_tokenizer(
        tokenizer)
    tokenizer.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def run(*args: str) -> Any:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_render_prints_each_conversation(jsonl: Path) -> None:
    output = run("render", str(jsonl), "--template", "llama-3.1").output
    assert "line 1 · llama-3.1" in output and "line 2 · llama-3.1" in output
    assert "Hello!<|eot_id|>" in output


def test_render_json_round_trips(jsonl: Path) -> None:
    first = run("render", str(jsonl), "--template", "qwen3", "--json").output.splitlines()
    qwen3 = plugin_manager("sft_plugins_templates").templates.get("qwen3")
    objects = [json.loads(line) for line in first]
    assert [o["messages"] for o in objects] == [c["messages"] for c in CONVERSATIONS]
    for obj in objects:
        rendered = qwen3.render(obj["messages"])
        assert obj["text"] == rendered.text
        assert [tuple(s["trained"]) for s in obj["spans"] if s["trained"]] == \
            list(rendered.trained_spans)
    again = jsonl.parent / "again.jsonl"
    again.write_text("\n".join(first), encoding="utf-8")
    second = run("render", str(again), "--template", "qwen3", "--json").output.splitlines()
    assert [json.loads(line)["text"] for line in second] == [o["text"] for o in objects]


def test_render_with_tokenizer_detects_the_template_and_labels_tokens(
        jsonl: Path, tokenizer_dir: Path) -> None:
    lines = run("render", str(jsonl), "--tokenizer", str(tokenizer_dir), "--json"
                ).output.splitlines()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    first = json.loads(lines[0])
    assert first["template"] == "llama-3.1"
    assert first["input_ids"] == tokenizer(first["text"], add_special_tokens=False).input_ids
    assert first["input_ids"].count(tokenizer.bos_token_id) == 1
    trained = [i for i, label in zip(first["input_ids"], first["labels"], strict=True)
               if label != -100]
    assert tokenizer.decode(trained) == "Hello!<|eot_id|>"
    assert all(label in (-100, i) for i, label in zip(first["input_ids"], first["labels"],
                                                       strict=True))
    terminal = run("render", str(jsonl), "--tokenizer", str(tokenizer_dir)).output
    assert "with loss]" in terminal


def test_render_html_is_well_formed(jsonl: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    for extra in ([], ["--tokenizer", str(tokenizer_dir)]):
        page = tmp_path / "page.html"
        run("render", str(jsonl), "--template", "llama-3.1", "--html", str(page), *extra)
        markup = page.read_text(encoding="utf-8")
        root = ET.fromstring(markup.split("\n", 1)[1])  # well-formed XML after the doctype
        assert root.tag == "html"
        HTMLParser().feed(markup)
        text = "".join(root.find("body").itertext())  # type: ignore[union-attr]
        assert "Hi <b>there</b> & 東京" in text
        assert 'class="trained"' in markup or 'class="tok loss"' in markup


def test_render_generation_prompt_and_options(jsonl: Path) -> None:
    output = run("render", str(jsonl), "--template", "llama-3.1", "--add-generation-prompt",
                 "-o", "date_string=01 Jan 2025", "--json").output.splitlines()
    text = json.loads(output[0])["text"]
    assert "Today Date: 01 Jan 2025" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_render_bad_lines_name_file_line_and_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CONVERSATIONS[1]) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}))
    result = CliRunner().invoke(main, ["render", str(bad), "--template", "llama-3.1"])
    assert result.exit_code == 2
    assert f"{bad}:2" in result.output and "message 1" in result.output
    assert "unknown role 'robot'" in result.output and "Traceback" not in result.output
    bad.write_text("{not json\n")
    result = CliRunner().invoke(main, ["render", str(bad), "--template", "llama-3.1"])
    assert result.exit_code == 2 and f"{bad}:1: not valid JSON" in result.output


def test_render_needs_a_template_or_tokenizer(jsonl: Path) -> None:
    result = CliRunner().invoke(main, ["render", str(jsonl)])
    assert result.exit_code == 2 and "--template" in result.output
