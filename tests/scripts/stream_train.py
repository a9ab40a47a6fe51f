"""Train a tiny model on a stream (``load_sft_dataset(..., streaming=True)``); alone or under
``torchrun``.

``stream_train.py OUT BATCH STEPS FILE [FILE ...]``: per-device batch ``BATCH`` for ``STEPS``
optimizer steps. Every user message names its example (``item N``); this rank writes to
``OUT/rank<k>.json`` the items it trained, with the pass over the stream each came in, and the
logged losses. The trainer writes ``OUT/data_summary.json``.
"""

from __future__ import annotations

import json
import os
import re
import sys

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainingArguments

from sft_plugins import get_plugin_manager
from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.data import load_sft_dataset
from sft_plugins.loss import IGNORE_INDEX
from sft_plugins.processes import end_process_group
from sft_plugins.trainer import SFTPluginTrainer


class Recording(SFTPluginTrainer):
    """Records which items each micro-batch trains (zero-weight fillers train none)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, int]] = []
        self.passes = 0
        self._iterator = None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if epoch_iterator is not self._iterator:
            self._iterator, self.passes = epoch_iterator, self.passes + 1
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            for ids, mask, labels in zip(inputs["input_ids"], inputs["attention_mask"],
                                         inputs["labels"], strict=True):
                if bool((labels != IGNORE_INDEX).any()):
                    text = self.processing_class.decode(ids[mask.bool()].tolist())
                    self.seen.append((self.passes, int(re.search(r"item (\d+)", text)[1])))
        return super().compute_loss(model, inputs, *args, **kwargs)


def main(out: str, batch: int, steps: int, files: list[str]) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    template = get_plugin_manager().templates.get("llama-3.1")
    data = load_sft_dataset(files, template=template, on_bad_example="skip", streaming=True)
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, ddp_backend="gloo" if world > 1 else None, seed=5,
        disable_tqdm=True)
    trainer = Recording(model=model, args=args, train_dataset=data.train,
                        processing_class=tokenizer, template=template,
                        data_summary=data.summary)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({"seen": trainer.seen, "losses": losses,
                   "sharing": trainer.stream_sharing["train"]}, handle)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
    end_process_group()  # the trainer is out of reach: it is freed first
