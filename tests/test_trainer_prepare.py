"""``SFTPluginTrainer`` runs ``Trainer.__init__`` first, then prepares every split through
``prepare_dataset`` (the documented extension point) on the main process first; without
``collator=`` the training data picks the collator, by the same rule as the CLI."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from datasets import Dataset
from test_integration import tiny_model_and_tokenizer
from transformers import TrainingArguments

import sft_plugins.trainer as trainer_module
from sft_plugins.errors import DataError
from sft_plugins.trainer import SFTPluginTrainer

PROMPT_COMPLETION = [
    {"prompt": [{"role": "user", "content": "Sort the letters: c a b"}],
     "completion": [{"role": "assistant", "content": "a b c"}]},
    {"prompt": [{"role": "user", "content": "Sort the letters: q p r z"}],
     "completion": [{"role": "assistant", "content": "p q r z"}]},
]
STRING_PROMPT_COMPLETION = [{"prompt": "Sort the letters: c a b\n", "completion": "a b c"},
                            {"prompt": "Sort the letters: q p r\n", "completion": "p q r"}]
MESSAGES = [{"messages": [*row["prompt"], *row["completion"]]} for row in PROMPT_COMPLETION]
TEXT = [{"text": "The sorted letters are a b c."}, {"text": "The sorted letters are p q r."}]


def arguments(tmp_path: Any, **overrides: Any) -> TrainingArguments:
    options: dict[str, Any] = {
        "output_dir": str(tmp_path), "max_steps": 1, "report_to": [], "use_cpu": True,
        "save_strategy": "no", "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2, "disable_tqdm": True}
    return TrainingArguments(**{**options, **overrides})


class FirstRowOnly(SFTPluginTrainer):
    """Keeps the first prepared row of every split; records what the trainer offered while
    preparing, and the input ids of every batch it trains on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        self.batches: list[list[list[int]]] = []
        super().__init__(*args, **kwargs)

    def prepare_dataset(self, dataset: Dataset, split: str) -> Dataset:
        self.calls.append({"split": split, "output_dir": self.args.output_dir,
                           "process_index": self.accelerator.process_index,
                           "tokenizer": self.processing_class, "collator": self.collator.name,
                           "template": self.chat_template.name})
        return super().prepare_dataset(dataset, split).select([0])

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any,
                     **kwargs: Any) -> Any:
        if model.training:
            self.batches.append(inputs["input_ids"].tolist())
        return super().compute_loss(model, inputs, *args, **kwargs)


def test_an_override_of_prepare_dataset_uses_the_trainer_and_its_rows_are_trained(tmp_path):
    tokenizer, model = tiny_model_and_tokenizer()
    trainer = FirstRowOnly(
        model=model, args=arguments(tmp_path), processing_class=tokenizer,
        template="llama-3.1", collator="completion-only",
        train_dataset=Dataset.from_list(PROMPT_COMPLETION),
        eval_dataset={"a": Dataset.from_list(PROMPT_COMPLETION),
                      "b": Dataset.from_list(PROMPT_COMPLETION[::-1])})

    assert [call["split"] for call in trainer.calls] == ["train", "eval-a", "eval-b"]
    for call in trainer.calls:
        assert call["output_dir"] == str(tmp_path) and call["process_index"] == 0
        assert call["tokenizer"] is tokenizer
        assert (call["collator"], call["template"]) == ("completion-only", "llama-3.1")
    assert trainer.preparation["train"].kept == 2  # the default preparation ran underneath
    assert len(trainer.train_dataset) == 1
    assert {name: len(rows) for name, rows in trainer.eval_dataset.items()} == {"a": 1, "b": 1}
    kept = trainer.train_dataset[0]["input_ids"]
    assert trainer.eval_dataset["b"][0]["input_ids"] != kept

    result = trainer.train()
    assert result.global_step == 1
    assert trainer.batches == [[kept]]


def test_a_single_eval_set_is_the_eval_split(tmp_path):
    tokenizer, model = tiny_model_and_tokenizer()
    trainer = FirstRowOnly(model=model, args=arguments(tmp_path), processing_class=tokenizer,
                           template="llama-3.1", collator="completion-only",
                           eval_dataset=Dataset.from_list(PROMPT_COMPLETION))
    assert [call["split"] for call in trainer.calls] == ["eval"]
    assert trainer.train_dataset is None and len(trainer.eval_dataset) == 1


def test_data_sets_are_prepared_and_packed_inside_main_process_first(tmp_path, monkeypatch):
    """Rank 0 prepares (and writes the datasets cache) while the other ranks wait at
    ``main_process_first``'s barrier; here it is recorded on one process."""
    original = TrainingArguments.main_process_first
    entered: list[str] = []
    seen: list[tuple[str, list[str]]] = []

    @contextlib.contextmanager
    def recording(self: TrainingArguments, *args: Any, **kwargs: Any) -> Iterator[None]:
        with original(self, *args, **kwargs):
            entered.append(kwargs.get("desc", "work"))
            try:
                yield
            finally:
                entered.pop()

    prepare = SFTPluginTrainer.prepare_dataset
    pack = trainer_module.pack_prepared

    def recorded_prepare(self: SFTPluginTrainer, dataset: Dataset, split: str) -> Dataset:
        seen.append((split, list(entered)))
        return prepare(self, dataset, split)

    def recorded_pack(dataset: Dataset, *args: Any, **kwargs: Any) -> Dataset:
        seen.append(("pack", list(entered)))
        return pack(dataset, *args, **kwargs)

    monkeypatch.setattr(TrainingArguments, "main_process_first", recording)
    monkeypatch.setattr(SFTPluginTrainer, "prepare_dataset", recorded_prepare)
    monkeypatch.setattr(trainer_module, "pack_prepared", recorded_pack)
    tokenizer, model = tiny_model_and_tokenizer()
    trainer = SFTPluginTrainer(
        model=model, args=arguments(tmp_path), processing_class=tokenizer,
        template="llama-3.1", collator="completion-only", packing=True,
        packing_max_length=128, train_dataset=Dataset.from_list(PROMPT_COMPLETION),
        eval_dataset=Dataset.from_list(PROMPT_COMPLETION))

    assert [split for split, _ in seen] == ["train", "pack", "eval"]
    for split, inside in seen:
        assert len(inside) == 1, f"{split} was prepared outside main_process_first"
    assert not entered
    assert "position_ids" in trainer.train_dataset.column_names
    assert trainer.train().global_step == 1
    seen.clear()
    trainer.evaluate(Dataset.from_list(PROMPT_COMPLETION))  # a set passed later: the same
    assert seen == [("eval", ["sft-plugins: preparing eval"])]


