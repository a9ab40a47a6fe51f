"""Streaming: data read, validated, labelled, counted and packed while training reads it.

``load_sft_dataset(..., streaming=True)`` and a ``datasets.IterableDataset`` given to
``SFTPluginTrainer`` take the same rules, labeller and packer as map-style data, on the fly. Two
ranks reading one stream are tested in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from datasets import Dataset, IterableDataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainingArguments

from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.batching import DEFAULT_PACKING_BUFFER, pack_dataset, pack_stream
from sft_plugins.cli import main
from sft_plugins.data import load_sft_dataset
from sft_plugins.errors import ConfigError, DataError
from sft_plugins.testing import plugin_manager
from sft_plugins.trainer import SFTPluginTrainer


@pytest.fixture(scope="module")
def manager():
    return plugin_manager("sft_plugins_templates", "sft_plugins_collators")


@pytest.fixture(scope="module")
def template(manager):
    return manager.templates.get("llama-3.1")


@pytest.fixture(scope="module")
def tokenizer(template):
    return template.configure_tokenizer(AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR))


def conversation(i: int, words: int = 3) -> dict:
    return {"messages": [{"role": "user", "content": f"item {i}: sort b a"},
                         {"role": "assistant", "content": " ".join(["a b"] * words)}]}


def write_jsonl(path: Path, rows: list, bad: dict[int, str] | None = None) -> Path:
    """``rows`` as JSON Lines, with ``bad[i]`` (raw text) written before row ``i``."""
    lines = []
    for i, row in enumerate(rows):
        if bad and i in bad:
            lines.append(bad[i])
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def mixed_rows(n: int, seed: int = 0) -> list:
    """Conversations of many lengths; every 7th has no assistant turn (a data-rule skip)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = conversation(i, rng.choice([1, 2, 5, 20, 60]))
        if i % 7 == 3:
            row["messages"] = row["messages"][:1]
        rows.append(row)
    return rows


# ------------------------------------------------------------------- data and labels -------


@pytest.mark.parametrize(("collator", "options"), [
    ("assistant-only", {}),
    ("prompt-weighted", {"prompt_loss_weight": 0.1}),
    ("assistant-only", {"max_length": 40, "truncation": "drop"}),
])
def test_a_stream_is_labelled_exactly_as_the_map_style_data(tmp_path, manager, template,
                                                           tokenizer, collator, options):
    """Same rows in, same rule checks and the same labeller: the same examples, tokens, labels
    and weights, and the same counts of what was skipped and why."""
    path = write_jsonl(tmp_path / "chat.jsonl", mixed_rows(2500), bad={1200: "{oops"})
    made = {"on_bad_example": "skip", **options}
    whole = load_sft_dataset(path, template=template, on_bad_example="skip")
    streamed = load_sft_dataset(path, template=template, on_bad_example="skip", streaming=True)
    assert isinstance(streamed.train, IterableDataset)
    expected = manager.collators.create(collator, **made).prepare(whole.train, tokenizer,
                                                                  template)
    got = manager.collators.create(collator, **made).prepare(streamed.train, tokenizer, template)
    assert list(got.dataset) == expected.dataset.to_list()
    for field in ("total", "kept", "skipped", "first_skips"):
        assert getattr(got.report, field) == getattr(expected.report, field), field
    assert streamed.summary.to_dict()["splits"][0] | {"streaming": False} == \
        whole.summary.to_dict()["splits"][0]


def test_a_bad_line_is_raised_naming_its_file_and_line_when_the_stream_reaches_it(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [conversation(i) for i in range(1500)],
                       bad={1234: '{"messages": ['})
    data = load_sft_dataset(path, streaming=True)  # nothing is read but the first example
    rows = iter(data.train)
    assert next(rows)["source_line"] == 1
    with pytest.raises(DataError, match=r"chat\.jsonl:1235: field '\(line\)': not valid JSON"):
        list(rows)


