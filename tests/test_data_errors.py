"""Malformed files and bad examples: one clear DataError naming file, line and field, or a skip
counted by reason."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset

from sft_plugins.data import SUMMARY_FILE, load_sft_dataset, messages_from_row
from sft_plugins.errors import DataError, TemplateError


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


def chat(question: str = "Hi?", answer: str = "Hello.") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def one_bad(tmp_path: Path, bad: Any, *, name: str = "data.jsonl") -> Path:
    """A JSON Lines file whose third line is ``bad`` (a row, or a raw string)."""
    lines = [json.dumps(chat()), json.dumps(chat()),
             bad if isinstance(bad, str) else json.dumps(bad), json.dumps(chat())]
    return write_lines(tmp_path / name, lines)


# ---------------------------------------------------------------- malformed files ----------


@pytest.mark.parametrize(("line", "expected"), [
    ('{"messages": [', r"data\.jsonl:3: field '\(line\)': not valid JSON"),
    ("[1, 2]", r"data\.jsonl:3: field '\(line\)': a JSON list; expected one JSON object per line"),
])
def test_a_line_that_is_not_a_json_object(tmp_path: Path, cache: str, line: str,
                                          expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        load_sft_dataset(one_bad(tmp_path, line), cache_dir=cache)


def test_invalid_utf8_line(tmp_path: Path, cache: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(chat()).encode() + b'\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: .*not valid UTF-8"):
        load_sft_dataset(path, cache_dir=cache)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file(tmp_path: Path, cache: str, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        load_sft_dataset(path, cache_dir=cache)


@pytest.mark.parametrize("source", ["missing.jsonl", "data/train.parquet", "./nowhere"])
def test_missing_file(tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch,
                      source: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"{re.escape(source)}: no such file or directory"):
        load_sft_dataset(source, cache_dir=cache)


def test_missing_file_in_a_list(tmp_path: Path, cache: str) -> None:
    good = write_lines(tmp_path / "good.jsonl", [json.dumps(chat())])
    with pytest.raises(DataError, match=r"gone\.jsonl: no such file"):
        load_sft_dataset([good, tmp_path / "gone.jsonl"], cache_dir=cache)


def test_csv_without_the_needed_columns(tmp_path: Path, cache: str) -> None:
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nQ,A\n")
    with pytest.raises(DataError, match=r"qa\.csv: cannot tell the data set format from the "
                                        r"columns question, answer\. Each format needs: .*alpaca: "
                                        "instruction, output"):
        load_sft_dataset(path, cache_dir=cache)
    with pytest.raises(DataError, match=r"format 'alpaca' needs the column\(s\) instruction, "
                                        "output, but the data has question, answer"):
        load_sft_dataset(path, format="alpaca", cache_dir=cache)
    data = load_sft_dataset(path, column_map={"question": "instruction", "answer": "output"},
                            cache_dir=cache)
    assert messages_from_row(data.train[0])[1]["content"] == "A"


def test_csv_header_only_and_ragged_csv(tmp_path: Path, cache: str) -> None:
    (tmp_path / "header.csv").write_text("instruction,output\n")
    with pytest.raises(DataError, match=r"header\.csv: the file has a header but no rows"):
        load_sft_dataset(tmp_path / "header.csv", cache_dir=cache)
    (tmp_path / "ragged.csv").write_text("instruction,output\na,b\nc,d,e,f\n")
    with pytest.raises(DataError, match=r"ragged\.csv: cannot be read as CSV: .*fields"):
        load_sft_dataset(tmp_path / "ragged.csv", cache_dir=cache)


def test_csv_cells_stay_text(tmp_path: Path, cache: str) -> None:
    (tmp_path / "codes.csv").write_text("instruction,output\nCode?,007\nNothing?,NA\n")
    data = load_sft_dataset(tmp_path / "codes.csv", cache_dir=cache)
    assert [messages_from_row(r)[1]["content"] for r in data.train] == ["007", "NA"]


def test_corrupt_gzip(tmp_path: Path, cache: str) -> None:
    (tmp_path / "train.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"train\.jsonl\.gz: cannot be read \(Not a gzipped file"):
        load_sft_dataset(tmp_path / "train.jsonl.gz", cache_dir=cache)


def test_corrupt_parquet(tmp_path: Path, cache: str) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken\.parquet: cannot be read as Parquet") as caught:
        load_sft_dataset(tmp_path / "broken.parquet", cache_dir=cache)
    assert ".." not in str(caught.value)  # pyarrow's message ends with its own full stop


@pytest.mark.parametrize(("content", "expected"), [
    ('{\n  "data": [1]\n}', "top-level JSON value is dict"),
    ("[]", "JSON array is empty"),
    ('[{"text": "a"}, ["b"]]', r"example index 1: field '\(array element\)': a JSON list; "
                               "expected one JSON object per array element"),
    ('[{"text": "a"},', "not valid JSON"),
])
def test_malformed_json_files(tmp_path: Path, cache: str, content: str, expected: str) -> None:
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"data\.json[:,] .*{expected}"):
        load_sft_dataset(path, cache_dir=cache)


def test_unusable_sources(tmp_path: Path, cache: str) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_sft_dataset(tmp_path / "notes.txt", cache_dir=cache)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="the directory holds no data files"):
        load_sft_dataset(tmp_path / "empty_dir", cache_dir=cache)
    with pytest.raises(DataError, match="the pattern matches no files"):
        load_sft_dataset(str(tmp_path / "*.jsonl"), cache_dir=cache)
    with pytest.raises(DataError, match="unknown data set format 'yaml'"):
        load_sft_dataset(tmp_path / "notes.txt", format="yaml", cache_dir=cache)
    with pytest.raises(DataError, match=r"none of the first examples is a JSON object \(the "
                                        r"first, line 1: a JSON number\)"):
        load_sft_dataset(write_lines(tmp_path / "nums.jsonl", ["1", "2"]), cache_dir=cache)
    deep = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    for streaming in (False, True):
        with pytest.raises(DataError, match=r"nums\.jsonl: none of the first examples is a JSON "
                                            r"object \(the first, line 2: not valid JSON \(nested "
                                            "too deeply"):
            load_sft_dataset(write_lines(tmp_path / "nums.jsonl", ["", deep, "[1]"]),
                             cache_dir=cache, streaming=streaming)
    with pytest.raises(DataError, match="has no rows"):
        load_sft_dataset(Dataset.from_list([]))
    with pytest.raises(DataError, match="no data source given"):
        load_sft_dataset([])
    with pytest.raises(DataError, match="an IterableDataset cannot be validated before training"):
        load_sft_dataset(Dataset.from_list([chat()]).to_iterable_dataset())  # type: ignore[arg-type]


def test_mixed_kinds_in_one_split(tmp_path: Path, cache: str) -> None:
    write_lines(tmp_path / "a.jsonl", [json.dumps(chat())])
    write_lines(tmp_path / "b.jsonl", [json.dumps({"text": "t"})])
    with pytest.raises(DataError, match="mix conversation and text formats"):
        load_sft_dataset(tmp_path, cache_dir=cache)


# ------------------------------------------------------------------ bad examples ----------


@pytest.mark.parametrize(("row", "expected"), [
    ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
     r"field 'messages\[0\]\.role': unknown role 'bot'; expected one of system, developer"),
    ({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "y"}]},
     r"field 'messages\[0\]\.content': found a list; expected a string"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
     r"field 'messages': no assistant turn with non-empty content"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"field 'messages': no assistant turn"),
    ({"messages": []}, r"field 'messages': the conversation is empty"),
    ({"messages": "hello"}, r"field 'messages': found a str; expected a list of messages"),
    ({"messages": ["hello"]}, r"field 'messages\[0\]': found a str; expected an object"),
    ({"messages": None}, r"field 'messages': it is missing or null"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]},
     r"field 'messages\[1\]\.content': found null; expected a string"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "",
                   "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
     r"field 'messages\[1\]\.tool_calls\[0\]\.function\.arguments': a string that is not valid "
     "JSON"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "",
                   "tool_calls": [{"function": {"arguments": {}}}]}]},
     r"field 'messages\[1\]\.tool_calls\[0\]\.function\.name'"),
    ({**chat(), "tools": {"name": "f"}}, r"field 'tools': found an object; expected a list"),
    ({"prompt": [{"role": "user", "content": "x"}],
      "completion": [{"role": "user", "content": "y"}]},
     r"field 'completion': no assistant turn"),
    ({"prompt": [{"role": "robot", "content": "x"}],
      "completion": [{"role": "assistant", "content": "y"}]}, r"field 'prompt\[0\]\.role'"),
    ({"prompt": [{"role": "user", "content": "x"}],
      "completion": [{"role": "assistant", "content": 3}]},
     r"field 'completion\[0\]\.content': found an int"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "bard", "value": "y"}]},
     r"field 'conversations\[1\]\.from': unknown role 'bard'; expected one of system, human"),
])
def test_bad_example_names_file_line_and_field(tmp_path: Path, cache: str, row: dict[str, Any],
                                               expected: str) -> None:
    good: dict[str, Any] = chat()
    if "prompt" in row:
        good = {"prompt": [{"role": "user", "content": "q"}],
                "completion": [{"role": "assistant", "content": "a"}]}
    if "conversations" in row:
        good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    lines = [json.dumps(good), json.dumps(good), json.dumps(row), json.dumps(good)]
    path = write_lines(tmp_path / "data.jsonl", lines)
    with pytest.raises(DataError, match=rf"data\.jsonl:3: {expected}") as caught:
        load_sft_dataset(path, cache_dir=cache)
    assert "on_bad_example='skip'" in str(caught.value)


@pytest.mark.parametrize(("row", "expected"), [
    ({"instruction": "x", "output": ""}, r"field 'output': no assistant turn"),
    ({"instruction": 1, "output": "y"}, r"field 'instruction': found an int"),
    ({"instruction": "x"}, r"field 'output': it is missing or null"),
    ({"text": "   "}, r"field 'text': it is empty"),
    ({"prompt": "p", "completion": ""}, r"field 'completion': it is empty"),
    ({"prompt": "p", "completion": ["y"]}, r"field 'completion': found a list; expected a string"),
])
def test_bad_rows_of_other_formats(tmp_path: Path, cache: str, row: dict[str, Any],
                                   expected: str) -> None:
    first = {key: "ok" for key in row}
    path = write_lines(tmp_path / "data.jsonl", [json.dumps({**first, "output": "ok"}
                                                            if "instruction" in row else first),
                                                 json.dumps(row)])
    with pytest.raises(DataError, match=rf"data\.jsonl:2: {expected}"):
        load_sft_dataset(path, cache_dir=cache)


def test_rows_of_typed_sources_are_named_by_index(cache: str) -> None:
    dataset = Dataset.from_list([chat(), {"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(DataError, match=r"<in-memory Dataset>, example index 1: field 'messages'"):
        load_sft_dataset(dataset)


def test_error_counts_the_other_bad_examples(tmp_path: Path, cache: str) -> None:
    lines = [json.dumps(chat()), "nope", json.dumps({"messages": []}), "{"]
    with pytest.raises(DataError, match=r"data\.jsonl:2: .* 2 more bad example\(s\) in"):
        load_sft_dataset(write_lines(tmp_path / "data.jsonl", lines), cache_dir=cache)


def test_every_example_bad_is_an_error_even_when_skipping(tmp_path: Path, cache: str) -> None:
    path = write_lines(tmp_path / "data.jsonl", [json.dumps({"messages": []})])
    with pytest.raises(DataError, match="every train example was skipped"):
        load_sft_dataset(path, on_bad_example="skip", cache_dir=cache)


# --------------------------------------------------------- one bad line in 10 000 ----------


@pytest.fixture(scope="module")
def ten_thousand_and_one(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 000 good conversations and, on line 5 000, one without an assistant turn."""
    path = tmp_path_factory.mktemp("big") / "train.jsonl"
    lines = [json.dumps(chat(f"What is {i} + {i}?", f"{2 * i}.")) for i in range(10_000)]
    lines.insert(4_999, json.dumps({"messages": [{"role": "user", "content": "Anyone?"}]}))
    return write_lines(path, lines)


