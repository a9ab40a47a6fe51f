"""``sft-plugins check-data``: validation from the command line, errors as one line."""

from __future__ import annotations

import json
from pathlib import Path

import datasets.config
import pytest
from click.testing import CliRunner

from sft_plugins.cli import main
from sft_plugins.data import parse_column_map
from sft_plugins.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
NO_ANSWER = {"messages": [{"role": "user", "content": "Q"}]}
TWO_SYSTEMS = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                            {"role": "system", "content": "S"},
                            {"role": "assistant", "content": "A"}]}


def squeeze(text: str) -> str:
    return "".join(text.split())


@pytest.fixture
def data_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [GOOD, NO_ANSWER, TWO_SYSTEMS, GOOD]))
    return path


def test_error_is_one_line_naming_file_and_line(data_file: Path) -> None:
    result = CliRunner().invoke(main, ["check-data", str(data_file)])
    assert result.exit_code == 2
    expected = f"error: {data_file}:2: field 'messages': no assistant turn"
    assert squeeze(expected) in squeeze(result.output)  # however the console wraps it
    assert "Traceback" not in result.output


def test_skip_counts_per_rule_and_writes_the_summary(data_file: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["check-data", str(data_file), "--template", "llama-3.1",
                                       "--on_bad_example", "skip", "--json",
                                       "--output_dir", str(tmp_path / "out")])
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["splits"][0]["skipped"] == {"no_assistant_content": 1,
                                               "template llama-3.1: system-not-first": 1}
    assert summary == json.loads((tmp_path / "out" / "data_summary.json").read_text())
    table = CliRunner().invoke(main, ["check-data", str(data_file), "--on_bad_example", "skip"])
    assert "skipped 1: no_assistant_content" in table.output
    assert f"{data_file}:2: field 'messages'" in table.output


def test_clean_data_exits_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nQ,A\n")
    result = CliRunner().invoke(main, ["check-data", str(path),
                                       "--column_map", "question=instruction,answer=output"])
    assert result.exit_code == 0, result.output
    assert "alpaca" in result.output
    missing = CliRunner().invoke(main, ["check-data", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2
    assert squeeze("nope.jsonl: no such file") in squeeze(missing.output)


def test_parse_column_map() -> None:
    assert parse_column_map("question=prompt, answer = completion") == {
        "question": "prompt", "answer": "completion"}
    assert parse_column_map(None) == {}
    with pytest.raises(DataError, match="expected source=target pairs"):
        parse_column_map("question")


def test_check_data_counts_examples_holding_special_token_text(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Say <|eot_id|> twice"},
                          {"role": "assistant", "content": "<|eot_id|> <|eot_id|>"}]},
            {"messages": [{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(main, ["check-data", str(path), "--template", "llama-3.1"])
    assert result.exit_code == 0, result.output
    assert "train: 1 example(s) hold the template's special-token text" in result.output
    as_json = CliRunner().invoke(main, ["check-data", str(path), "--template", "llama-3.1",
                                        "--json"])
    assert json.loads(as_json.output)["special_token_text"] == {"train": 1}


def test_with_a_tokenizer_labelling_skips_join_the_summary(data_file: Path,
                                                            tmp_path: Path) -> None:
    """check-data --tokenizer labels every example with the collator training would use (the
    same function), so an example longer than --max_length is counted before any training."""
    from transformers import AutoTokenizer

    from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
    from sft_plugins.testing import plugin_manager

    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    plugin_manager("sft_plugins_templates").templates.get("llama-3.1").configure_tokenizer(
        tokenizer)
    tokenizer.save_pretrained(tmp_path / "tok")
    long = {"messages": [{"role": "user", "content": "Q " * 300},
                         {"role": "assistant", "content": "A"}]}
    path = tmp_path / "lengths.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [GOOD, long, GOOD]))
    args = ["check-data", str(path), "--tokenizer", str(tmp_path / "tok"), "--json",
            "--on_bad_example", "skip", "--output_dir", str(tmp_path / "out")]
    kept = CliRunner().invoke(main, args)
    assert kept.exit_code == 0, kept.output
    assert json.loads(kept.stdout)["splits"][0]["preparation"]["kept"] == 3
    dropped = CliRunner().invoke(main, [*args, "--max_length", "64", "-c", "truncation=drop"])
    assert dropped.exit_code == 1, dropped.output
    split = json.loads(dropped.stdout)["splits"][0]
    assert split["preparation"]["skipped"] == {"too_long": 1}
    assert split["kept"] == 3 and split["skipped_total"] == 1
    assert f"{path}:2" in split["preparation"]["first_skips"][0]
    written = json.loads((tmp_path / "out" / "data_summary.json").read_text())
    assert written["splits"][0]["preparation"]["skipped"] == {"too_long": 1}
    usage = CliRunner().invoke(main, ["check-data", str(path), "--collator", "last-turn"])
    assert usage.exit_code == 2 and "--tokenizer" in usage.output
