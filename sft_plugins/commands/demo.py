"""``sft-plugins demo``: the built-in end-to-end run (see :mod:`sft_plugins.demo`)."""

from __future__ import annotations

import time

import click


@click.command("demo")
@click.option("--output_dir", "--output-dir", default="demo-output", show_default=True,
              help="Where the trained model, loss curve and mask view are written. An earlier "
                   "demo run there is replaced once this one has finished.")
@click.option("--max_steps", "--max-steps", default=600, show_default=True,
              type=click.IntRange(min=1), help="Optimizer steps at most.")
@click.option("--per_device_train_batch_size", "--batch-size", default=32, show_default=True,
              type=click.IntRange(min=1), help="Examples per step.")
@click.option("--learning_rate", "--learning-rate", default=3e-3, show_default=True,
              type=click.FloatRange(min=0, min_open=True))
@click.option("--eval_steps", "--eval-steps", default=40, show_default=True,
              type=click.IntRange(min=1),
              help="Score the validation letter sets every this many steps.")
@click.option("--stop_at_exact_match", "--stop-at-exact-match", default=0.98,
              show_default=True, type=click.FloatRange(min=0, max=1, min_open=True),
              help="Stop once validation exact match reaches this.")
@click.option("--no_early_stopping", "--no-early-stopping", is_flag=True,
              help="Train all --max_steps (still scoring every --eval_steps).")
@click.option("--seed", default=0, show_default=True)
def demo_command(output_dir: str, max_steps: int, per_device_train_batch_size: int,
                 learning_rate: float, eval_steps: int, stop_at_exact_match: float,
                 no_early_stopping: bool, seed: int) -> None:
    """Fine-tune a tiny Llama to sort letters: completion-only masking, NEFTune, no download."""
    started = time.perf_counter()
    from tqdm.auto import tqdm

    from sft_plugins.demo import run_demo

    # tqdm.write keeps the lines above the Trainer's progress bar on a terminal
    run_demo(output_dir, max_steps=max_steps, batch_size=per_device_train_batch_size,
             learning_rate=learning_rate, seed=seed, eval_steps=eval_steps,
             stop_at=None if no_early_stopping else stop_at_exact_match, say=tqdm.write,
             started=started)
