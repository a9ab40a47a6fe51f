"""The built-in demo: fine-tune a tiny Llama to sort letters, with nothing downloaded.

A Llama-architecture model of about 0.6 M parameters is built from a config, with the shipped
Llama-3-style tokenizer and the fixed ``llama-3.1`` template. The task has a rule the model can
only learn from the answers: "Sort the letters: q c m" -> "c m q". Training uses prompt/completion
data, ``completion-only`` masking and ``neftune`` noise; held-out letter sets never appear in
training. The demo prints exact-match accuracy on them before and after training, a few
generations, and writes the trained model, a loss curve and an HTML view of the masks.
"""

from __future__ import annotations

import json
import random
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from rich.console import Console
from rich.markup import escape
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainingArguments

from sft_plugins.assets import ASSETS, LLAMA3_TOKENIZER_DIR
from sft_plugins.templates import ChatTemplate
from sft_plugins.trainer import SFTPluginTrainer

DEMO_MODEL_CONFIG = ASSETS / "demo_model_config.json"
PROMPT = "Sort the letters: {}"
EMBEDDING_STD = 0.3
"""Input embeddings initialised at std 0.3 instead of 0.02: at this width NEFTune's noise
(alpha 5) would otherwise be about 5x the embeddings and stall learning."""


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


def answer(letters: str) -> str:
    return " ".join(sorted(letters.split()))


def example(letters: str) -> dict[str, Any]:
    """One prompt/completion example in the conversational format."""
    return {"prompt": [{"role": "user", "content": PROMPT.format(letters)}],
            "completion": [{"role": "assistant", "content": answer(letters)}]}


def datasets_for(seed: int, train_size: int, heldout_size: int) -> tuple[Dataset, list[str]]:
    """Training examples and held-out letter sets that never occur (as sets) in training."""
    heldout = letter_sets(seed + 1, heldout_size)
    held_keys = {"".join(sorted(h.split())) for h in heldout}
    train = [example(s) for s in letter_sets(seed, train_size, exclude=held_keys)]
    return Dataset.from_list(train), heldout


def build_model(tokenizer: Any, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(**json.loads(DEMO_MODEL_CONFIG.read_text()))
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=EMBEDDING_STD)
    return model


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, template: ChatTemplate,
                     letter_sets_: list[str], batch_size: int = 100) -> list[str]:
    """Greedy answers to the held-out prompts, stopping at the template's stop tokens."""
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


@dataclass
class DemoResult:
    before: float
    after: float
    seconds: float
    output_dir: Path


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


def write_mask_view(train: Dataset, template: ChatTemplate, tokenizer: Any, out: Path,
                    count: int = 5) -> None:
    """``masks.html``: the first training conversations, token by token, trained ones marked."""
    from sft_plugins.commands.render import Example, as_html, tokenize

    examples = []
    for number, row in enumerate(train.select(range(count)), start=1):
        messages = row["prompt"] + row["completion"]
        rendered = template.render(messages)
        examples.append(Example(number, messages, None, rendered,
                                tokenize(tokenizer, template, rendered)))
    (out / "masks.html").write_text(as_html(examples, template, "sft-plugins demo: what is "
                                            "trained"))


def run_demo(output_dir: str | Path = "demo-output", *, steps: int = 600, batch_size: int = 64,
             learning_rate: float = 3e-3, seed: int = 0, heldout_size: int = 200,
             console: Console | None = None) -> DemoResult:
    """Train and evaluate the demo model; see the module docstring."""
    from sft_plugins import get_plugin_manager

    console = console or Console()
    out = Path(output_dir)
    started = time.perf_counter()
    manager = get_plugin_manager()
    template = manager.templates.get("llama-3.1")
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    template.configure_tokenizer(tokenizer)
    train, heldout = datasets_for(seed, steps * batch_size, heldout_size)
    model = build_model(tokenizer, seed)
    console.print(f"[bold]sft-plugins demo[/]: a {model.num_parameters() / 1e6:.2f} M-parameter "
                  f"Llama learns to sort letters ({len(train)} training examples, "
                  f"{len(heldout)} held-out letter sets it never sees)")

    before = generate_answers(model, tokenizer, template, heldout)
    before_accuracy = exact_match(before, heldout)
    console.print(f"held-out exact match before training: {before_accuracy:.1%}")

    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=steps // 20,
        weight_decay=0.0, logging_steps=max(1, steps // 30), save_strategy="no",
        report_to=[], seed=seed, use_cpu=not torch.cuda.is_available(),
        dataloader_drop_last=True,
    )
    trainer = SFTPluginTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer,
        template=template, collator="completion-only", perturber="neftune",
        perturber_options={"alpha": 5.0}, plugin_manager=manager,
    )
    trainer.train()

    after = generate_answers(trainer.model, tokenizer, template, heldout)
    after_accuracy = exact_match(after, heldout)
    console.print(f"held-out exact match after training: [bold]{after_accuracy:.1%}[/] "
                  f"(before: {before_accuracy:.1%})")
    for letters, old, new in list(zip(heldout, before, after, strict=True))[:5]:
        # generations are model output, not markup (an untrained model writes brackets)
        console.print(escape(f"  {PROMPT.format(letters)!r}: before {old!r}, after {new!r}, "
                             f"expected {answer(letters)!r}"))

    trainer.save_model(str(out / "model"))
    tokenizer.save_pretrained(str(out / "model"))
    plot_loss(trainer.state.log_history, out / "loss.png")
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    write_mask_view(train, template, tokenizer, out)
    seconds = time.perf_counter() - started
    result = DemoResult(before_accuracy, after_accuracy, seconds, out)
    (out / "results.json").write_text(json.dumps(
        {"exact_match_before": before_accuracy, "exact_match_after": after_accuracy,
         "seconds": seconds, "steps": steps, "batch_size": batch_size,
         "samples": [{"prompt": PROMPT.format(s), "expected": answer(s), "before": b,
                      "after": a}
                     for s, b, a in list(zip(heldout, before, after, strict=True))[:20]]},
        indent=2))
    console.print(f"wrote {out / 'model'}, {out / 'loss.png'}, {out / 'masks.html'} and "
                  f"{out / 'results.json'} in {seconds:.0f} s")
    return result


__all__ = ["DemoResult", "run_demo"]
