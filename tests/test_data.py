"""Loading every SFT format from files the tests write, into canonical conversations."""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset, DatasetDict

from sft_plugins.data import (
    CONVERSATION_FEATURES,
    TEXT_FEATURES,
    load_sft_dataset,
    location_of,
    messages_from_row,
    tools_from_row,
)
from sft_plugins.errors import DataError


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


def chat(question: str = "Hi?", answer: str = "Hello.") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CLOCK_TOOL = {"type": "function", "function": {
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}


def test_messages_with_tools_round_trip_exactly(tmp_path: Path, cache: str) -> None:
    """Tool-call arguments with different keys per row come back without extra null keys."""
    rows = [
        {"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "content": "18C", "tool_call_id": "c1"},
            {"role": "assistant", "content": "18C and sunny."}],
         "tools": [WEATHER_TOOL, CLOCK_TOOL]},
        {"messages": [
            {"role": "user", "content": "Time in Tokyo?"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}]}],
         "tools": [CLOCK_TOOL]},
    ]
    data = load_sft_dataset(write_jsonl(tmp_path / "tools.jsonl", rows), cache_dir=cache)
    assert data.kind == "conversation"
    assert data.train.features == CONVERSATION_FEATURES
    first, second = data.train[0], data.train[1]
    assert messages_from_row(first)[2] == {
        "role": "assistant", "content": "",
        "tool_calls": [{"type": "function", "id": "c1",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert messages_from_row(first)[3] == {"role": "tool", "content": "18C", "tool_call_id": "c1"}
    assert tools_from_row(first) == [WEATHER_TOOL, CLOCK_TOOL]
    assert messages_from_row(second)[1]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}}]
    assert tools_from_row(second) == [CLOCK_TOOL]
    assert first["completion_index"] is None


def test_prompt_completion_messages_keep_the_split_point(tmp_path: Path, cache: str) -> None:
    row = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
           "completion": [{"role": "assistant", "content": "A"}]}
    data = load_sft_dataset(write_jsonl(tmp_path / "pc.jsonl", [row]), cache_dir=cache)
    assert data.kind == "conversation"
    assert [m["role"] for m in messages_from_row(data.train[0])] == ["system", "user", "assistant"]
    assert data.train[0]["completion_index"] == 2
    assert data.summary.splits[0].format == "prompt_completion"


def test_prompt_completion_strings_are_text_with_an_offset(tmp_path: Path, cache: str) -> None:
    """As in TRL, string prompt/completion pairs are plain text: no template, completion trained."""
    data = load_sft_dataset(write_jsonl(tmp_path / "pc.jsonl",
                                        [{"prompt": "The sky is", "completion": " blue."}]),
                            cache_dir=cache)
    assert data.kind == "text"
    assert data.train.features == TEXT_FEATURES
    assert data.train[0]["text"] == "The sky is blue."
    assert data.train[0]["completion_offset"] == len("The sky is")


def test_prompt_completion_csv_text_and_json_messages(tmp_path: Path, cache: str) -> None:
    """In CSV, a prompt cell holding a JSON message list is a conversation; other text (even
    text that parses as a JSON list of numbers) is plain text."""
    (tmp_path / "text.csv").write_text('prompt,completion\n"[1, 2]", 3\n')
    text = load_sft_dataset(tmp_path / "text.csv", cache_dir=cache)
    assert (text.kind, text.train[0]["text"]) == ("text", "[1, 2] 3")
    prompt = json.dumps([{"role": "user", "content": "Q"}]).replace('"', '""')
    completion = json.dumps([{"role": "assistant", "content": "A"}]).replace('"', '""')
    (tmp_path / "chat.csv").write_text(f'prompt,completion\n"{prompt}","{completion}"\n')
    chat_data = load_sft_dataset(tmp_path / "chat.csv", cache_dir=cache)
    assert chat_data.kind == "conversation"
    assert chat_data.train[0]["completion_index"] == 1


def test_alpaca(tmp_path: Path, cache: str) -> None:
    rows = [{"instruction": "Translate.", "input": "chat", "output": "cat", "system": "Be exact."},
            {"instruction": "Say hi.", "input": "", "output": "hi"}]
    data = load_sft_dataset(write_jsonl(tmp_path / "alpaca.jsonl", rows), cache_dir=cache)
    assert messages_from_row(data.train[0]) == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Translate.\n\nchat"},
        {"role": "assistant", "content": "cat"}]
    assert messages_from_row(data.train[1]) == [
        {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    assert [data.train[0]["completion_index"], data.train[1]["completion_index"]] == [2, 1]


def test_sharegpt_roles_are_mapped(tmp_path: Path, cache: str) -> None:
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                             {"from": "gpt", "value": "A"}, {"from": "tool", "value": "T"},
                             {"from": "gpt", "value": "B"}]}
    data = load_sft_dataset(write_jsonl(tmp_path / "sharegpt.jsonl", [row]), cache_dir=cache)
    assert [(m["role"], m["content"]) for m in messages_from_row(data.train[0])] == [
        ("system", "S"), ("user", "Q"), ("assistant", "A"), ("tool", "T"), ("assistant", "B")]
    assert data.summary.splits[0].format == "sharegpt"


