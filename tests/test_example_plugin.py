"""The example third-party distribution under examples/, installed for real with pip.

It is built into a private directory with ``pip install --target`` (entry points and all) and
put on the path, so discovery goes through ``importlib.metadata`` as for any installed plugin.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainingArguments

from sft_plugins import get_plugin_manager
from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.cli import main
from sft_plugins.errors import UnknownNameError
from sft_plugins.perturb import batch_info

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sft-plugins-example"


@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("src") / "example"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(source)], check=True)
    return site


@pytest.fixture
def installed(example_site, site_dir, monkeypatch):
    """The example on sys.path and PYTHONPATH (next to ``site_dir`` for extra installs)."""
    monkeypatch.syspath_prepend(str(example_site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(example_site),
                                                      os.environ["PYTHONPATH"]]))
    return example_site


def list_json(env: dict[str, str] | None = None) -> dict:
    result = CliRunner().invoke(main, ["list", "--json"], env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def names(listing: dict, kind: str, plugin: str) -> set[str]:
    return {e["name"] for e in listing[kind] if e["plugin"] == plugin}


def test_discovered_and_listed_under_its_plugin_name(installed):
    listing = list_json()
    assert names(listing, "templates", "example") == {"example-chat", "example-reasoner"}
    assert names(listing, "perturbers", "example") == {"laplace"}
    assert listing["errors"] == []


def test_disabled_by_environment(installed):
    listing = list_json({"SFT_PLUGINS_DISABLE": "example"})
    assert not names(listing, "templates", "example")
    assert not names(listing, "perturbers", "example")


def test_broken_copy_is_reported_not_fatal(installed, install):
    broken = (EXAMPLE / "sft_plugins_example" / "plugin.py").read_text().replace(
        "from sft_plugins_example.noise import LaplaceNoise",
        "from sft_plugins_example.noise import LaplaceNoiz")
    install("sft-plugins-example-broken", {"broken_example/plugin.py": broken},
            {"broken-example": "broken_example.plugin"})
    listing = list_json()
    assert names(listing, "templates", "example") == {"example-chat", "example-reasoner"}
    [error] = listing["errors"]
    assert error["plugin"] == "broken-example"
    assert error["distribution"] == "sft-plugins-example-broken"
    assert "LaplaceNoiz" in error["error"]
    assert "SFT_PLUGINS_DISABLE=broken-example" in error["error"]
    with pytest.raises(UnknownNameError, match=r"broken-example.*SFT_PLUGINS_DISABLE"):
        get_plugin_manager().perturbers.get("laplace-v2")


def test_template_renders_and_is_detected_from_a_tokenizer(installed):
    manager = get_plugin_manager()
    template = manager.templates.get("markdown-chat")
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    template.configure_tokenizer(tokenizer)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    rendered = template.render(messages)
    assert rendered.text == tokenizer.apply_chat_template(messages, tokenize=False)
    assert [rendered.text[a:b] for a, b in rendered.trained_spans] == ["Hello!<|end_of_text|>"]
    assert manager.select_chat_template(tokenizer).name == "example-chat"


def test_laplace_noise_has_unit_variance_and_spares_pads(installed):
    laplace = get_plugin_manager().perturbers.create("laplace", alpha=4.0)
    mask = torch.tensor([[1] * 7 + [0] * 3])
    embeddings = torch.zeros(1, 10, 64)
    squared = []
    for seed in range(300):
        info = batch_info((1, 10), torch.device("cpu"), step=0, alpha=4.0,
                          generator=torch.Generator().manual_seed(seed), attention_mask=mask)
        noise = laplace.perturb(embeddings, info)
        assert torch.all(noise[0, 7:] == 0)
        squared.append(noise[0, :7].square().sum().item())
    mean = sum(squared) / len(squared)
    # E||noise||^2 = alpha^2 = 16 per sequence; 300 draws of 448 values: well within 5%.
    assert mean == pytest.approx(16.0, rel=0.05)


def test_trainer_subclass_adds_its_z_loss(installed, tmp_path):
    from sft_plugins_example.trainer import ZLossTrainer

    from sft_plugins.trainer import SFTPluginTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=32))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    batch = {"input_ids": torch.randint(0, 50, (2, 6)),
             "attention_mask": torch.ones(2, 6, dtype=torch.long),
             "labels": torch.randint(0, 50, (2, 6))}
    model.eval()
    base = SFTPluginTrainer(model=model, args=args, data_collator=lambda f: f)
    z = ZLossTrainer(model=model, args=args, data_collator=lambda f: f, z_loss=0.01)
    with torch.no_grad():
        log_z = torch.logsumexp(model(input_ids=batch["input_ids"]).logits[:, :-1], -1)
        expected = base.compute_loss(model, batch) + 0.01 * log_z.square().mean()
        assert z.compute_loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-5)


TOOLS = [{"type": "function", "function": {"name": "add", "description": "adds two numbers",
                                           "parameters": {"type": "object"}}}]


def tool_conversation(a: int, b: int) -> dict:
    """Two exchanges: a tool call (with reasoning) and its result, then a plain question whose
    answer has reasoning too."""
    total = a + b
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": "", "reasoning_content": f"I should add {a} and {b}.",
         "tool_calls": [{"type": "function",
                         "function": {"name": "add", "arguments": {"a": a, "b": b}}}]},
        {"role": "tool", "content": str(total)},
        {"role": "assistant", "content": f"{total}.", "reasoning_content": "The tool said so."},
        {"role": "user", "content": "Is it even?"},
        {"role": "assistant", "content": "yes" if total % 2 == 0 else "no",
         "reasoning_content": f"{total} mod 2."}]}


def test_a_family_with_reasoning_and_tools_trains_from_outside(installed, tmp_path):
    """The example's reasoning/tool family, found through its entry point: the tool list and
    tool output are never trained, the calls and reasoning are; earlier reasoning that the
    format drops stops preparation by default, and ``expand=reasoning`` trains each turn
    with its reasoning. A tiny model trained on it learns (its loss falls below a fifth of
    where it started)."""
    from datasets import Dataset

    from sft_plugins.trainer import SFTPluginTrainer

    manager = get_plugin_manager()
    template = manager.templates.get("example-reasoner")
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    template.configure_tokenizer(tokenizer)
    row = tool_conversation(2, 3)
    rendered = template.render(row["messages"], tools=row["tools"])
    trained = "".join(rendered.text[a:b] for a, b in rendered.trained_spans)
    assert '<call>{"name": "add", "arguments": {"a": 2, "b": 3}}</call>' in trained
    assert '"adds two numbers"' not in trained and "### Tool result" not in trained
    assert "Is it even?" not in trained and "<think>5 mod 2.</think>" in trained
    assert "I should add" not in rendered.text  # dropped: a user message came after it

    string_arguments = tool_conversation(1, 1)
    string_arguments["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"a": 1}'
    with pytest.raises(Exception, match="example-reasoner: message 1: tool call arguments must "
                                        "be an object") as caught:
        template.render(string_arguments["messages"], tools=TOOLS)
    assert caught.value.rule == "tool-call-arguments"

    data = Dataset.from_list([tool_conversation(a, b) for a in range(4) for b in range(4)])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=60, learning_rate=1e-2,
                             per_device_train_batch_size=8, report_to=[], use_cpu=True,
                             save_strategy="no", logging_steps=1)
    with pytest.raises(Exception, match="message 1 is trained, but the chat template renders "
                                        "it without its reasoning"):
        SFTPluginTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=data, template="example-reasoner", plugin_manager=manager)
    trainer = SFTPluginTrainer(model=model, args=args, processing_class=tokenizer,
                               train_dataset=data, template="example-reasoner",
                               collator_options={"expand": "reasoning"}, plugin_manager=manager)
    report = trainer.preparation["train"]
    assert (report.rows, report.total, report.kept) == (16, 48, 48)  # one per assistant turn
    call, answer, last = (tokenizer.decode([t for t, label in zip(
        row["input_ids"], row["labels"], strict=True) if label != -100])
        for row in trainer.train_dataset.select(range(3)))
    assert call == ('<think>I should add 0 and 0.</think>\n<call>{"name": "add", "arguments": '
                    '{"a": 0, "b": 0}}</call><|end_of_text|>')
    assert answer == "<think>The tool said so.</think>\n0.<|end_of_text|>"
    assert last == "<think>0 mod 2.</think>\nyes<|end_of_text|>"
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < 0.2 * losses[0]  # 7.7 -> 0.34 here
