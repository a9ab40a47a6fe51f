"""The collators outside our trainer: a plain ``transformers.Trainer`` takes a prepared data set
and a collator as its ``data_collator`` and trains."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from test_masking_support import llama_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from sft_plugins.testing import plugin_manager

CONVERSATION = [{"role": "user", "content": "Sort: c a b"},
                {"role": "assistant", "content": "a b c"},
                {"role": "user", "content": "Sort: z y"},
                {"role": "assistant", "content": "y z"}]


@pytest.mark.parametrize("name", ["assistant-only", "last-turn"])
def test_a_plain_trainer_trains_with_a_collator_and_a_prepared_dataset(
        tmp_path: Path, name: str) -> None:
    manager = plugin_manager("sft_plugins_templates", "sft_plugins_collators")
    template = manager.templates.get("llama-3.1")
    tokenizer = template.configure_tokenizer(llama_tokenizer())
    collator = manager.collators.create(name, pad_to_multiple_of=8)
    rows = [{"messages": CONVERSATION[: 2 + 2 * (i % 2)]} for i in range(8)]
    prepared = collator.prepare(Dataset.from_list(rows), tokenizer, template, desc=None)

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=collator.pad_token_id))
    before = model.lm_head.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                             max_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True,
                             logging_steps=1, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=prepared.dataset,
                      data_collator=collator)
    result = trainer.train()

    assert result.global_step == 2 and math.isfinite(result.training_loss)
    assert not torch.equal(before, model.lm_head.weight.detach())
    batch = collator([prepared.dataset[i] for i in range(4)])
    assert batch["input_ids"].shape[1] % 8 == 0
    assert (batch["labels"] != -100).sum() > 0
    assert not (batch["input_ids"] == tokenizer.convert_tokens_to_ids(template.eos_token))[
        batch["attention_mask"] == 0].any()  # pads are never the end-of-turn token
