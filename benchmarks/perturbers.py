"""Training-step time with and without each embedding perturber, on one model and one batch set.

    python -m benchmarks.perturbers                 # CPU defaults: a few minutes on 2 cores
    python -m benchmarks.perturbers --device cuda --hidden 1024 --layers 8 --seq 1024

A step is forward, backward and an AdamW update of a small random-init Llama on right-padded
batches with varied real lengths. Every configuration runs on the same model and the same
batches; configurations are interleaved round by round (so drift in machine load hits all of
them alike) after warm-up steps, and each reports the median step time over all its rounds and
its ratio to the run without a perturber (the median over rounds of the ratio to the
baseline timed in the same round). ``builtin`` is transformers' own NEFTune hook, for
reference. The goal for ``neftune`` is an overhead of at most 3% of step time. Whole-step ratios
jitter by a percent or two even between identical configurations (compare ``none``), so the last
columns also time what each hook adds on its own (describing the batch and drawing the noise on
one embedding output) and divide it by the baseline step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.neftune import activate_neftune, deactivate_neftune

from sft_plugins import get_plugin_manager
from sft_plugins.perturb import Perturber, batch_info

CONFIGS: dict[str, tuple[str, dict[str, object]] | None] = {
    "baseline": None,
    "builtin": None,
    "none": ("none", {}),
    "neftune": ("neftune", {"alpha": 5.0}),
    "neftune-padded": ("neftune", {"alpha": 5.0, "length": "padded"}),
    "gaussian": ("gaussian", {"alpha": 5.0}),
    "symnoise": ("symnoise", {"alpha": 5.0}),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perturbers",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2304)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved timed rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                         num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 128),
                         max_position_embeddings=args.seq, pad_token_id=0)
    model = LlamaForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype))
    return model.train()


def build_batches(args: argparse.Namespace, count: int = 4) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches whose real lengths range from a quarter of ``seq`` to all of it."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        lengths = torch.randint(args.seq // 4, args.seq + 1, (args.batch,), generator=generator)
        mask = (torch.arange(args.seq).unsqueeze(0) < lengths.unsqueeze(1)).long()
        ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=generator) * mask
        batch = {"input_ids": ids, "attention_mask": mask,
                 "labels": ids.masked_fill(mask == 0, -100)}
        batches.append({k: v.to(args.device) for k, v in batch.items()})
    return batches


@contextmanager
def builtin_neftune(model: LlamaForCausalLM, alpha: float) -> Iterator[None]:
    handle = activate_neftune(model, alpha)
    try:
        yield
    finally:
        deactivate_neftune(model, handle)


def installer(name: str, model: LlamaForCausalLM) -> Callable[[], AbstractContextManager[object]]:
    """A factory of context managers that put configuration ``name`` on ``model``."""
    if name == "baseline":
        return nullcontext
    if name == "builtin":
        return lambda: builtin_neftune(model, 5.0)
    kind, options = CONFIGS[name]  # type: ignore[misc]
    perturber = get_plugin_manager(load_entry_points=False).perturbers.create(kind, **options)
    return lambda: perturber.install(model, seed=0)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_steps(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer,
                batches: list[dict[str, torch.Tensor]], steps: int, device: str) -> list[float]:
    times = []
    for i in range(steps):
        synchronize(device)
        start = time.perf_counter()
        loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median step time per configuration, and the median over rounds of its ratio to the
    baseline measured in the same round (pairing cancels slow drift in machine load)."""
    model = build_model(args)
    batches = build_batches(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    installers = {name: installer(name, model) for name in CONFIGS}
    names = list(installers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        with installers[name]():
            timed_steps(model, optimizer, batches, args.warmup, args.device)
    for round_index in range(args.rounds):
        shift = round_index % len(names)  # rotate the order so no configuration always runs first
        medians = {}
        for name in names[shift:] + names[:shift]:
            with installers[name]():
                times = timed_steps(model, optimizer, batches, args.steps, args.device)
            samples[name] += times
            medians[name] = statistics.median(times)
        for name in names:
            ratios[name].append(medians[name] / medians["baseline"])
    return {name: {"median_ms": 1000 * statistics.median(samples[name]),
                   "ratio": statistics.median(ratios[name]), "steps": len(samples[name])}
            for name in names}


def isolated_cost(args: argparse.Namespace, calls: int = 50) -> dict[str, float]:
    """Milliseconds per call of what each hook adds (batch description and noise) on one
    embedding output: the overhead without the step-to-step jitter of a whole training step."""
    batch = build_batches(args, count=1)[0]
    output = torch.randn(args.batch, args.seq, args.hidden, device=args.device,
                         dtype=getattr(torch, args.dtype))
    manager = get_plugin_manager(load_entry_points=False)
    generator = torch.Generator(device=args.device)
    costs = {}
    for name, config in CONFIGS.items():
        if config is None:
            continue
        perturber = manager.perturbers.create(config[0], **config[1])

        def call(perturber: Perturber = perturber) -> torch.Tensor:
            if perturber.alpha == 0:  # the hook returns before describing the batch
                return output
            info = batch_info((args.batch, args.seq), output.device, step=0, alpha=5.0,
                              generator=generator.manual_seed(0),
                              attention_mask=batch["attention_mask"])
            return perturber.perturb(output, info)

        for _ in range(5):
            call()
        synchronize(args.device)
        start = time.perf_counter()
        for _ in range(calls):
            call()
        synchronize(args.device)
        costs[name] = 1000 * (time.perf_counter() - start) / calls
    return costs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    results = run(args)
    costs = isolated_cost(args)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"cpu, {torch.get_num_threads()} threads")
    print(f"device: {device}; model: hidden {args.hidden}, {args.layers} layers, "
          f"{args.dtype}; batch {args.batch} x {args.seq}; "
          f"{args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up")
    base = results["baseline"]["median_ms"]
    print(f"{'perturber':<16}{'median step (ms)':>18}{'ratio':>9}{'overhead':>10}"
          f"{'hook alone (ms)':>17}{'hook / step':>13}")
    for name, row in results.items():
        line = (f"{name:<16}{row['median_ms']:>18.2f}{row['ratio']:>9.4f}"
                f"{100 * (row['ratio'] - 1):>9.2f}%")
        if name in costs:
            row["hook_ms"] = costs[name]
            line += f"{costs[name]:>17.3f}{100 * costs[name] / base:>12.2f}%"
        print(line)
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump({"device": device, "args": vars(args), "results": results}, handle,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