def test_text(tmp_path: Path, cache: str) -> None:
    data = load_sft_dataset(write_jsonl(tmp_path / "text.jsonl", [{"text": "All of it."}]),
                            cache_dir=cache)
    assert data.kind == "text"
    assert data.train[0]["text"] == "All of it."
    assert data.train[0]["completion_offset"] is None


def test_column_map_and_format_override(tmp_path: Path, cache: str) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q", "answer": "A", "text": "x"}])
    mapped = load_sft_dataset(path, column_map={"question": "prompt", "answer": "completion"},
                              cache_dir=cache)
    assert mapped.summary.splits[0].format == "prompt_completion"  # detection prefers it to text
    assert mapped.train[0]["text"] == "QA"
    as_text = load_sft_dataset(path, format="text", cache_dir=cache)
    assert as_text.train[0]["text"] == "x"


def test_messages_win_over_text_when_both_are_present(tmp_path: Path, cache: str) -> None:
    row = {**chat(), "text": "rendered elsewhere"}
    data = load_sft_dataset(write_jsonl(tmp_path / "both.jsonl", [row]), cache_dir=cache)
    assert data.kind == "conversation"


def test_provenance_names_file_line_and_row(tmp_path: Path, cache: str) -> None:
    path = tmp_path / "gaps.jsonl"
    path.write_text(f"{json.dumps(chat('a'))}\n\n   \n{json.dumps(chat('b'))}\n")
    data = load_sft_dataset(path, cache_dir=cache)
    assert [(r["source_row"], r["source_line"]) for r in data.train] == [(0, 1), (1, 4)]
    assert location_of(data.train[1]) == f"{path}:4"


def test_byte_order_mark_crlf_and_a_last_line_without_newline(tmp_path: Path,
                                                              cache: str) -> None:
    path = tmp_path / "windows.jsonl"
    rows = [json.dumps(chat(str(i))).encode() for i in range(3)]
    path.write_bytes(b"\xef\xbb\xbf" + rows[0] + b"\r\n\r\n" + rows[1] + b"\r\n" + rows[2])
    data = load_sft_dataset(path, cache_dir=cache)
    assert [(messages_from_row(r)[0]["content"], r["source_line"]) for r in data.train] == [
        ("0", 1), ("1", 3), ("2", 4)]


