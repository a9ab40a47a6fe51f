"""The plugin examples in docs/plugins.md run, register and do what the text says."""

from __future__ import annotations

import re
import types
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer

from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.perturb import batch_info
from sft_plugins.testing import plugin_manager

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def guide_plugins() -> types.ModuleType:
    """Every python block of the guide that defines a hook, executed into one module."""
    module = types.ModuleType("guide_plugins")
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.DOTALL)
    defining = [b for b in blocks if "@hookimpl" in b and "import" in b]
    assert len(defining) == 3
    for block in defining:
        exec(compile(block, str(GUIDE), "exec"), module.__dict__)
    selecting = next(b for b in blocks if "def select_chat_template" in b)
    exec(compile(selecting, str(GUIDE), "exec"), module.__dict__)
    return module


def test_guide_examples_register_and_work():
    manager = plugin_manager(guide_plugins(), with_first_party=True)
    template = manager.templates.get("mine")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"},
                {"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]
    rendered = template.render(messages)
    assert [rendered.text[a:b] for a, b in rendered.trained_spans] == [
        "Hello<|end|>", "Ciao<|end|>", "!<|end|>"]

    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end|>", "<|pad|>",
                                                                "<|user|>", "<|assistant|>"]})
    collator = manager.collators.create("last-two-turns")
    row = collator.prepare(Dataset.from_list([{"messages": messages}]), tokenizer,
                           template).dataset[0]
    trained = tokenizer.decode([t for t in row["labels"] if t != -100])
    assert trained == "Ciao<|end|>!<|end|>"

    half = manager.perturbers.create("half", alpha=2.0)
    info = batch_info((1, 4), torch.device("cpu"), step=0, alpha=2.0,
                      generator=torch.Generator().manual_seed(0),
                      attention_mask=torch.ones(1, 4, dtype=torch.long))
    noise = half.perturb(torch.zeros(1, 4, 8), info)
    assert torch.allclose(noise.abs(), torch.full_like(noise, 0.5 * 2.0 / (4 * 8) ** 0.5))

    tokenizer.chat_template = "<|my_turn|>{{ messages }}"
    assert manager.select_chat_template(tokenizer).name == "my-chat"