def test_skips_are_counted_once_however_often_the_stream_is_read(tmp_path, caplog):
    """A look at the first rows, then two whole passes: one pass's counts, each skip quoted
    once in the log as it is met."""
    path = write_jsonl(tmp_path / "chat.jsonl", mixed_rows(2100), bad={5: "[1, 2]"})
    data = load_sft_dataset(path, on_bad_example="skip", streaming=True)
    with caplog.at_level(logging.WARNING, logger="sft_plugins.bad_examples"):
        next(iter(data.train))
        kept = [len(list(data.train)) for _ in range(2)]
    split = data.summary.splits[0]
    assert kept == [1800, 1800]
    assert (split.examples, split.kept) == (2101, 1800)
    assert split.skipped == {"invalid_json": 1, "no_assistant_content": 300}
    assert split.samples[1].startswith(f"{path}:6: field '(line)': a JSON list")
    quoted = [r.getMessage() for r in caplog.records if "chat.jsonl:6:" in r.getMessage()]
    assert len(quoted) == 1 and quoted[0].startswith("train data: skipped ")


def test_streaming_refuses_a_held_out_fraction(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [conversation(i) for i in range(10)])
    with pytest.raises(DataError, match=r"with streaming=True .* pass eval_dataset"):
        load_sft_dataset(path, streaming=True, eval_split_ratio=0.1)


# ------------------------------------------------------------------------- packing -------


def test_the_bounded_packer_keeps_every_token_once_and_nearly_the_fill_of_packing_whole():
    """Best-fit over the next 1 000 examples against best-fit over the whole data set, on
    heavy-tailed lengths: every example packed once, whole; the fill at most 2 points lower."""
    rng = random.Random(0)
    lengths = [min(int(8 * rng.paretovariate(1.3)) + rng.randint(20, 40), 1024)
               for _ in range(6000)]
    rows = [{"input_ids": [i % 50_000 + 3] * n, "labels": [7] * n}
            for i, n in enumerate(lengths)]
    data = Dataset.from_list(rows)
    _, whole = pack_dataset(data, 1024)
    stream, packer = pack_stream(data.to_iterable_dataset(), 1024)
    pieces = []
    for row in stream:
        assert len(row["input_ids"]) <= 1024
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        for a, b in zip(starts, [*starts[1:], len(row["input_ids"])], strict=True):
            pieces.append((row["input_ids"][a], b - a))
    assert sorted(pieces) == sorted((r["input_ids"][0], len(r["input_ids"])) for r in rows)
    report = packer.report()
    assert (report.examples, report.tokens) == (whole.examples, whole.tokens)
    assert packer.buffer_size == DEFAULT_PACKING_BUFFER
    assert report.fill >= whole.fill - 0.02, (report.fill, whole.fill)
    assert report.fill > 0.97


# -------------------------------------------------------------------------- trainer -------


def tiny_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))


