"""The built-in demo: fine-tune a tiny Llama to sort letters, with nothing downloaded.

A Llama-architecture model of about 0.9 M parameters is built from a config, with the shipped
Llama-3-style tokenizer and the fixed ``llama-3.1`` template. The task has a rule the model can
only learn from the answers: "Sort the letters: q c m" -> "c m q". Training uses prompt/completion
data, ``completion-only`` masking and ``neftune`` noise, through :class:`SFTPluginTrainer` as any
run does. Three disjoint sets of letter sets: training examples, validation sets that decide when
to stop, and held-out sets that are only scored before and after training.

It answers in about a minute on two CPU cores because it stops as soon as the model has learned:
every ``eval_steps`` steps :class:`ExactMatchEarlyStopping` decodes the validation prompts and ends
training once their exact match reaches the target (``max_steps`` stays the ceiling, and
``stop_at=None`` trains all of it). Everything is written to a staging directory beside
``output_dir`` and moved into place at the end, so ``output_dir`` always holds one whole run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import string
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from datasets import Dataset
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from sft_plugins.assets import ASSETS, LLAMA3_TOKENIZER_DIR
from sft_plugins.errors import SFTPluginsError, SkipExample
from sft_plugins.masking import MaskingCollator
from sft_plugins.templates import ChatTemplate
from sft_plugins.trained_view import TrainedExample, as_html, label_conversations
from sft_plugins.trainer import SFTPluginTrainer

logger = logging.getLogger(__name__)

DEMO_MODEL_CONFIG = ASSETS / "demo_model_config.json"
PROMPT = "Sort the letters: {}"
RESULTS_FILE = "results.json"
RESULTS_KIND = "sft-plugins demo"
"""Written into results.json: how a later run recognises a directory it may replace."""
EMBEDDING_STD = 0.3
"""Input embeddings initialised at std 0.3 instead of 0.02: at this width NEFTune's noise
(alpha 5) would otherwise be about 5x the embeddings and stall learning."""


class DemoOutputError(SFTPluginsError):
    """The demo's output directory holds something that is not an earlier demo run."""


def letter_sets(seed: int, count: int, exclude: set[str] = frozenset()) -> list[str]:
    """``count`` distinct sets of 3 to 6 distinct letters, as space-separated strings in random
    order, none of whose sorted form is in ``exclude``."""
    rng = random.Random(seed)
    seen: set[str] = set(exclude)
    out: list[str] = []
    while len(out) < count:
        letters = rng.sample(string.ascii_lowercase, rng.randint(3, 6))
        key = "".join(sorted(letters))
        if key in seen:
            continue
        seen.add(key)
        out.append(" ".join(letters))
    return out


def _key(letters: str) -> str:
    return "".join(sorted(letters.split()))


def answer(letters: str) -> str:
    return " ".join(sorted(letters.split()))


def example(letters: str) -> dict[str, Any]:
    """One prompt/completion example in the conversational format."""
    return {"prompt": [{"role": "user", "content": PROMPT.format(letters)}],
            "completion": [{"role": "assistant", "content": answer(letters)}]}


@dataclass
class DemoData:
    train: Dataset
    validation: list[str]
    """Letter sets that decide when training stops; never trained on."""
    heldout: list[str]
    """Letter sets scored only before and after training; never trained on or stopped on."""


def datasets_for(seed: int, train_size: int, validation_size: int,
                 heldout_size: int) -> DemoData:
    """Training examples and two disjoint lists of letter sets that never occur (as sets) in
    training."""
    heldout = letter_sets(seed + 1, heldout_size)
    validation = letter_sets(seed + 2, validation_size, exclude={_key(h) for h in heldout})
    unseen = {_key(s) for s in heldout + validation}
    train = [example(s) for s in letter_sets(seed, train_size, exclude=unseen)]
    return DemoData(Dataset.from_list(train), validation, heldout)


