"""Time and peak memory to load, canonicalise and validate N short conversations from JSON Lines.

Run: ``python -m benchmarks.data_loading [--n 1000000] [--template llama-3.1] [--num-proc 2]``.

The file is written to a temporary directory first (streamed, so writing it costs no memory),
then :func:`sft_plugins.data.load_sft_dataset` prepares it into a fresh ``datasets`` cache twice:
cold (read, parse, canonicalise, validate) and warm (everything found in the cache). Peak resident
memory is reported for this process and, separately, for the largest worker process
(``getrusage``), because preparation runs in ``num_proc`` workers. One bad line sits in the middle
and is skipped, so the skip path (Arrow compute over the reason column, then ``select``) is part
of what is measured. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SYSTEMS = ["", "You are a helpful assistant.", "Answer in one sentence."]
QUESTIONS = ["What is {a} plus {b}?", "Name a word that rhymes with {w}.", "Spell {w} backwards.",
             "Is {a} larger than {b}?"]
WORDS = ["cat", "tree", "river", "stone", "light", "music", "garden", "window"]


def conversation(rng: random.Random) -> dict[str, Any]:
    """A short conversation: optional system prompt, one to three user/assistant turns."""
    messages = []
    system = rng.choice(SYSTEMS)
    if system:
        messages.append({"role": "system", "content": system})
    for _ in range(rng.randint(1, 3)):
        a, b, w = rng.randint(0, 999), rng.randint(0, 999), rng.choice(WORDS)
        messages.append({"role": "user", "content": rng.choice(QUESTIONS).format(a=a, b=b, w=w)})
        messages.append({"role": "assistant", "content": f"The answer is {a + b} ({w})."})
    return {"messages": messages}


def write_file(path: Path, n: int, seed: int = 0) -> int:
    """``n`` conversations plus one bad line in the middle; returns the bad line's number."""
    rng = random.Random(seed)
    bad_line = n // 2 + 1
    with path.open("w") as handle:
        for line in range(1, n + 2):
            if line == bad_line:
                handle.write(json.dumps({"messages": [{"role": "user", "content": "?"}]}) + "\n")
            else:
                handle.write(json.dumps(conversation(rng)) + "\n")
    return bad_line


def peak_rss_mib(who: int) -> float:
    """Peak resident set size in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(who).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="number of conversations")
    parser.add_argument("--template", default=None, help="validate with this chat template too")
    parser.add_argument("--num-proc", type=int, default=None,
                        help="worker processes (default: every core)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from sft_plugins import get_plugin_manager
    from sft_plugins.data import load_sft_dataset

    template = get_plugin_manager().templates.get(args.template) if args.template else None
    with tempfile.TemporaryDirectory(prefix="sft-data-bench-") as directory:
        path = Path(directory) / "train.jsonl"
        started = time.perf_counter()
        bad_line = write_file(path, args.n)
        write_s = time.perf_counter() - started
        rss_before = peak_rss_mib(resource.RUSAGE_SELF)
        timings = {}
        for run in ("cold", "warm"):
            started = time.perf_counter()
            data = load_sft_dataset(path, template=template, on_bad_example="skip",
                                    num_proc=args.num_proc, cache_dir=str(Path(directory) / "c"))
            timings[run] = time.perf_counter() - started
        split = data.summary.splits[0]
        assert len(data.train) == args.n, (len(data.train), args.n)
        assert split.samples[0].startswith(f"{path}:{bad_line}:"), split.samples
        result = {
            "conversations": args.n,
            "file_mib": round(path.stat().st_size / (1 << 20), 1),
            "template": args.template,
            "num_proc": args.num_proc or "default",
            "write_file_s": round(write_s, 1),
            "prepare_cold_s": round(timings["cold"], 1),
            "prepare_warm_s": round(timings["warm"], 1),
            "conversations_per_s_cold": round(args.n / timings["cold"]),
            "peak_rss_main_mib_before": round(rss_before),
            "peak_rss_main_mib": round(peak_rss_mib(resource.RUSAGE_SELF)),
            "peak_rss_largest_worker_mib": round(peak_rss_mib(resource.RUSAGE_CHILDREN)),
            "skipped": split.skipped,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                       f"{platform.python_version()}",
        }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
