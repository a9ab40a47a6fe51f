"""Streaming: peak memory against the data's size, and examples/s against map-style data.

Run: ``python -m benchmarks.streaming [--sections memory,speed,packing] [--large 2000000]``.

Both sections train the CLI's way (the steps of ``sft_plugins.training.train_from_arguments``:
the same data loading, labelling, packing and Trainer as ``sft-plugins train``; a callback ends
each run where its one pass over the data ends) a tiny Llama with the shipped
tokenizer (2 304 entries, so the model costs little next to the data) on short conversations
(``benchmarks.data_loading.conversation``: an optional system prompt and one to three turns,
one bad line in the middle, skipped), each run in a fresh process that reports its own peak RSS.

``memory``: ``--streaming`` over one pass of ``--small`` conversations and of ``--large`` ones,
unpacked and packed (``--packing``, rows of ``--max-length`` tokens, best-fit over the default
buffer). Memory stays flat when the large run's peak RSS is within 1.2x (``GOAL_MEMORY``) of
the small run's. The large file (about 290 MiB per million conversations) is written once into
``--data-dir`` and kept there for the next run (``--data-dir`` defaults to a temporary
directory removed afterwards). A pass over 2 M conversations takes 40 to 70 minutes on 2 cores:
``--jobs 2 --threads 1`` runs two at a time, one torch thread each, and ``--kinds packed`` (or
``padded``) measures one kind only.

``speed``: the same run on ``--speed-examples`` conversations with ``--streaming`` and with
map-style data (prepared before training into a fresh ``datasets`` cache, as a first run would),
alternating over ``--repeats`` rounds; examples/s over the whole run (loading, preparation and
training) and over the training loop alone (``train_runtime``, which for a stream includes its
preparation and for map-style does not). Ratios are map-style's over streaming's, per round,
then the median.

``packing``: no training; the fill the stream packer reaches (best-fit decreasing over each
buffer of ``K`` examples) against packing the whole data set at once, on the same example lengths
(heavy-tailed, uniform and log-normal, ``--packing-examples`` of each), for several ``K``.

Prints one JSON object; ``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.data_loading import conversation, peak_rss_mib

GOAL_MEMORY = 1.2
"""The large run's peak RSS over the small run's (issue 16, item 4)."""
KINDS = ("padded", "packed")
"""The memory section's runs: batches padded to their longest row, or packed rows."""
GOAL_SPEED = 1.2
"""Map-style examples/s over streaming's (issue 16, item 5)."""


