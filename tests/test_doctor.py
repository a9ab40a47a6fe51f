"""``sft-plugins doctor``: the day-one Llama 3.1 bug, --fix, padding, diffs, untrained rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from test_templates_parity import official_sources
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.cli import main
from sft_plugins.testing import plugin_manager

OFFICIAL_TEMPLATES = Path(__file__).parent / "fixtures" / "official_templates"
"""The publishers' templates, byte for byte (provenance in its README.md)."""


def tokenizer_dir(root: Path, template: str | None, *, pad: str | None = None) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    if template is not None:
        tokenizer.chat_template = template
    if pad is not None:
        tokenizer.pad_token = pad
    tokenizer.save_pretrained(root)
    return root


def doctor(*args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, ["doctor", *args, "--json"])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.output)


def codes(report: dict[str, Any]) -> set[str]:
    return {f["code"] for f in report["findings"]}


def test_day_one_llama_3_1_is_reported_and_fixed(tmp_path: Path) -> None:
    day_one = tokenizer_dir(tmp_path / "day_one",
                            (OFFICIAL_TEMPLATES / "llama3_1_day_one.jinja").read_text())
    status, report = doctor(str(day_one))
    assert status == 1
    assert report["family"] == "llama-3.1" and "day-one" in report["version"]
    assert {"known-bug", "ignores-add-generation-prompt", "no-generation-markers",
            "double-bos", "no-pad-token"} <= codes(report)
    advice = next(f["advice"] for f in report["findings"] if f["code"] == "known-bug")
    assert "respects add_generation_prompt" in advice  # what the fixed template fixes

    fixed = tmp_path / "fixed"
    status, report = doctor(str(day_one), "--fix", str(fixed))
    assert status == 0 and report["fixed"]["ok"]
    status, report = doctor(str(fixed))
    assert status == 0 and report["findings"] == [] and report["family"] == "llama-3.1"

    tokenizer = AutoTokenizer.from_pretrained(fixed)
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text.endswith("yo<|eot_id|>")
    assert tokenizer(text).input_ids.count(tokenizer.bos_token_id) == 1


def test_terminal_report_names_the_problems(tmp_path: Path) -> None:
    day_one = tokenizer_dir(tmp_path / "d",
                            (OFFICIAL_TEMPLATES / "llama3_1_day_one.jinja").read_text())
    result = CliRunner().invoke(main, ["doctor", str(day_one)])
    assert result.exit_code == 1
    assert "ignores-add-generation-prompt" in result.output and "→" in result.output


def test_pad_equal_to_end_of_turn_is_reported(tmp_path: Path) -> None:
    directory = tokenizer_dir(tmp_path / "p", (OFFICIAL_TEMPLATES / "llama3_1.jinja").read_text(),
                              pad="<|eot_id|>")
    status, report = doctor(str(directory))
    assert status == 1
    assert report["version"].startswith("Llama 3.1 / 3.3 Instruct, current")
    assert "pad-is-end-of-turn" in codes(report)
    assert "known-bug" not in codes(report)
    assert "ignores-add-generation-prompt" not in codes(report)


def test_a_modified_template_is_shown_as_a_diff(tmp_path: Path) -> None:
    official = (OFFICIAL_TEMPLATES / "llama3_1.jinja").read_text()
    changed = official.replace("Cutting Knowledge Date: December 2023",
                               "Cutting Knowledge Date: March 2025")
    status, report = doctor(str(tokenizer_dir(tmp_path / "m", changed)))
    assert status == 1 and report["family"] == "llama-3.1"
    finding = next(f for f in report["findings"] if f["code"] == "modified-template")
    assert "-Cutting Knowledge Date: December 2023" in finding["details"]
    assert "+Cutting Knowledge Date: March 2025" in finding["details"]


def test_an_unknown_template_is_usable_but_reported(tmp_path: Path) -> None:
    status, report = doctor(str(tokenizer_dir(tmp_path / "u", "{{ messages | length }}")))
    assert status == 1 and report["family"] is None
    assert "unrecognised-template" in codes(report)


def test_untrained_special_token_rows_are_found(tmp_path: Path) -> None:
    fixed = plugin_manager("sft_plugins_templates").templates.get("llama-3.1")
    directory = tmp_path / "model"
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    fixed.configure_tokenizer(tokenizer)
    tokenizer.add_bos_token = False
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    status, report = doctor(str(_save(model, directory)))
    assert status == 0, report
    with torch.no_grad():
        model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids("<|eot_id|>")] = 0
    status, report = doctor(str(_save(model, directory)))
    assert status == 1
    finding = next(f for f in report["findings"] if f["code"] == "untrained-embeddings")
    assert "<|eot_id|>" in finding["message"]
    assert "<|start_header_id|>" not in finding["message"]


def _save(model: Any, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


OFFICIAL = official_sources()


@pytest.mark.parametrize("family", sorted(OFFICIAL))
def test_every_official_template_is_recognised_as_its_family(tmp_path: Path,
                                                             family: str) -> None:
    """doctor names the family of each publisher's template and reports no bug the family
    does not have: a generation prompt implicit in the user turn (Mistral's ``[/INST]``) is
    the design, not the day-one Llama bug."""
    _, report = doctor(str(tokenizer_dir(tmp_path / "t", OFFICIAL[family])))
    assert report["family"] == family
    assert not {"known-bug", "modified-template", "unrecognised-template",
                "ignores-add-generation-prompt", "template-fails"} & codes(report)