def build_model(tokenizer: Any, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(**json.loads(DEMO_MODEL_CONFIG.read_text()))
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=EMBEDDING_STD)
    return model


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, template: ChatTemplate,
                     letter_sets_: list[str], batch_size: int = 250) -> list[str]:
    """Greedy answers to the prompts, stopping at the template's stop tokens. Leaves the model
    in eval mode."""
    model.eval()
    stops = template.stop_token_ids(tokenizer)
    answers: list[str] = []
    for i in range(0, len(letter_sets_), batch_size):
        texts = [template.render([{"role": "user", "content": PROMPT.format(s)}],
                                 add_generation_prompt=True).text
                 for s in letter_sets_[i:i + batch_size]]
        encoded = [tokenizer(t, add_special_tokens=not template.renders_bos) for t in texts]
        batch = tokenizer.pad(encoded, padding=True, padding_side="left",
                              return_tensors="pt").to(model.device)
        out = model.generate(**batch, max_new_tokens=16, do_sample=False, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def exact_match(answers: list[str], letter_sets_: list[str]) -> float:
    return sum(a == answer(s) for a, s in zip(answers, letter_sets_, strict=True)) / len(answers)


class ExactMatchEarlyStopping(TrainerCallback):
    """Scores the model every ``eval_steps`` optimizer steps and stops training at ``target``.

    ``evaluate(model)`` returns an exact match in [0, 1] (it may switch the model to eval mode;
    training mode is restored here). ``target=None`` only scores. Each score is reported as one
    line through ``report``, with the latest logged training loss.
    """

    def __init__(self, evaluate: Callable[[Any], float], *, eval_steps: int,
                 target: float | None, report: Callable[[str], None]) -> None:
        self.evaluate = evaluate
        self.eval_steps = eval_steps
        self.target = target
        self.report = report
        self.history: list[tuple[int, float]] = []
        self.stopped_at: int | None = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, model: Any = None, **kwargs: Any) -> None:
        step = state.global_step
        if step % self.eval_steps and step != state.max_steps:
            return
        score = self.evaluate(model)
        model.train()
        self.history.append((step, score))
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        loss = f"loss {losses[-1]:.4f}, " if losses else ""
        line = f"step {step:>4}/{state.max_steps}: {loss}validation exact match {score:.1%}"
        if self.target is not None and score >= self.target:
            control.should_training_stop = True
            self.stopped_at = step
            line += f" >= {self.target:.0%}: stopping"
        self.report(line)


class _BarWithoutLogLines(ProgressCallback):
    """The Trainer's own progress bar, without a dict printed under it for every log: the
    early-stopping lines carry the loss."""

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        pass


@dataclass
class DemoResult:
    before: float
    after: float
    seconds: float
    output_dir: Path
    steps: int
    """Optimizer steps trained (fewer than ``max_steps`` when the target was reached)."""
    max_steps: int


