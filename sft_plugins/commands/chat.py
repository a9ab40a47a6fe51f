"""``sft-plugins chat DIR``: answer prompts with a trained output directory.

It uses only what training saved: the tokenizer's chat template and the generation config's stop
tokens, exactly as any ``transformers`` user would load them, so it also checks that the directory
is usable elsewhere.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from sft_plugins.errors import ModelLoadError


def load_for_chat(directory: Path) -> tuple[Any, Any]:
    """The tokenizer and model (or base model plus LoRA adapter) saved in ``directory``.

    An adapter is loaded onto its base model, which brings the base's generation config; the
    one saved with the adapter (the template's stop tokens) replaces it.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        if (directory / "adapter_config.json").exists():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(directory)
            if (directory / "generation_config.json").exists():
                model.generation_config = GenerationConfig.from_pretrained(directory)
        else:
            model = AutoModelForCausalLM.from_pretrained(directory)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelLoadError(f"{directory} does not hold a readable trained model and "
                             f"tokenizer ({type(exc).__name__}: {exc}); the weights may be "
                             "truncated or corrupt") from None
    if not tokenizer.chat_template:
        raise ModelLoadError(f"{directory}: the tokenizer has no chat template; was it saved by "
                             "sft-plugins train?")
    return tokenizer, model.eval()


def answer(tokenizer: Any, model: Any, prompt: str, *, system: str | None = None,
           max_new_tokens: int = 128) -> dict[str, Any]:
    """Greedy answer to one user prompt, and whether generation stopped at a stop token."""
    import torch

    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs.to(model.device), max_new_tokens=max_new_tokens,
                                do_sample=False)
    new = output[0, inputs["input_ids"].shape[1]:].tolist()
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    return {"prompt": prompt,
            "answer": tokenizer.decode(new, skip_special_tokens=True).strip(),
            "stopped": bool(new) and new[-1] in stops, "new_tokens": len(new)}


@click.command("chat")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", "-p", multiple=True,
              help="A user message to answer (repeatable; default: one per line of stdin).")
@click.option("--system", default=None, help="A system message to put first.")
@click.option("--max_new_tokens", "--max-new-tokens", default=128, show_default=True,
              type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per answer.")
def chat_command(directory: Path, prompt: tuple[str, ...], system: str | None,
                 max_new_tokens: int, as_json: bool) -> None:
    """Answer prompts with the model and template saved in DIRECTORY."""
    tokenizer, model = load_for_chat(directory)
    prompts = prompt or tuple(line.rstrip("\n") for line in sys.stdin if line.strip())
    for text in prompts:
        result = answer(tokenizer, model, text, system=system, max_new_tokens=max_new_tokens)
        if as_json:
            click.echo(json.dumps(result))
        else:
            click.echo(result["answer"])