def test_error_stops_before_training_and_names_the_line(ten_thousand_and_one: Path,
                                                        tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_sft_dataset(ten_thousand_and_one, num_proc=2, cache_dir=str(tmp_path))
    message = str(caught.value)
    assert message.startswith(f"{ten_thousand_and_one}:5000: field 'messages': no assistant turn")
    assert "more bad" not in message


def test_skip_keeps_the_ten_thousand_and_reports_one(ten_thousand_and_one: Path,
                                                     tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    output = tmp_path / "run"
    data = load_sft_dataset(ten_thousand_and_one, on_bad_example="skip", num_proc=2,
                            output_dir=output, cache_dir=str(tmp_path / "cache"))
    assert len(data.train) == 10_000
    assert "Anyone?" not in {messages_from_row(data.train[i])[0]["content"]
                             for i in (4_998, 4_999, 5_000)}
    assert [data.train[i]["source_line"] for i in (4_998, 4_999)] == [4_999, 5_001]
    split = data.summary.splits[0]
    assert (split.examples, split.kept, split.skipped) == (10_001, 10_000,
                                                           {"no_assistant_content": 1})
    assert split.samples == [f"{ten_thousand_and_one}:5000: field 'messages': no assistant turn "
                             "with non-empty content or tool calls; expected at least one "
                             "assistant turn to train on"]
    written = json.loads((output / SUMMARY_FILE).read_text())
    assert written["splits"][0]["skipped"] == {"no_assistant_content": 1}
    assert written["splits"][0]["skipped_total"] == 1
    assert "skipped 1 bad examples" in caplog.text and "train.jsonl:5000" in caplog.text


# ------------------------------------------------------------------ chat templates ----------


class NoSystemTemplate:
    """A stand-in with the ChatTemplate ``validate`` contract: no system messages, no tools."""

    name = "no-system"

    def validate(self, messages: list[dict[str, Any]], *,
                 tools: list[dict[str, Any]] | None = None) -> None:
        if tools:
            raise TemplateError("no-system does not support tools")
        for index, message in enumerate(messages):
            if message["role"] == "system":
                raise TemplateError(f"message {index}: no-system does not accept system "
                                    "messages; fold the instructions into the first user message")


def test_template_rules_apply_to_every_example(tmp_path: Path, cache: str) -> None:
    with_system = {"messages": [{"role": "system", "content": "S"}, *chat()["messages"]]}
    path = one_bad(tmp_path, with_system)
    with pytest.raises(DataError, match=r"data\.jsonl:3: message 0: no-system does not accept "
                                        "system messages"):
        load_sft_dataset(path, template=NoSystemTemplate(), cache_dir=cache)
    assert len(load_sft_dataset(path, cache_dir=cache).train) == 4  # no template, no rule


def test_template_skips_are_counted_once_per_rule(tmp_path: Path, cache: str) -> None:
    rows = [chat(), {"messages": [{"role": "system", "content": "S"}, *chat()["messages"]]},
            {"messages": [*chat()["messages"], {"role": "system", "content": "S"},
                          *chat()["messages"]]},
            {**chat(), "tools": [{"type": "function", "function": {"name": "f"}}]}]
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(r) for r in rows])
    data = load_sft_dataset(path, template=NoSystemTemplate(), on_bad_example="skip",
                            cache_dir=cache)
    assert len(data.train) == 1
    assert data.summary.splits[0].skipped == {
        "template no-system: message N: no-system does not accept system messages": 2,
        "template no-system: no-system does not support tools": 1}