def write_data(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` conversations and one bad line in the middle, written once (kept if present with
    the same count, recorded in a ``.done`` file written last)."""
    done = path.with_suffix(".done")
    if path.exists() and done.exists() and done.read_text() == f"{n} {seed}":
        return path
    rng = random.Random(seed)
    bad_line = n // 2 + 1
    with path.open("w") as handle:
        for line in range(1, n + 2):
            if line == bad_line:
                handle.write('{"messages": [\n')
            else:
                handle.write(json.dumps(conversation(rng)) + "\n")
    done.write_text(f"{n} {seed}")
    return path


def model_dir(directory: Path) -> Path:
    """A one-layer, hidden-16 Llama with the shipped tokenizer, saved once: training costs
    little next to the data, so what is measured is the data's cost."""
    path = directory / "model-16"
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sft_plugins.assets import LLAMA3_TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------------- one run -------


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run, in this (fresh) process; what it did and its own peak RSS."""
    os.environ["HF_DATASETS_CACHE"] = spec["cache_dir"]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    import datasets

    datasets.disable_progress_bars()
    from transformers import TrainerCallback

    from sft_plugins.arguments import check_arguments
    from sft_plugins.commands.train import parse
    from sft_plugins.manager import get_plugin_manager
    from sft_plugins.training import build_trainer
    from sft_plugins.training import run as train

    class OnePass(TrainerCallback):
        """Ends training where the stream's first pass ends: a stream has no length, so
        ``--max_steps`` only bounds the run, and the Trainer would go on into a second pass."""

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            control.should_training_stop = True
            return control

    argv = ["--model_name_or_path", spec["model"], "--dataset", spec["data"], "--template",
            "llama-3.1", "--output_dir", spec["output_dir"], "--on_bad_example", "skip",
            "--max_steps", str(spec["steps"]), "--per_device_train_batch_size",
            str(spec["batch"]), "--learning_rate", "1e-3", "--report_to", "none", "--use_cpu",
            "true", "--save_strategy", "no", "--logging_steps", "1000", "--disable_tqdm",
            "true", "--streaming", str(spec["streaming"]).lower()]
    if spec["packing"]:
        argv += ["--packing", "true", "--max_length", str(spec["max_length"])]
    started = time.perf_counter()
    parsed = parse(argv)
    check_arguments(*parsed[:4])
    trainer, loaded = build_trainer(*parsed, get_plugin_manager())
    trainer.add_callback(OnePass())
    run = train(trainer, loaded)
    wall = time.perf_counter() - started
    trainer = run.trainer
    runtime = next(h["train_runtime"] for h in trainer.state.log_history
                   if "train_runtime" in h)
    report = trainer.preparation["train"]
    packed = trainer.packer.report() if trainer.packer is not None else None
    data = run.data.summary.splits[0]
    return {
        "steps": run.steps, "examples_read": data.examples, "examples_labelled": report.kept,
        "skipped": {**data.skipped, **report.skipped},
        "packed_rows": packed.rows if packed else None,
        "fill": round(packed.fill, 4) if packed else None,
        "wall_s": round(wall, 2), "train_runtime_s": round(runtime, 2),
        "peak_rss_mib": round(peak_rss_mib(resource.RUSAGE_SELF)),
    }


def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`child` in a fresh interpreter (its peak RSS is its own)."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.streaming", "--child",
                           json.dumps(spec)], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"child run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_pass_steps(examples: int, batch: int) -> int:
    """Steps of one pass when every row of a batch is one example; with packing (several
    examples a row) a bound, and :func:`child` stops where the pass ends."""
    return math.ceil(examples / batch)


# ------------------------------------------------------------------------ sections -------


def bench_memory(args: argparse.Namespace, directory: Path, model: Path) -> dict[str, Any]:
    specs: dict[str, dict[str, Any]] = {}
    sizes: dict[int, float] = {}
    for n in (args.small, args.large):
        data = write_data(directory / f"conversations-{n}.jsonl", n)
        sizes[n] = round(data.stat().st_size / (1 << 20), 1)
        for kind in args.kinds:
            packing = kind == "packed"
            # a packed row holds several examples: fewer rows a step, about as many examples
            batch = args.batch // args.rows_per_packed if packing else args.batch
            specs[f"{n} {kind}"] = {
                "model": str(model), "data": str(data), "streaming": True, "packing": packing,
                "max_length": args.max_length, "batch": batch,
                "steps": one_pass_steps(n, batch), "cache_dir": str(directory / "c"),
                "output_dir": str(directory / f"out-{n}-{packing}"), "threads": args.threads,
                "file_mib": sizes[n]}

    def measured(name: str) -> tuple[str, dict[str, Any]]:
        started = time.perf_counter()
        result = spawn(specs[name])
        result["total_s"] = round(time.perf_counter() - started, 1)
        result["file_mib"] = specs[name]["file_mib"]
        print(json.dumps({name: result}), file=sys.stderr, flush=True)
        return name, result

    # runs side by side share the cores, not their memory: each child's peak RSS is its own
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(pool.map(measured, specs))
    ratios = {kind: round(results[f"{args.large} {kind}"]["peak_rss_mib"]
                          / results[f"{args.small} {kind}"]["peak_rss_mib"], 3)
              for kind in args.kinds}
    return {"runs": results, "peak_rss_ratio_large_over_small": ratios,
            "goal": f"<= {GOAL_MEMORY}",
            "met": all(r <= GOAL_MEMORY for r in ratios.values())}


def bench_speed(args: argparse.Namespace, directory: Path, model: Path) -> dict[str, Any]:
    n = args.speed_examples
    data = write_data(directory / f"conversations-{n}.jsonl", n)
    runs: dict[str, list[dict[str, Any]]] = {"streaming": [], "map-style": []}
    for round_ in range(args.repeats):
        for kind in ("map-style", "streaming") if round_ % 2 else ("streaming", "map-style"):
            spec = {"model": str(model), "data": str(data), "streaming": kind == "streaming",
                    "packing": False, "max_length": args.max_length, "batch": args.batch,
                    "steps": one_pass_steps(n, args.batch),
                    "cache_dir": tempfile.mkdtemp(dir=directory, prefix="cache-"),
                    "output_dir": str(directory / "out")}
            result = spawn(spec)
            for key, seconds in (("examples_per_s", "wall_s"),
                                 ("train_loop_examples_per_s", "train_runtime_s")):
                result[key] = round(result["steps"] * args.batch / result[seconds], 1)
            runs[kind].append(result)
            print(json.dumps({kind: result}), file=sys.stderr, flush=True)

    def ratio(key: str) -> float:
        return round(statistics.median(m[key] / s[key] for m, s in zip(
            runs["map-style"], runs["streaming"], strict=True)), 3)

    whole, loop = ratio("examples_per_s"), ratio("train_loop_examples_per_s")
    return {"examples": n, "batch": args.batch, "runs": runs,
            "map_over_streaming_examples_per_s": whole,
            "map_over_streaming_train_loop_examples_per_s": loop,
            "goal": f"<= {GOAL_SPEED}", "met": whole <= GOAL_SPEED}


LENGTHS = {
    "pareto-1024": (lambda rng: min(int(8 * rng.paretovariate(1.3)) + rng.randint(20, 40),
                                    1024), 1024),
    "uniform-1024": (lambda rng: rng.randint(10, 500), 1024),
    "lognormal-2048": (lambda rng: min(int(rng.lognormvariate(5, 0.8)) + 1, 2048), 2048),
}
"""Example lengths (and row length) the packing section packs: a heavy tail (most examples a
few dozen tokens, a few hundreds), uniform, and log-normal around 150 tokens."""
BUFFERS = (100, 300, 1000, 3000)


def bench_packing(args: argparse.Namespace) -> dict[str, Any]:
    from datasets import Dataset

    from sft_plugins.batching import DEFAULT_PACKING_BUFFER, pack_dataset, pack_stream

    results = {}
    for name, (length, max_length) in LENGTHS.items():
        rng = random.Random(0)
        lengths = [length(rng) for _ in range(args.packing_examples)]
        data = Dataset.from_dict({"input_ids": [[5] * n for n in lengths],
                                  "labels": [[5] * n for n in lengths]})
        _, whole = pack_dataset(data, max_length)
        fills = {"whole": round(whole.fill, 4)}
        for buffer in BUFFERS:
            stream, packer = pack_stream(data.to_iterable_dataset(), max_length, buffer)
            for _ in stream:
                pass
            fills[f"buffer {buffer}"] = round(packer.report().fill, 4)
        results[name] = fills
    return {"examples": args.packing_examples, "default_buffer": DEFAULT_PACKING_BUFFER,
            "fill": results}


def kinds(text: str) -> list[str]:
    """``--kinds``: a comma-separated subset of :data:`KINDS`, in their order."""
    named = text.split(",")
    unknown = sorted(set(named) - set(KINDS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {', '.join(unknown)}; expected "
                                         f"{' and/or '.join(KINDS)}, comma-separated")
    return [kind for kind in KINDS if kind in named]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="memory,speed,packing")
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=2_000_000)
    parser.add_argument("--speed-examples", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--kinds", type=kinds, default=list(KINDS),
                        help="memory: padded, packed or both (a pass over 2 M takes an hour)")
    parser.add_argument("--rows-per-packed", type=int, default=4,
                        help="examples a packed row holds, about (packed batch: batch / this)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--packing-examples", type=int, default=50_000)
    parser.add_argument("--jobs", type=int, default=1,
                        help="memory: runs side by side (each child's peak RSS is its own)")
    parser.add_argument("--threads", type=int, default=None,
                        help="memory: torch threads per run (default: torch's)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    temporary = None if args.data_dir else tempfile.TemporaryDirectory(prefix="sft-stream-")
    directory = Path(args.data_dir or temporary.name)  # type: ignore[union-attr]
    directory.mkdir(parents=True, exist_ok=True)
    try:
        model = model_dir(directory)
        sections = args.sections.split(",")
        result: dict[str, Any] = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                       f"{platform.python_version()}",
            "command": " ".join(["python -m benchmarks.streaming", *(argv or sys.argv[1:])])}
        if "memory" in sections:
            result["memory"] = bench_memory(args, directory, model)
        if "speed" in sections:
            result["speed"] = bench_speed(args, directory, model)
        if "packing" in sections:
            result["packing"] = bench_packing(args)
    finally:
        if temporary is not None:
            temporary.cleanup()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
