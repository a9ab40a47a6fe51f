"""SFTPluginTrainer's loss: normalised over the optimizer step, equal to a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

from sft_plugins.trainer import SFTPluginTrainer

VOCAB = 64


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    return LlamaForCausalLM(config)


def examples(weighted: bool) -> Dataset:
    """Eight examples of different lengths whose trained-token counts differ a lot, so that a
    per-micro-batch mean would weigh them differently from the step's mean."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(8):
        length = 4 + 3 * i
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        trained_from = length - (1 + i * i % 7)
        labels = [-100] * trained_from + ids[trained_from:]
        row = {"input_ids": ids, "attention_mask": [1] * length, "labels": labels}
        if weighted:
            row["loss_weights"] = [0.1] * trained_from + [1.0] * (length - trained_from)
            row["labels"] = ids[:]  # every token trained, the prompt at weight 0.1
        rows.append(row)
    return Dataset.from_list(rows)


def pad(features):
    width = max(len(f["input_ids"]) for f in features)
    batch = {}
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100),
                      ("loss_weights", 0.0)):
        if key in features[0]:
            batch[key] = torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features])
    return batch


class GradientRecorder(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def step_gradients(tmp_path, batch_size: int, accumulation: int, weighted: bool):
    recorder = GradientRecorder()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"b{batch_size}-k{accumulation}"), max_steps=1,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=True, seed=3, dataloader_drop_last=False, max_grad_norm=0.0,
    )
    trainer = SFTPluginTrainer(model=tiny_model(), args=args, train_dataset=examples(weighted),
                               data_collator=pad, callbacks=[recorder])
    trainer.train()
    return recorder.grads


@pytest.mark.parametrize("weighted", [False, True])
def test_gradient_accumulation_gives_the_full_batch_gradient(tmp_path, weighted):
    """Accumulating 4 micro-batches of 2 equals one batch of 8 (float32; rtol 1e-4, atol 1e-6:
    only summation order differs)."""
    full = step_gradients(tmp_path, batch_size=8, accumulation=1, weighted=weighted)
    accumulated = step_gradients(tmp_path, batch_size=2, accumulation=4, weighted=weighted)
    assert full.keys() == accumulated.keys()
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-6,
                                   msg=name)


def hand_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    total, weight_total = 0.0, 0.0
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            target, w = int(labels[b, i + 1]), float(weights[b, i + 1])
            if target == -100 or w == 0:
                continue
            row = logits[b, i].double()
            nll = float(torch.logsumexp(row, 0) - row[target])
            total += w * nll
            weight_total += w
    return total / weight_total


@pytest.mark.parametrize("training", [False, True])
def test_loss_equals_hand_computed_weighted_cross_entropy(tmp_path, training):
    model = tiny_model()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = SFTPluginTrainer(model=model, args=args, data_collator=pad)
    batch = pad(examples(weighted=True).select(range(3)).to_list())
    model.train(training)
    loss = trainer.compute_loss(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
    assert loss.item() == pytest.approx(hand_loss(logits, batch["labels"],
                                                  batch["loss_weights"]), rel=1e-5)
    assert math.isfinite(loss.item())


def test_lm_head_with_adapter_uses_full_logits_and_the_same_loss(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                    init_lora_weights=False))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = SFTPluginTrainer(model=model, args=args, data_collator=pad)
    batch = pad(examples(weighted=False).select(range(3)).to_list())
    model.train()
    loss = trainer.compute_loss(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
    ones = torch.ones_like(batch["labels"], dtype=torch.float32)
    assert loss.item() == pytest.approx(hand_loss(logits, batch["labels"], ones), rel=1e-5)