def arguments(out: Path, **extra) -> TrainingArguments:
    return TrainingArguments(str(out), **{
        "max_steps": 4, "per_device_train_batch_size": 4, "report_to": [], "use_cpu": True,
        "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, **extra})


def test_the_trainer_refuses_a_stream_without_max_steps_or_with_worker_processes(
        tmp_path, tokenizer):
    stream = Dataset.from_list([{"input_ids": [1, 2], "labels": [1, 2]}]).to_iterable_dataset()
    with pytest.raises(ConfigError, match=r"stream .* has no length.*set max_steps"):
        SFTPluginTrainer(model=tiny_model(tokenizer), train_dataset=stream,
                         args=arguments(tmp_path, max_steps=-1), processing_class=tokenizer)
    with pytest.raises(ConfigError, match="set dataloader_num_workers=0"):
        SFTPluginTrainer(model=tiny_model(tokenizer), train_dataset=stream,
                         args=arguments(tmp_path, dataloader_num_workers=2),
                         processing_class=tokenizer)


def test_streams_of_conversations_train_pack_evaluate_and_report_their_skips(
        tmp_path, template, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", mixed_rows(70), bad={30: "nope"})
    data = load_sft_dataset(path, template=template, on_bad_example="skip", streaming=True,
                            eval_dataset=path)
    trainer = SFTPluginTrainer(model=tiny_model(tokenizer), args=arguments(tmp_path / "out"),
                               train_dataset=data.train, eval_dataset=data.eval,
                               processing_class=tokenizer, template=template, packing=True,
                               packing_max_length=256, data_summary=data.summary)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 and all(h["skipped_examples"] == 11 for h in logged)
    packed = trainer.packer.report()
    assert packed.examples >= 60 and packed.rows < packed.examples
    assert "eval_loss" in trainer.evaluate()
    summary = json.loads((tmp_path / "out" / "data_summary.json").read_text())
    train = summary["splits"][0]
    assert train["streaming"] and train["skipped"] == {"invalid_json": 1,
                                                       "no_assistant_content": 10}
    assert (train["examples"], train["kept"], train["preparation"]["kept"]) == (71, 60, 60)


def test_a_users_own_stream_of_trl_rows_is_labelled_and_picks_the_default_collator(
        tmp_path, manager, tokenizer):
    """A ``datasets`` stream given to the trainer as it is (no ``load_sft_dataset``), with TRL's
    conversational prompt/completion columns: ``completion-only``, labelled as it is read."""
    rows = [{"prompt": [{"role": "user", "content": f"item {i}: sort b a"}],
             "completion": [{"role": "assistant", "content": "a b"}]} for i in range(12)]
    stream = Dataset.from_list(rows).to_iterable_dataset()
    trainer = SFTPluginTrainer(model=tiny_model(tokenizer), args=arguments(tmp_path, max_steps=2),
                               train_dataset=stream, processing_class=tokenizer,
                               template="llama-3.1", plugin_manager=manager)
    assert trainer.collator.name == "completion-only"
    trainer.train()
    assert (trainer.preparation["train"].total, trainer.preparation["train"].kept) == (12, 12)
    assert trainer.stream_sharing == {"train": "whole"}


def test_a_torch_dataset_of_prepared_rows_is_trained_as_it_is(tmp_path, tokenizer):
    """Not a ``datasets`` set (it has no ``column_names``): its rows are taken as prepared."""

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = [tokenizer.bos_token_id, 100 + i, 200 + i, 300 + i]
            return {"input_ids": ids, "labels": [-100, *ids[1:]]}

    trainer = SFTPluginTrainer(model=tiny_model(tokenizer), args=arguments(tmp_path, max_steps=2),
                               train_dataset=Rows(), processing_class=tokenizer,
                               template="llama-3.1", plugin_manager=plugin_manager(
                                   "sft_plugins_templates", "sft_plugins_collators"))
    trainer.train()
    assert [h["loss"] > 0 for h in trainer.state.log_history if "loss" in h] == [True, True]


def test_a_pass_that_gives_nothing_to_train_on_is_an_error(tmp_path, template, tokenizer):
    unanswered = [{"messages": conversation(i)["messages"][:1]} for i in range(5)]
    data = load_sft_dataset(write_jsonl(tmp_path / "chat.jsonl", unanswered),
                            on_bad_example="skip", streaming=True)
    trainer = SFTPluginTrainer(model=tiny_model(tokenizer), args=arguments(tmp_path / "out"),
                               train_dataset=data.train, processing_class=tokenizer,
                               template=template, data_summary=data.summary)
    with pytest.raises(DataError, match=r"a whole pass over the stream gave no example .*"
                                        r"5 no_assistant_content"):
        trainer.train()


# ----------------------------------------------------------------------- command line -------


def test_streaming_without_max_steps_stops_before_any_model_is_loaded(tmp_path, monkeypatch):
    import sft_plugins.modeling
    import sft_plugins.training

    def never(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    for module in (sft_plugins.modeling, sft_plugins.training):
        monkeypatch.setattr(module, "load_model", never)
        monkeypatch.setattr(module, "load_tokenizer", never)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "train", "--model_name_or_path", str(tmp_path / "no-model"), "--dataset",
        str(tmp_path / "no-data.jsonl"), "--output_dir", str(out), "--streaming", "true"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines == ["error: --streaming needs --max_steps: a stream has no length, so the "
                     "number of optimizer steps cannot follow from --num_train_epochs; give "
                     "--max_steps N"]
    assert not out.exists()


@pytest.mark.parametrize(("extra", "words"), [
    (["--streaming", "true", "--max_steps", "2", "--eval_split_ratio", "0.1"],
     "--eval_split_ratio needs the whole data set"),
    (["--streaming", "true", "--max_steps", "2", "--dataloader_num_workers", "2"],
     "--dataloader_num_workers 2"),
    (["--packing_buffer", "100"], "--packing_buffer applies to --streaming --packing"),
    (["--streaming", "true", "--max_steps", "2", "--packing_buffer", "0"], "--packing_buffer 0"),
])
def test_flags_a_stream_cannot_honour_are_one_line_before_anything_loads(tmp_path, extra, words):
    result = CliRunner().invoke(main, ["train", "--model_name_or_path", str(tmp_path / "m"),
                                       "--dataset", "d.jsonl", "--output_dir",
                                       str(tmp_path / "out"), *extra])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines


def cli_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model_name_or_path", str(model), "--dataset", str(data), "--template",
            "llama-3.1", "--output_dir", str(out), "--streaming", "true", "--max_steps", "70",
            "--per_device_train_batch_size", "16", "--learning_rate", "1e-3", "--report_to",
            "none", "--use_cpu", "true", "--logging_steps", "10", "--disable_tqdm", "true",
            "--save_steps", "25", *extra]


@pytest.mark.slow
def test_a_malformed_line_stops_training_at_it_and_leaves_the_last_checkpoint(
        chat_model_dir, tmp_path):
    """Line 1 001 is reached in step 63 (16 examples a step, read a thousand lines at a time):
    with error, training stops there naming the line, checkpoint-50 complete and nothing after
    it; with skip, it is counted, logged and reported, and training runs to the end."""
    data = write_jsonl(tmp_path / "big.jsonl", [conversation(i) for i in range(1100)],
                       bad={1000: '{"messages": ['})
    out = tmp_path / "err"
    stopped = CliRunner().invoke(main, cli_args(chat_model_dir, data, out))
    assert stopped.exit_code == 2
    errors = [line for line in stopped.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stopped.output[-3000:]
    assert errors[0].startswith(f"error: {data}:1001: field '(line)': not valid JSON")
    assert "Traceback" not in stopped.output
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-25", "checkpoint-50"]
    assert (out / "checkpoint-50" / "sft_plugins_complete.json").is_file()
    state = json.loads((out / "checkpoint-50" / "trainer_state.json").read_text())
    assert state["global_step"] == 50
    assert not (out / "model.safetensors").exists()

    out = tmp_path / "skip"
    trained = CliRunner().invoke(main, cli_args(chat_model_dir, data, out, "--on_bad_example",
                                                "skip"))
    assert trained.exit_code == 0, trained.output[-3000:]
    assert (out / "model.safetensors").exists()
    summary = json.loads((out / "data_summary.json").read_text())["splits"][0]
    assert summary["skipped"] == {"invalid_json": 1}
    assert summary["samples"][0].startswith(f"{data}:1001: ")
    assert (summary["examples"], summary["kept"]) == (1101, 1100)
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [h["skipped_examples"] for h in state["log_history"] if "loss" in h]
    assert logged[:6] == [0] * 6 and logged[6:] == [1]  # known once line 1 001 was read


@pytest.mark.slow
def test_a_streamed_run_resumed_from_a_checkpoint_reaches_the_same_losses(chat_model_dir,
                                                                         tmp_path):
    """The Trainer re-reads (and labels again) the batches already trained, so the resumed run
    continues with the examples the uninterrupted run trained next."""
    data = write_jsonl(tmp_path / "items.jsonl", [conversation(i, 1 + i % 5) for i in range(300)])

    def train(out: Path, steps: str, *extra: str) -> list[float]:
        args = cli_args(chat_model_dir, data, out, "--lr_scheduler_type", "constant",
                        "--logging_steps", "1", "--save_steps", "6", *extra)
        args[args.index("--max_steps") + 1] = steps
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output[-3000:]
        state = json.loads((out / "trainer_state.json").read_text())
        return [h["loss"] for h in state["log_history"] if "loss" in h]

    whole = train(tmp_path / "whole", "24")  # 19 batches a pass: steps 20-24 in the second
    train(tmp_path / "part", "6")
    resumed = train(tmp_path / "part", "12", "--resume_from_checkpoint",
                    str(tmp_path / "part" / "checkpoint-6"))
    assert len(whole) == 24 and resumed == pytest.approx(whole[:12], rel=1e-5)
    # from the second pass, transformers would skip 24 batches of the first, find none left
    # and stop with a warning as if done: refused, naming the step
    refused = CliRunner().invoke(main, cli_args(
        chat_model_dir, data, tmp_path / "more", "--resume_from_checkpoint",
        str(tmp_path / "whole" / "checkpoint-24"), "--save_steps", "6"))
    assert refused.exit_code == 2
    assert "error: cannot resume at step 24: the Trainer resumes a stream" in refused.output
