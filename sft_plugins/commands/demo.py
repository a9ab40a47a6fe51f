"""``sft-plugins demo``: the built-in end-to-end run (see :mod:`sft_plugins.demo`)."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--output_dir", "--output-dir", default="demo-output", show_default=True,
              help="Where the trained model, loss curve and mask view are written.")
@click.option("--max_steps", "--max-steps", default=600, show_default=True,
              help="Optimizer steps.")
@click.option("--per_device_train_batch_size", "--batch-size", default=64, show_default=True,
              help="Examples per step.")
@click.option("--learning_rate", "--learning-rate", default=3e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
def demo_command(output_dir: str, max_steps: int, per_device_train_batch_size: int,
                 learning_rate: float, seed: int) -> None:
    """Fine-tune a tiny Llama to sort letters: completion-only masking, NEFTune, no download."""
    from sft_plugins.demo import run_demo

    run_demo(output_dir, steps=max_steps, batch_size=per_device_train_batch_size,
             learning_rate=learning_rate, seed=seed)
