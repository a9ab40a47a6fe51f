"""The argument groups of ``sft-plugins train`` (beside ``transformers.TrainingArguments``).

Plain dataclasses that ``HfArgumentParser`` turns into flags; kept apart from the code that uses
them so that building the command line imports neither torch nor transformers' models.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sft_plugins.errors import ConfigError


@dataclass
class ModelArguments:
    """What to load and how to adapt it (``sft-plugins train`` flags of the same names)."""

    model_name_or_path: str = field(metadata={"help": "A local model directory or a hub name."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer directory or hub name (default: the model's)."})
    dtype: str = field(default="auto", metadata={
        "help": "Weights dtype: auto (from --bf16/--fp16, else float32), bfloat16, float16, "
                "float32."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel: sdpa, sdpa_packed, flash_attention_2, eager (default: "
                "transformers'; --packing switches sdpa to sdpa_packed)."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow model code from the model's repository."})
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "Module names to adapt (default: every linear layer but the output head, as "
                "QLoRA recommends: peft's 'all-linear')."})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "Quantize the base model to 4 bits with bitsandbytes (QLoRA)."})
    load_in_8bit: bool = field(default=False, metadata={
        "help": "Quantize the base model to 8 bits with bitsandbytes."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "nf4 or fp4."})
    bnb_4bit_use_double_quant: bool = field(default=True, metadata={
        "help": "Quantize the quantization constants too (QLoRA's double quantization)."})


@dataclass
class DataArguments:
    """Where the data comes from and how bad examples are handled."""

    dataset: list[str] = field(metadata={
        "help": "Training data: files (.jsonl, .json, .parquet, .csv), globs, directories or a "
                "datasets name."})
    eval_dataset: list[str] | None = field(default=None, metadata={
        "help": "Evaluation data, in the same forms as --dataset."})
    eval_split_ratio: float | None = field(default=None, metadata={
        "help": "Hold out this fraction of the training data for evaluation instead."})
    dataset_format: str | None = field(default=None, metadata={
        "help": "messages, prompt_completion, alpaca, sharegpt or text (default: detected)."})
    column_map: str | None = field(default=None, metadata={
        "help": "Rename source columns as source=target pairs: 'question=instruction'."
    })
    on_bad_example: str = field(default="error", metadata={
        "help": "error: stop at the first bad example; skip: drop, count and report them."})
    dataset_num_proc: int | None = field(default=None, metadata={
        "help": "Processes for data preparation. Reading and checking the rows default to "
                "every core for 20 000 rows or more; tokenizing and masking default to one "
                "process, beside the tokenizer's own threads."})
    streaming: bool = field(default=False, metadata={
        "help": "Read, validate, label (and pack) the data while training reads it, in "
                "constant memory, instead of all of it before step 1; needs --max_steps. "
                "Under several ranks each reads its own files (or every N-th example)."})


@dataclass
class PluginArguments:
    """Which registered template, collator and perturber to use (``sft-plugins list``)."""

    template: str | None = field(default=None, metadata={
        "help": "Chat template name (default: detected from the tokenizer's own template)."})
    collator: str | None = field(default=None, metadata={
        "help": "Masking collator (default: completion-only for prompt/completion data, "
                "assistant-only otherwise)."})
    perturber: str | None = field(default=None, metadata={
        "help": "Embedding perturber, e.g. neftune (default: none)."})
    max_length: int | None = field(default=None, metadata={
        "help": "Longest example in tokens; the collator's truncation option says what to cut."})
    packing: bool = field(default=False, metadata={
        "help": "Pack examples into rows of --max_length tokens (best-fit decreasing), "
                "attention kept within each example; see docs/packing.md."})
    packing_buffer: int | None = field(default=None, metadata={
        "help": "With --streaming --packing: pack best-fit over this many examples at a time "
                "(default 1000)."})
    logits_chunk_size: int = field(default=1024, metadata={
        "help": "Positions per lm_head chunk in the trained-positions-only loss."})
    resume_incomplete: bool = field(default=False, metadata={
        "help": "Resume even from a checkpoint without optimizer, scheduler or RNG state, or "
                "never marked complete (the optimizer or noise then restart), with a warning."})


def _positive(value: float | None) -> bool:
    return value is not None and value > 0


def check_arguments(model_args: Any, data_args: Any, plugin_args: Any,
                    training_args: Any) -> None:
    """Refuse, before anything is loaded, values that transformers accepts and then trains
    wrongly with or crashes on (``--num_train_epochs 0`` saving an untrained model, a zero batch
    size dividing by zero at step 1, ...). Each error names the flag."""
    _check_numbers(model_args, data_args, plugin_args, training_args)
    _check_training(training_args)
    _check_evaluation(data_args, training_args)
    _check_streaming(data_args, plugin_args, training_args)
    _check_plugin_flags(plugin_args)
    _check_lora(model_args)
    _check_output_dir(Path(training_args.output_dir))


def _check_numbers(*groups: Any) -> None:
    """``nan`` parses as a float, and every comparison with it is false, so no other check
    would stop it: a ``nan`` learning rate or weight decay trains NaN weights without an
    error."""
    for group in groups:
        for item in fields(group):
            value = getattr(group, item.name)
            if isinstance(value, float) and math.isnan(value):
                raise ConfigError(f"--{item.name} {value}: not a number; give a number")


def _check_streaming(data_args: Any, plugin_args: Any, training_args: Any) -> None:
    """What a stream cannot do: tell its length, hold out a fraction of itself, be labelled
    in worker processes (whose skip counts would never reach the summary)."""
    buffer = plugin_args.packing_buffer
    if buffer is not None and buffer < 1:
        raise ConfigError(f"--packing_buffer {buffer}: must be a positive number of examples")
    if buffer is not None and not (data_args.streaming and plugin_args.packing):
        raise ConfigError("--packing_buffer applies to --streaming --packing (a data set read "
                          "whole is packed whole)")
    if not data_args.streaming:
        return
    if training_args.max_steps <= 0:
        raise ConfigError("--streaming needs --max_steps: a stream has no length, so the "
                          "number of optimizer steps cannot follow from --num_train_epochs; "
                          "give --max_steps N")
    if data_args.eval_split_ratio is not None:
        raise ConfigError("--eval_split_ratio needs the whole data set, which --streaming does "
                          "not read before training; give --eval_dataset instead")
    if training_args.dataloader_num_workers:
        raise ConfigError(f"--dataloader_num_workers {training_args.dataloader_num_workers}: "
                          "--streaming labels the data in the training process, which counts "
                          "its skipped examples; use --dataloader_num_workers 0")


def _check_training(args: Any) -> None:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    if args.max_steps == 0 or args.max_steps < -1:
        raise ConfigError(f"--max_steps {args.max_steps}: give a positive number of steps, or "
                          "-1 to train --num_train_epochs")
    if args.max_steps == -1 and not _positive(args.num_train_epochs):
        raise ConfigError(f"--num_train_epochs {args.num_train_epochs}: nothing would be "
                          "trained; give a positive number of epochs (or --max_steps)")
    if args.learning_rate < 0:
        raise ConfigError(f"--learning_rate {args.learning_rate}: a negative learning rate "
                          "climbs the loss; give a positive one")
    if math.isinf(args.learning_rate):
        raise ConfigError(f"--learning_rate {args.learning_rate}: the first step would make "
                          "every trained weight infinite; give a finite learning rate")
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    for flag, strategy in (("save_steps", "save_strategy"), ("logging_steps", "logging_strategy"),
                           ("eval_steps", "eval_strategy")):
        value, every = getattr(args, flag), getattr(args, strategy)
        if getattr(every, "value", every) == "steps" and value is not None \
                and not _positive(value):
            raise ConfigError(f"--{flag} {value}: with --{strategy} steps it must be a "
                              "positive number of steps (or a fraction of training below 1)")
    unknown = [name for name in args.report_to or []
               if name not in ("all", "none") and name not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise ConfigError(f"--report_to {' '.join(unknown)}: unknown; use none, all or some of "
                          f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")


def _check_evaluation(data_args: Any, training_args: Any) -> None:
    """An evaluation strategy without evaluation data, or a best-model metric that evaluation
    does not compute, fails inside the Trainer (after the model has loaded, or at the first
    evaluation) with a traceback."""
    strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    if strategy != "no" and not data_args.eval_dataset and data_args.eval_split_ratio is None:
        raise ConfigError(f"--eval_strategy {strategy} needs evaluation data: give "
                          "--eval_dataset FILE or --eval_split_ratio 0.05 (or --eval_strategy "
                          "no)")
    metric = training_args.metric_for_best_model
    if metric is not None and metric.removeprefix("eval_") != "loss":
        raise ConfigError(f"--metric_for_best_model {metric}: evaluation here computes the loss "
                          "only; use --metric_for_best_model loss (or compute_metrics with "
                          "SFTPluginTrainer in Python)")


def _check_lora(model_args: Any) -> None:
    """peft refuses these only after the model has loaded, and its message reads like a
    problem with the target modules."""
    if not model_args.use_lora:
        return
    if model_args.lora_r < 1:
        raise ConfigError(f"--lora_r {model_args.lora_r}: the LoRA rank must be at least 1")
    if model_args.lora_alpha <= 0:
        raise ConfigError(f"--lora_alpha {model_args.lora_alpha}: must be positive (the "
                          "adapter's output is scaled by lora_alpha / lora_r)")
    if not 0 <= model_args.lora_dropout < 1:
        raise ConfigError(f"--lora_dropout {model_args.lora_dropout}: must be at least 0 and "
                          "below 1")


def _check_plugin_flags(plugin_args: Any) -> None:
    if plugin_args.logits_chunk_size < 1:
        raise ConfigError(f"--logits_chunk_size {plugin_args.logits_chunk_size}: must be at "
                          "least 1")
    if plugin_args.max_length is not None and plugin_args.max_length < 1:
        raise ConfigError(f"--max_length {plugin_args.max_length}: must be at least 1")
    if plugin_args.packing and plugin_args.max_length is None:
        raise ConfigError("--packing needs --max_length, the length of a packed row in tokens")


def _check_output_dir(out: Path) -> None:
    """--output_dir must be a directory this process can create or write into."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} is a file; give a directory")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--output_dir {out}: {existing} is not writable by this user; give a "
                          "directory you can write to")


__all__ = ["DataArguments", "ModelArguments", "PluginArguments", "check_arguments"]
