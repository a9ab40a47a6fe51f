"""Train a tiny model for STEPS steps, saving a checkpoint after every one: a process to kill
while it saves (tests/test_checkpoint_faults.py). ``python save_every_step.py OUT``."""

from __future__ import annotations

import sys

import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainingArguments

from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.trainer import SFTPluginTrainer

STEPS = 8


def build(out: str, **overrides: object) -> SFTPluginTrainer:
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    rows = [{"prompt": [{"role": "user", "content": f"Sort the letters: {w}"}],
             "completion": [{"role": "assistant", "content": " ".join(sorted(w.split()))}]}
            for w in ("c a b", "q p r", "z x y", "m k l", "f d e", "j h i", "w u v", "t r s")]
    args = TrainingArguments(output_dir=out, max_steps=STEPS, per_device_train_batch_size=2,
                             learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1,
                             save_strategy="steps", save_steps=1, report_to=[], use_cpu=True,
                             seed=3, disable_tqdm=True, **overrides)
    return SFTPluginTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer, template="llama-3.1",
                            collator="completion-only", perturber="neftune",
                            perturber_options={"alpha": 5.0})


if __name__ == "__main__":
    build(sys.argv[1]).train()
