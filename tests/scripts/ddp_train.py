"""Train a tiny model with SFTPluginTrainer; run it alone or under ``torchrun``.

Every optimizer step sees the whole 8-example data set (8 per device alone, 4 per device on two
ranks), so a single process and two ranks optimise the same objective step by step. Writes the
per-step losses and the final weights of this rank to ``OUT/rank<k>.pt``.
"""

from __future__ import annotations

import os
import sys

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

from sft_plugins.processes import end_process_group
from sft_plugins.trainer import SFTPluginTrainer


def data() -> Dataset:
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(8):
        length = 5 + 2 * i
        ids = torch.randint(3, 64, (length,), generator=g).tolist()
        start = length - 1 - (i * 3) % 7  # trained-token counts differ between ranks
        rows.append({"input_ids": ids, "attention_mask": [1] * length,
                     "labels": [-100] * start + ids[start:]})
    return Dataset.from_list(rows)


def pad(features):
    width = max(len(f["input_ids"]) for f in features)
    return {key: torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features])
            for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100))}


class LossRecorder(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2))
    args = TrainingArguments(
        output_dir=out, max_steps=3, per_device_train_batch_size=8 // world,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, ddp_backend="gloo" if world > 1 else None, seed=5,
        disable_tqdm=True,
    )
    recorder = LossRecorder()
    trainer = SFTPluginTrainer(model=model, args=args, train_dataset=data(), data_collator=pad,
                               callbacks=[recorder])
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save({"losses": recorder.losses, "weights": weights},
               os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()  # the trainer is out of reach: it is freed first