def test_lines_across_read_blocks(tmp_path: Path, cache: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines that straddle the blocks the file is read in keep their text and numbers."""
    import sft_plugins.data.sources as sources

    monkeypatch.setattr(sources, "READ_BLOCK", 7)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(["", json.dumps(chat("a")), "", "", json.dumps(chat("b" * 30))]))
    data = load_sft_dataset(path, cache_dir=cache)
    assert [(messages_from_row(r)[0]["content"], r["source_line"]) for r in data.train] == [
        ("a", 2), ("b" * 30, 5)]


def test_json_array_parquet_csv_tsv(tmp_path: Path, cache: str) -> None:
    (tmp_path / "array.json").write_text(json.dumps([chat("a"), chat("b")]))
    Dataset.from_list([chat("c")]).to_parquet(str(tmp_path / "rows.parquet"))
    (tmp_path / "alpaca.csv").write_text('instruction,input,output\n"Sum, please.",1 2,3\n')
    (tmp_path / "messages.tsv").write_text(f"messages\n{json.dumps(chat('d')['messages'])}\n")
    contents = {}
    for name in ("array.json", "rows.parquet", "alpaca.csv", "messages.tsv"):
        data = load_sft_dataset(tmp_path / name, cache_dir=cache)
        contents[name] = [m["content"] for row in data.train for m in messages_from_row(row)]
    assert contents == {"array.json": ["a", "Hello.", "b", "Hello."],
                        "rows.parquet": ["c", "Hello."],
                        "alpaca.csv": ["Sum, please.\n\n1 2", "3"],
                        "messages.tsv": ["d", "Hello."]}
    row = load_sft_dataset(tmp_path / "array.json", cache_dir=cache).train[1]
    assert location_of(row) == f"{tmp_path / 'array.json'}, example index 1"


def test_gzip_compressed_files(tmp_path: Path, cache: str) -> None:
    import gzip

    folder = tmp_path / "compressed"
    folder.mkdir()
    with gzip.open(folder / "train.jsonl.gz", "wt") as handle:
        handle.write(f"{json.dumps(chat('a'))}\n\n{json.dumps(chat('b'))}\n")
    with gzip.open(folder / "alpaca.csv.gz", "wt") as handle:
        handle.write("instruction,output\nQ,007\n")
    data = load_sft_dataset(folder / "train.jsonl.gz", cache_dir=cache)
    assert [r["source_line"] for r in data.train] == [1, 3]
    csv_data = load_sft_dataset(folder / "alpaca.csv.gz", cache_dir=cache)
    assert messages_from_row(csv_data.train[0])[1]["content"] == "007"
    assert len(load_sft_dataset(folder, cache_dir=cache).train) == 3  # both, from the folder


def test_json_file_holding_json_lines(tmp_path: Path, cache: str) -> None:
    path = write_jsonl(tmp_path / "lines.json", [chat("a"), chat("b")])
    assert load_sft_dataset(path, cache_dir=cache).train[1]["source_line"] == 2


def test_glob_directory_and_list_keep_each_file(tmp_path: Path, cache: str) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [chat("b1"), chat("b2")])
    write_jsonl(folder / "a.jsonl", [chat("a1")])
    Dataset.from_list([{"instruction": "c", "output": "C"}]).to_parquet(str(folder / "c.parquet"))
    (folder / ".cache").mkdir()
    write_jsonl(folder / ".cache" / "hidden.jsonl", [{"text": "not data"}])
    by_dir = load_sft_dataset(folder, cache_dir=cache)
    by_glob = load_sft_dataset(str(folder / "*.jsonl"), cache_dir=cache)
    by_list = load_sft_dataset([folder / "b.jsonl", str(folder / "a.jsonl")], cache_dir=cache)
    assert [(Path(r["source_file"]).name, r["source_row"]) for r in by_dir.train] == [
        ("a.jsonl", 0), ("b.jsonl", 0), ("b.jsonl", 1), ("c.parquet", 0)]
    assert by_dir.summary.splits[0].format == "alpaca+messages"
    assert len(by_glob.train) == 3
    assert [messages_from_row(r)[0]["content"] for r in by_list.train] == ["b1", "b2", "a1"]


def test_in_memory_dataset_and_dataset_dict(cache: str) -> None:
    dataset = Dataset.from_list([chat("m")])
    assert messages_from_row(load_sft_dataset(dataset).train[0])[0]["content"] == "m"
    splits = DatasetDict({"train": dataset, "validation": Dataset.from_list([chat("v")])})
    data = load_sft_dataset(splits, eval_dataset=splits)
    assert messages_from_row(data.eval[0])[0]["content"] == "v"  # type: ignore[index]
    assert data.train[0]["source_file"] == "<DatasetDict['train']>"
    with pytest.raises(DataError, match=r"no split 'dev'.*train, validation"):
        load_sft_dataset(splits, split="dev")


def test_eval_split_ratio_holds_out_validated_examples(tmp_path: Path, cache: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [chat(str(i)) for i in range(50)])
    data = load_sft_dataset(path, eval_split_ratio=0.2, seed=0, cache_dir=cache)
    assert data.eval is not None
    assert (len(data.train), len(data.eval)) == (40, 10)
    rows = {r["source_row"] for r in data.train} | {r["source_row"] for r in data.eval}
    assert rows == set(range(50))
    assert [s.split for s in data.summary.splits] == ["train", "eval"]
    assert set(data.as_dataset_dict()) == {"train", "eval"}


def test_eval_dataset_is_validated_like_train(tmp_path: Path, cache: str) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [chat()])
    bad_eval = write_jsonl(tmp_path / "eval.jsonl", [chat(), {"messages": [
        {"role": "user", "content": "Q"}]}])
    with pytest.raises(DataError, match=r"eval\.jsonl:2: field 'messages'"):
        load_sft_dataset(train, eval_dataset=bad_eval, cache_dir=cache)
    text_eval = write_jsonl(tmp_path / "text.jsonl", [{"text": "t"}])
    with pytest.raises(DataError, match="same kind of format"):
        load_sft_dataset(train, eval_dataset=text_eval, cache_dir=cache)
    with pytest.raises(DataError, match="not both"):
        load_sft_dataset(train, eval_dataset=train, eval_split_ratio=0.1, cache_dir=cache)


def test_an_edited_file_is_read_again(tmp_path: Path, cache: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [chat("old")])
    data = load_sft_dataset(path, cache_dir=cache)
    assert messages_from_row(data.train[0])[0]["content"] == "old"
    write_jsonl(path, [chat("new"), chat("newer")])
    data = load_sft_dataset(path, cache_dir=cache)
    assert [messages_from_row(r)[0]["content"] for r in data.train] == ["new", "newer"]


def test_worker_processes_restore_tokenizer_parallelism(tmp_path: Path, cache: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets sets the variable to false in the process environment (which the Rust tokenizer
    reads) and puts back only a Python-level copy of ``os.environ``; check the real one."""
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    path = write_jsonl(tmp_path / "d.jsonl", [chat(str(i)) for i in range(200)])
    data = load_sft_dataset(path, num_proc=2, cache_dir=cache)
    assert [r["source_line"] for r in data.train] == list(range(1, 201))
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    assert libc.getenv(b"TOKENIZERS_PARALLELISM") == b"true"