@pytest.mark.parametrize(("rows", "name"), [
    (PROMPT_COMPLETION, "completion-only"),
    (STRING_PROMPT_COMPLETION, "completion-only"),
    (TEXT, "all-tokens"),
    (MESSAGES, "assistant-only"),
])
def test_without_collator_the_training_data_picks_it(tmp_path, rows, name):
    tokenizer, model = tiny_model_and_tokenizer()
    trainer = SFTPluginTrainer(model=model, args=arguments(tmp_path),
                               processing_class=tokenizer, template="llama-3.1",
                               train_dataset=Dataset.from_list(rows),
                               collator_options={"max_length": 128})
    assert trainer.collator.name == name
    assert trainer.collator.max_length == 128  # the options go to the default collator
    assert trainer.preparation["train"].kept == len(rows)
    assert trainer.train().global_step == 1


def test_without_training_data_the_default_collator_is_assistant_only(tmp_path):
    tokenizer, model = tiny_model_and_tokenizer()
    trainer = SFTPluginTrainer(model=model, args=arguments(tmp_path),
                               processing_class=tokenizer, template="llama-3.1",
                               eval_dataset=Dataset.from_list(PROMPT_COMPLETION))
    assert trainer.collator.name == "assistant-only"


@pytest.mark.parametrize(("rows", "name"), [
    (PROMPT_COMPLETION, "completion-only"),
    (STRING_PROMPT_COMPLETION, "completion-only"),
    (TEXT, "all-tokens"),
    (MESSAGES, "assistant-only"),
])
def test_raw_rows_and_the_clis_canonical_rows_get_the_same_default(rows, name):
    """The library sees TRL's rows; ``sft-plugins train`` sees them canonicalised by
    ``load_sft_dataset`` (``completion_index``/``completion_offset``)."""
    from sft_plugins.data import load_sft_dataset
    from sft_plugins.given_data import default_collator_name

    raw = Dataset.from_list(rows)
    assert default_collator_name(raw) == name
    assert default_collator_name(load_sft_dataset(raw).train) == name


def test_default_collator_name_reads_set_indices_and_offsets():
    from sft_plugins.given_data import DEFAULT_COLLATOR_SAMPLE, default_collator_name

    conversation = MESSAGES[0]["messages"]
    assert default_collator_name(None) == "assistant-only"
    assert default_collator_name(Dataset.from_dict({"input_ids": [[1, 2]],
                                                    "labels": [[-100, 2]]})) == "assistant-only"
    indexed = Dataset.from_list([{"messages": conversation, "completion_index": None},
                                 {"messages": conversation, "completion_index": 1}])
    assert default_collator_name(indexed) == "completion-only"
    assert default_collator_name(indexed.select([0])) == "assistant-only"
    late = Dataset.from_list([{"messages": conversation, "completion_index": None}]
                             * DEFAULT_COLLATOR_SAMPLE
                             + [{"messages": conversation, "completion_index": 1}])
    assert default_collator_name(late) == "assistant-only"  # as the CLI: the first rows decide
    offsets = Dataset.from_list([{"text": "Q: 2+2= 4", "completion_offset": None},
                                 {"text": "Q: 2+2= 4", "completion_offset": 7}])
    assert default_collator_name(offsets) == "completion-only"
    assert default_collator_name(offsets.select([0])) == "all-tokens"


class Rows:
    """A torch-style data set: a length and rows by index, nothing of ``datasets``."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


@pytest.mark.parametrize("wrap", [list, Rows])
def test_rows_the_trainer_does_not_prepare_must_be_tokenized(tmp_path, wrap):
    """A list or a torch-style data set is used as it is: conversations in one are refused at
    construction (they used to reach the collator and fail at step 1 with KeyError
    'input_ids'), tokenized rows train."""
    tokenizer, model = tiny_model_and_tokenizer()
    build = lambda rows: SFTPluginTrainer(  # noqa: E731
        model=model, args=arguments(tmp_path), processing_class=tokenizer,
        template="llama-3.1", train_dataset=rows)
    with pytest.raises(DataError, match=rf"^train: a {wrap.__name__} is used as it is, .* no "
                                        r"'input_ids' \(its keys: messages\); pass datasets"):
        build(wrap(MESSAGES))
    tokenized = build(Dataset.from_list(MESSAGES)).train_dataset.to_list()
    assert build(wrap(tokenized)).train().global_step == 1
