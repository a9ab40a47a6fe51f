"""Data preparation (tokenize + mask) against TRL's own, on the same data and tokenizer.

    python -m benchmarks.data_prep [--examples 20000] [--seed 0] [--rounds 1]

Builds conversational prompt/completion examples (optional system message, one to three user
turns, the last assistant answer as the completion), installs the ``llama-3.1`` template on the
shipped Llama 3 tokenizer, and times, in one process:

- ours: ``completion-only`` collator, ``prepare`` (render, one batched fast-tokenizer call per
  1 000 examples, masks from the template's spans and the tokens' byte lengths);
- TRL 1.16: ``SFTTrainer._prepare_dataset`` with ``completion_only_loss=True`` (the method the
  trainer runs on its training set: two ``apply_chat_template`` calls per example, common prefix,
  labels), called on a trainer built around a tiny random Llama.

It then checks that both produce identical ``input_ids`` and ``labels`` and prints examples per
second and the ratio (the median over ``--rounds`` alternating rounds: on a shared machine one
round is noisy). The tokenizer's own thread pool is on unless ``TOKENIZERS_PARALLELISM=false``
is set in the environment (TRL tokenizes one example per call, so it gains nothing from it).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import datasets
from datasets import Dataset

_PHRASE = ("the model learns to answer questions about numbers words lists and code 🦙 "
           "sort these letters please explain why it works in one short sentence, then "
           "give an example: 12 345 é 中文 x+y=z")
WORDS = tuple(_PHRASE.split(" "))


def make_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` conversational prompt/completion examples, deterministic for a seed."""
    rng = random.Random(seed)

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    rows = []
    for _ in range(n):
        prompt = [{"role": "system", "content": sentence(3, 12)}] if rng.random() < 0.3 else []
        for turn in range(rng.randint(1, 3)):
            if turn:
                prompt.append({"role": "assistant", "content": sentence(5, 40)})
            prompt.append({"role": "user", "content": sentence(5, 40)})
        rows.append({"prompt": prompt,
                     "completion": [{"role": "assistant", "content": sentence(5, 60)}]})
    return rows


def our_preparation(tokenizer: Any, template: Any) -> Callable[[Dataset], Dataset]:
    from sft_plugins.testing import plugin_manager

    collator = plugin_manager("sft_plugins_collators").collators.create("completion-only")
    return lambda dataset: collator.prepare(dataset, tokenizer, template, desc=None).dataset


def trl_preparation(tokenizer: Any, output_dir: str) -> Callable[[Dataset], Dataset]:
    import trl
    from transformers import LlamaConfig, LlamaForCausalLM

    logging.getLogger("trl").setLevel(logging.ERROR)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    args = trl.SFTConfig(output_dir=output_dir, completion_only_loss=True, report_to=[],
                         max_length=None, bf16=False, use_cpu=True, gradient_checkpointing=False)
    placeholder = Dataset.from_list(make_rows(1, 0))
    trainer = trl.SFTTrainer(model=LlamaForCausalLM(config), args=args,
                             train_dataset=placeholder, processing_class=tokenizer)
    return lambda dataset: trainer._prepare_dataset(dataset, tokenizer, args, packing=False,
                                                    formatting_func=None, dataset_name="train")


def timed(prepare: Callable[[Dataset], Dataset], dataset: Dataset) -> tuple[float, Dataset]:
    start = time.perf_counter()
    prepared = prepare(dataset)
    return time.perf_counter() - start, prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1,
                        help="time both several times, alternating (the machine may be shared)")
    options = parser.parse_args()

    from transformers import AutoTokenizer

    from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
    from sft_plugins.testing import plugin_manager

    datasets.disable_caching()
    datasets.disable_progress_bars()
    template = plugin_manager("sft_plugins_templates").templates.get("llama-3.1")
    tokenizer = template.configure_tokenizer(AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR))
    dataset = Dataset.from_list(make_rows(options.examples, options.seed))
    n = options.examples
    parallel = os.environ.get("TOKENIZERS_PARALLELISM", "(unset: on)")
    print(f"{n} conversational prompt/completion examples, llama-3.1 template, "
          f"TOKENIZERS_PARALLELISM={parallel}")

    with tempfile.TemporaryDirectory() as output_dir:
        ours, theirs = our_preparation(tokenizer, template), trl_preparation(tokenizer, output_dir)
        ratios = []
        for round_ in range(1, options.rounds + 1):
            our_seconds, our_data = timed(ours, dataset)
            trl_seconds, trl_data = timed(theirs, dataset)
            ratios.append(trl_seconds / our_seconds)
            print(f"round {round_}: sft-plugins {our_seconds:6.2f} s ({n / our_seconds:6.0f} ex/s)"
                  f"   TRL {trl_seconds:6.2f} s ({n / trl_seconds:6.0f} ex/s)"
                  f"   ratio {ratios[-1]:.2f}x")
    identical = (our_data["input_ids"] == trl_data["input_ids"]
                 and our_data["labels"] == trl_data["labels"])
    tokens = sum(len(ids) for ids in our_data["input_ids"])
    print(f"{tokens} tokens; median ratio (ours / TRL, examples per second): "
          f"{statistics.median(ratios):.2f}x")
    print(f"input_ids and labels identical: {identical}")
    if not identical:
        raise SystemExit("labels differ from TRL's")


if __name__ == "__main__":
    main()