def plot_loss(log_history: list[dict[str, Any]], path: Path) -> None:
    """The training loss per logged step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([s for s, _ in points], [v for _, v in points], color="#1f77b4")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_yscale("log")
    ax.set_title("sft-plugins demo: sorting letters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_mask_view(train: Dataset, template: ChatTemplate, tokenizer: Any,
                    collator: MaskingCollator, out: Path, count: int = 5) -> None:
    """``masks.html``: the first training conversations, token by token, labelled by the
    collator that trains them (:mod:`sft_plugins.trained_view`)."""
    rows = list(train.select(range(count)))
    tokens = label_conversations(rows, collator, tokenizer, template)
    examples = []
    for number, (row, token_view) in enumerate(zip(rows, tokens, strict=True), start=1):
        if isinstance(token_view, SkipExample):  # the demo's data never is
            raise token_view
        messages = row["prompt"] + row["completion"]
        examples.append(TrainedExample(number, messages, None, template.render(messages),
                                       token_view))
    (out / "masks.html").write_text(as_html(examples, template, "sft-plugins demo: what is "
                                            "trained", collator.name))


def _check_replaceable(out: Path) -> bool:
    """Whether ``out`` holds an earlier demo run (True), nothing (False), or else: an error."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise DemoOutputError(f"--output_dir {out} is a file; give a directory the demo may "
                              f"create")
    if not any(out.iterdir()):
        return False
    try:
        kind = json.loads((out / RESULTS_FILE).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != RESULTS_KIND:
        raise DemoOutputError(f"--output_dir {out} already holds files that are not a demo run "
                              f"(no {RESULTS_FILE} written by the demo); give a new or empty "
                              f"directory")
    return True


def _remove_abandoned_stagings(out: Path) -> None:
    """Staging directories of runs whose process is gone (killed with SIGKILL or SIGTERM, which
    skip cleanup); a staging directory of a live process is left alone."""
    for staging in out.parent.glob(f".{out.name}.partial-*"):
        match = re.match(r"\.partial-(\d+)-", staging.name[len(out.name) + 1:])
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(staging, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A fresh directory beside ``out`` that replaces ``out`` when the block succeeds, and is
    removed when it fails (``out`` is left as it was)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_stagings(out)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-",
                                        dir=out.parent))
    except OSError as exc:
        reason = ("a part of that path is a file"
                  if isinstance(exc, (FileExistsError, NotADirectoryError))
                  else exc.strerror or str(exc))
        raise DemoOutputError(f"--output_dir {out}: the demo cannot create a directory in "
                              f"{out.parent} ({reason}); give a directory you can write to"
                              ) from None
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def run_demo(output_dir: str | Path = "demo-output", *, max_steps: int = 600,
             batch_size: int = 32, learning_rate: float = 3e-3, seed: int = 0,
             eval_steps: int = 40, stop_at: float | None = 0.98, validation_size: int = 400,
             heldout_size: int = 500, say: Callable[[str], None] = logger.warning,
             started: float | None = None) -> DemoResult:
    """Train and evaluate the demo model; see the module docstring. Each line of progress goes
    to ``say`` (the command line prints them). ``started`` is the ``time.perf_counter()`` the
    reported wall time counts from (default: now)."""
    from sft_plugins import get_plugin_manager

    started = time.perf_counter() if started is None else started
    interactive = sys.stdout.isatty()
    out = Path(output_dir)
    if _check_replaceable(out):
        say(f"{out} holds an earlier demo run: it is replaced when this one finishes")
    if not interactive:  # a log file gets lines, not hundreds of carriage-return updates
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    manager = get_plugin_manager()
    # the fixed template without its 'Cutting Knowledge Date' system block, which would be
    # about 45 of each example's 75 tokens with this small vocabulary; the same otherwise
    template = manager.resolve_template("llama-3.1", variables={"omit_knowledge_date": True})
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    template.configure_tokenizer(tokenizer)
    data = datasets_for(seed, max_steps * batch_size, validation_size, heldout_size)
    model = build_model(tokenizer, seed)
    say(f"sft-plugins demo: a {model.num_parameters() / 1e6:.2f} M-parameter "
                  f"Llama learns to sort letters ({len(data.train)} training examples, "
                  f"{len(data.validation)} validation and {len(data.heldout)} held-out letter "
                  f"sets it never trains on)")

    before = generate_answers(model, tokenizer, template, data.heldout)
    before_accuracy = exact_match(before, data.heldout)
    say(f"held-out exact match before training: {before_accuracy:.1%}")
    goal = (f"until validation exact match reaches {stop_at:.0%}, at most {max_steps} steps"
            if stop_at is not None else f"for {max_steps} steps")
    say(f"training {goal} (batch {batch_size}, scored every {eval_steps} steps)")

    stopper = ExactMatchEarlyStopping(
        lambda m: exact_match(generate_answers(m, tokenizer, template, data.validation),
                              data.validation),
        eval_steps=eval_steps, target=stop_at, report=say)
    with _staged(out) as staging:
        args = TrainingArguments(
            output_dir=str(staging), max_steps=max_steps,
            per_device_train_batch_size=batch_size, learning_rate=learning_rate,
            lr_scheduler_type="cosine", warmup_steps=40, weight_decay=0.0,
            adam_beta2=0.98, logging_steps=10, save_strategy="no", report_to=[], seed=seed,
            use_cpu=not torch.cuda.is_available(), dataloader_drop_last=True,
            disable_tqdm=not interactive,
        )
        trainer = SFTPluginTrainer(
            model=model, args=args, train_dataset=data.train, processing_class=tokenizer,
            template=template, collator="completion-only", perturber="neftune",
            perturber_options={"alpha": 5.0}, plugin_manager=manager, callbacks=[stopper],
        )
        trainer.remove_callback(PrinterCallback)
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(_BarWithoutLogLines)
        trainer.train()
        steps = trainer.state.global_step

        after = generate_answers(trainer.model, tokenizer, template, data.heldout)
        after_accuracy = exact_match(after, data.heldout)
        say(f"held-out exact match after training: {after_accuracy:.1%} "
                      f"(before: {before_accuracy:.1%}), after {steps} steps")
        samples = list(zip(data.heldout, before, after, strict=True))
        for letters, old, new in samples[:5]:
            say(f"  {PROMPT.format(letters)!r}: before {old!r}, after {new!r}, expected "
                f"{answer(letters)!r}")

        trainer.save_model(str(staging / "model"))
        tokenizer.save_pretrained(str(staging / "model"))
        plot_loss(trainer.state.log_history, staging / "loss.png")
        (staging / "log_history.json").write_text(
            json.dumps(trainer.state.log_history, indent=1))
        write_mask_view(data.train, template, tokenizer, trainer.collator, staging)
        seconds = time.perf_counter() - started
        (staging / RESULTS_FILE).write_text(json.dumps(
            {"kind": RESULTS_KIND, "exact_match_before": before_accuracy,
             "exact_match_after": after_accuracy, "heldout_sets": len(data.heldout),
             "steps": steps, "max_steps": max_steps, "stop_at": stop_at,
             "validation_exact_match": [{"step": s, "exact_match": v}
                                        for s, v in stopper.history],
             "batch_size": batch_size, "seconds": seconds,
             "samples": [{"prompt": PROMPT.format(s), "expected": answer(s), "before": b,
                          "after": a} for s, b, a in samples[:20]]},
            indent=2))
    say(f"wrote {out / 'model'}, {out / 'loss.png'}, {out / 'masks.html'} and "
                  f"{out / RESULTS_FILE}")
    say(f"demo finished in {seconds:.0f} s")
    return DemoResult(before_accuracy, after_accuracy, seconds, out, steps, max_steps)


__all__ = ["DemoResult", "ExactMatchEarlyStopping", "run_demo"]