class RejectEverything:
    name = "reject-everything"

    def validate(self, messages: list[dict[str, Any]], *,
                 tools: list[dict[str, Any]] | None = None) -> None:
        raise TemplateError("reject-everything rejects every conversation")


def test_text_data_is_not_given_to_the_template(tmp_path: Path, cache: str) -> None:
    for name, row in (("text", {"text": "plain"}), ("pc", {"prompt": "p", "completion": "c"})):
        path = write_lines(tmp_path / f"{name}.jsonl", [json.dumps(row)])
        data = load_sft_dataset(path, template=RejectEverything(), cache_dir=cache)
        assert (data.kind, len(data.train)) == ("text", 1)
    conversation = write_lines(tmp_path / "chat.jsonl", [json.dumps(chat())])
    with pytest.raises(DataError, match="reject-everything rejects every conversation"):
        load_sft_dataset(conversation, template=RejectEverything(), cache_dir=cache)


# ------------------------------------------------------------------- hub names ----------


def test_hub_names_go_to_load_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Names that are not local paths are passed to ``datasets.load_dataset`` (no network here:
    the loader is replaced), and its failure is one DataError naming the data set."""
    import sft_plugins.data.sources as sources

    calls = []

    def fake_load_dataset(name: str, *, split: str, cache_dir: str | None) -> Dataset:
        calls.append((name, split))
        if name == "org/missing":
            raise FileNotFoundError("Dataset 'org/missing' doesn't exist on the Hub")
        return Dataset.from_list([chat("from the hub")])

    monkeypatch.setattr(sources, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)
    data = load_sft_dataset("org/chat-data", split="train_sft")
    assert load_sft_dataset(["org/chat-data"]).train[0] == data.train[0]  # as --dataset passes it
    assert calls == [("org/chat-data", "train_sft"), ("org/chat-data", "train")]
    assert data.train[0]["source_file"] == "org/chat-data"
    assert messages_from_row(data.train[0])[0]["content"] == "from the hub"
    with pytest.raises(DataError, match=r"org/missing: not a local file, and datasets\.load_"
                                        r"dataset\('org/missing', split='train'\) failed: "
                                        "Dataset 'org/missing' doesn't exist"):
        load_sft_dataset("org/missing")
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match=r"data/train: no such file or directory"):
        load_sft_dataset("data/train")  # under an existing directory: a path, not a hub name


@pytest.mark.parametrize(("options", "expected"), [
    ({"on_bad_example": "ignore"}, "on_bad_example='ignore'; expected 'error' or 'skip'"),
    ({"eval_split_ratio": 1.5}, "eval_split_ratio=1.5; expected a number between 0 and 1"),
    ({"eval_split_ratio": 0.001}, r"eval_split_ratio=0\.001 cannot split 1 examples"),
])
def test_bad_options(cache: str, options: dict[str, Any], expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        load_sft_dataset(Dataset.from_list([chat()]), **options)


@pytest.mark.parametrize(("line", "key"), [
    ('{"messages": [{"role": "user", "content": "a"}], "messages": []}', "messages"),
    ('{"messages": [{"role": "user", "content": "a", "content": "b"}, '
     '{"role": "assistant", "content": "c"}]}', "content"),
])
def test_a_key_given_twice_is_refused_naming_the_line(tmp_path: Path, cache: str, line: str,
                                                      key: str) -> None:
    with pytest.raises(DataError, match=rf"data\.jsonl:3: .*the key '{key}' appears twice"):
        load_sft_dataset(one_bad(tmp_path, line), cache_dir=cache)
    skipped = load_sft_dataset(one_bad(tmp_path, line), cache_dir=cache,
                               on_bad_example="skip")
    assert len(skipped.train) == 3


def test_a_key_given_twice_in_a_json_array_is_refused(tmp_path: Path, cache: str) -> None:
    path = tmp_path / "data.json"
    path.write_text('[{"text": "a"}, {"text": "b", "text": "c"}]')
    with pytest.raises(DataError, match=r"data\.json: not valid JSON .*'text' appears twice"):
        load_sft_dataset(path, cache_dir=cache)


@pytest.mark.parametrize(("encoding", "name"), [
    ("utf-16", "UTF-16 (little-endian)"), ("utf-16-be", "UTF-16 or UTF-32"),
    ("utf-32", "UTF-32 (little-endian)")])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_file_not_in_utf8_is_refused_once_naming_its_encoding(
        tmp_path: Path, cache: str, encoding: str, name: str, suffix: str) -> None:
    rows = [chat(), chat("Two?"), chat("Three?")]
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        text = "prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(3))
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(text.encode(encoding))
    for mode in ("error", "skip"):
        with pytest.raises(DataError, match=rf"data\{suffix}: the file is encoded as "
                                            rf"{re.escape(name)}.*expected UTF-8"):
            load_sft_dataset(path, cache_dir=cache, on_bad_example=mode)
