"""Template + collator + trainer together on the shipped tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
    TrainingArguments,
)

from sft_plugins import get_plugin_manager
from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.trainer import SFTPluginTrainer

CONVERSATIONS = [
    {"prompt": [{"role": "user", "content": "Sort the letters: c a b"}],
     "completion": [{"role": "assistant", "content": "a b c"}]},
    {"prompt": [{"role": "user", "content": "Sort the letters: q p r z x y"}],
     "completion": [{"role": "assistant", "content": "p q r x y z"}]},
]


def tiny_model_and_tokenizer() -> tuple:
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128))
    return tokenizer, model


def test_preparation_ignores_padding_left_on_the_tokenizer_by_a_batched_call():
    """A `tokenizer(texts, padding=True)` call switches padding on in the shared backend; the
    prepared rows must still be the unpadded examples."""
    manager = get_plugin_manager()
    template = manager.templates.get("llama-3.1")
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    template.configure_tokenizer(tokenizer)
    collator = manager.collators.create("completion-only")
    clean = collator.prepare(Dataset.from_list(CONVERSATIONS), tokenizer, template).dataset
    tokenizer(["a", "a much longer text than the first"], padding=True, padding_side="left")
    after = collator.prepare(Dataset.from_list(CONVERSATIONS), tokenizer, template,
                             load_from_cache_file=False).dataset
    assert after["input_ids"] == clean["input_ids"]
    assert len(after["input_ids"][0]) < len(after["input_ids"][1])


def test_trainer_prepares_conversations_and_reports(tmp_path):
    tokenizer, model = tiny_model_and_tokenizer()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[],
                             per_device_train_batch_size=2, use_cpu=True, save_strategy="no")
    trainer = SFTPluginTrainer(model=model, args=args, train_dataset=Dataset.from_list(
        CONVERSATIONS * 2), processing_class=tokenizer, template="llama-3.1",
        collator="completion-only", perturber="neftune", perturber_options={"alpha": 5})
    assert trainer.preparation["train"].kept == 4
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"
    trainer.train()
    summary = json.loads((tmp_path / "data_summary.json").read_text())
    assert summary["splits"][0]["preparation"]["kept"] == 4
    embeddings = model.get_input_embeddings()
    assert not embeddings._forward_hooks, "the perturber's hook outlives training"


class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise RuntimeError("out of memory, say")


def test_an_exception_during_training_leaves_no_hook_and_the_last_checkpoint(tmp_path):
    tokenizer, model = tiny_model_and_tokenizer()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, report_to=[],
                             per_device_train_batch_size=2, use_cpu=True,
                             save_strategy="steps", save_steps=2)
    trainer = SFTPluginTrainer(model=model, args=args, train_dataset=Dataset.from_list(
        CONVERSATIONS * 4), processing_class=tokenizer, template="llama-3.1",
        collator="completion-only", perturber="gaussian", callbacks=[Boom()])
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train()
    assert not model.get_input_embeddings()._forward_hooks
    assert not model._forward_pre_hooks and not model._forward_hooks
    restored = LlamaForCausalLM.from_pretrained(tmp_path / "checkpoint-2")
    assert restored.config.vocab_size == len(tokenizer)


class HalfWeight(SFTPluginTrainer):
    """A subclass that counts every token at half weight in the normaliser."""

    def loss_weight_total(self, batch):
        return super().loss_weight_total(batch) / 2


def test_subclass_overrides_the_normaliser(tmp_path):
    tokenizer, model = tiny_model_and_tokenizer()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    kwargs = {"model": model, "args": args, "processing_class": tokenizer,
              "template": "llama-3.1", "collator": "completion-only",
              "train_dataset": Dataset.from_list(CONVERSATIONS)}
    base, half = SFTPluginTrainer(**kwargs), HalfWeight(**kwargs)
    batch = base.data_collator([base.train_dataset[i] for i in range(2)])
    model.train()
    with torch.no_grad():
        plain = base.compute_loss(model, dict(batch),
                                  num_items_in_batch=base.loss_weight_total(batch))
        halved = half.compute_loss(model, dict(batch),
                                   num_items_in_batch=half.loss_weight_total(batch))
    assert halved.item() == pytest.approx(2 * plain.item(), rel=1e-6)


class EmbeddingRecorder(TrainerCallback):
    """Records the clean embeddings and what the embedding module emits (after any
    perturber) during training."""

    def __init__(self):
        self.outputs, self.hook = [], None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.hook is None:
            self.hook = model.get_input_embeddings().register_forward_hook(
                lambda module, inputs, output: self.outputs.append(
                    (module.weight[inputs[0]].detach(), output.detach())))


def test_noise_spares_the_prompt_when_asked(tmp_path):
    tokenizer, model = tiny_model_and_tokenizer()
    recorder = EmbeddingRecorder()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[],
                             per_device_train_batch_size=2, use_cpu=True, save_strategy="no")
    trainer = SFTPluginTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(CONVERSATIONS),
        processing_class=tokenizer, template="llama-3.1", collator="completion-only",
        perturber="neftune", perturber_options={"alpha": 50.0, "noise_prompt": False},
        callbacks=[recorder])
    trainer.train()
    recorder.hook.remove()
    [(clean, noisy)] = recorder.outputs
    changed = (noisy - clean).abs().sum(-1) > 0
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trained = batch["labels"] != -100
    assert changed.any()
    assert not (changed & ~trained[:, : changed.shape[1]]).any()


def test_packing_after_a_skipped_example_trains_only_the_kept_ones(tmp_path):
    """Preparation drops a skipped example with Dataset.filter, which leaves the row under an
    indices mapping; packing, the embedding check and the token summary must not see it."""

    tokenizer, model = tiny_model_and_tokenizer()
    empty = {"prompt": [{"role": "user", "content": "Sort the letters: z y"}],
             "completion": [{"role": "assistant", "content": ""}]}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no")
    trainer = SFTPluginTrainer(
        model=model, args=args, train_dataset=Dataset.from_list([CONVERSATIONS[0], empty,
                                                                 CONVERSATIONS[1]]),
        processing_class=tokenizer, template="llama-3.1", collator="completion-only",
        collator_options={"on_bad_example": "skip", "max_length": 256}, packing=True)
    assert trainer.preparation["train"].kept == 2
    [row] = list(trainer.train_dataset)
    text = tokenizer.decode(row["input_ids"])
    assert "c a b" in text and "q p r z x y" in text and "z y" not in text
    trainer.train()


def test_the_embedding_check_and_summary_read_only_the_rows_of_a_view(tmp_path):
    from sft_plugins.given_data import trained_token_summary

    rows = Dataset.from_dict({"input_ids": [[1, 2], [10**6, 7], [3]],
                              "labels": [[-100, 2], [10**6, 7], [3]]})
    view = rows.select([0, 2])
    assert trained_token_summary(view) == "3 tokens, 2 trained (66.7%)"
    tokenizer, model = tiny_model_and_tokenizer()
    trainer = SFTPluginTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[],
                                                                   use_cpu=True),
                               train_dataset=view, processing_class=tokenizer,
                               template="llama-3.1")
    assert len(trainer.train_dataset) == 2


def trainer_for(tmp_path, train, **kwargs):
    tokenizer, model = tiny_model_and_tokenizer()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", per_device_eval_batch_size=2)
    return SFTPluginTrainer(model=model, args=args, train_dataset=train,
                            processing_class=tokenizer, template="llama-3.1",
                            collator="completion-only", **kwargs)


def test_evaluate_and_predict_prepare_conversations_given_to_them(tmp_path):
    trainer = trainer_for(tmp_path, Dataset.from_list(CONVERSATIONS))
    raw = Dataset.from_list(CONVERSATIONS)
    metrics = trainer.evaluate(eval_dataset=raw)
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    both = trainer.evaluate(eval_dataset={"a": raw, "b": raw.select([0])})
    assert {"eval_a_loss", "eval_b_loss"} <= set(both)
    prediction = trainer.predict(raw)
    assert prediction.predictions is not None and "test_loss" in prediction.metrics


def test_pre_tokenized_rows_get_labels_from_a_token_mask_or_are_refused(tmp_path):
    from sft_plugins.errors import DataError

    rows = {"input_ids": [[5, 6, 7, 8], [9, 10, 11]],
            "assistant_masks": [[0, 0, 1, 1], [0, 1, 1]]}
    trainer = trainer_for(tmp_path, Dataset.from_dict(rows))
    assert trainer.train_dataset["labels"] == [[-100, -100, 7, 8], [-100, 10, 11]]
    assert "assistant_masks" not in trainer.train_dataset.column_names
    trainer.train()
    completion = {"input_ids": [[5, 6]], "completion_mask": [[0, 1]]}
    assert trainer_for(tmp_path, Dataset.from_dict(completion)).train_dataset["labels"] == [
        [-100, 6]]
    with pytest.raises(DataError, match="train rows have input_ids but no labels column"):
        trainer_for(tmp_path, Dataset.from_dict({"input_ids": [[5, 6]]}))
    with pytest.raises(DataError, match="assistant_masks has 1 entries for 2 input_ids"):
        trainer_for(tmp_path, Dataset.from_dict({"input_ids": [[5, 6]],
                                                 "assistant_masks": [[1]]}))


def test_preparation_that_keeps_no_example_is_an_error_with_its_report(tmp_path):
    from sft_plugins.errors import DataError

    with pytest.raises(DataError, match=r"^train: preparation kept none of the 2 examples "
                                        r"\(skipped: 2 too_long; the first: example 0: [^\n]*"
                                        r"nothing to train on"):
        trainer_for(tmp_path, Dataset.from_list(CONVERSATIONS),
                    collator_options={"max_length": 8, "truncation": "drop"})
