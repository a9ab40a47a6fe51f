"""Time to the first optimizer step of ``sft-plugins train``, cold and with the preparation cache.

Run: ``python -m benchmarks.preparation_cache [--n 1000000] [--num-proc 2]``.

N short conversations (those of :mod:`benchmarks.data_loading`) are written to a temporary
directory with the demo's small Llama and the shipped tokenizer. The same training command then
runs twice in fresh processes, with one fresh ``datasets`` cache: cold (read, validate, tokenize
and label everything) and warm (everything found in the cache). Each process reports the seconds
from its start to the end of its first optimizer step, measured by a ``TrainerCallback``; the
rest of the run is one step. Prints one JSON object; the goal of the preparation cache is warm
<= 10% of cold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.data_loading import write_file

STARTED = "SFT_PLUGINS_BENCH_STARTED"
MARK = "first optimizer step after (s):"


def first_step(argv: list[str]) -> None:
    """The worker: build the run as ``sft-plugins train`` does, and time its first step."""
    from transformers import TrainerCallback

    from sft_plugins.commands.train import parse
    from sft_plugins.manager import get_plugin_manager
    from sft_plugins.training import build_trainer

    started = float(os.environ[STARTED])

    class FirstStep(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 1:
                print(MARK, time.time() - started, flush=True)

    model_args, data_args, plugin_args, training_args, options = parse(argv)
    trainer, _ = build_trainer(model_args, data_args, plugin_args, training_args, options,
                               get_plugin_manager())
    trainer.add_callback(FirstStep())
    trainer.train()


def build_model(directory: Path) -> None:
    """The demo's small Llama (:func:`sft_plugins.demo.build_model`) with the shipped tokenizer."""
    from transformers import AutoTokenizer

    from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
    from sft_plugins.demo import build_model as demo_model

    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    demo_model(tokenizer, seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def run(work: Path, data: Path, num_proc: int, name: str) -> float:
    argv = ["--model_name_or_path", str(work / "model"), "--dataset", str(data),
            "--template", "llama-3.1", "--on_bad_example", "skip",
            "--dataset_num_proc", str(num_proc), "--output_dir", str(work / name),
            "--max_steps", "1", "--per_device_train_batch_size", "8", "--report_to", "none",
            "--save_strategy", "no", "--use_cpu", "true", "--disable_tqdm", "true"]
    env = {**os.environ, STARTED: repr(time.time()), "HF_DATASETS_CACHE": str(work / "cache"),
           "TOKENIZERS_PARALLELISM": "true"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.preparation_cache", "--worker",
                           *argv], env=env, check=True, capture_output=True, text=True)
    marked = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    return float(marked[-1][len(MARK):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="conversations")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    args, rest = parser.parse_known_args()
    if rest and rest[0] == "--worker":
        first_step(rest[1:])
        return
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        data = work / "conversations.jsonl"
        write_file(data, args.n)
        build_model(work / "model")
        cold = run(work, data, args.num_proc, "cold")
        warm = run(work, data, args.num_proc, "warm")
    print(json.dumps({
        "conversations": args.n, "num_proc": args.num_proc, "machine": platform.processor()
        or platform.machine(), "cpus": os.cpu_count(), "cold_first_step_s": round(cold, 1),
        "warm_first_step_s": round(warm, 1), "warm_over_cold": round(warm / cold, 3),
        "goal_warm_at_most_10_percent": warm <= 0.1 * cold}, indent=2))


if __name__ == "__main__":
    main()
