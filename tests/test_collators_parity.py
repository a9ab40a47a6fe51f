"""Parity with the real thing: TRL's ``SFTTrainer`` preparation and transformers'
``return_assistant_tokens_mask``, on the same tokenizer and data."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from test_masking_properties import conversations
from test_masking_support import llama_tokenizer

from sft_plugins.masking import IGNORE_INDEX
from sft_plugins.testing import plugin_manager

trl = pytest.importorskip("trl")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"},
     {"role": "assistant", "content": "Hello! 🦙"}, {"role": "user", "content": "  spaced\n"},
     {"role": "assistant", "content": "\nline one\nline two\n"}],
    [{"role": "user", "content": "Say 中文 and é"}, {"role": "assistant", "content": "中文 é!"}],
]


@pytest.fixture(scope="module")
def manager() -> Any:
    return plugin_manager("sft_plugins_templates", "sft_plugins_collators")


@pytest.fixture(scope="module")
def configured(manager: Any) -> tuple[Any, Any]:
    """The llama-3.1 template and the shipped tokenizer configured with it."""
    template = manager.templates.get("llama-3.1")
    return template, template.configure_tokenizer(llama_tokenizer())


def trl_labels(rows: list[dict[str, Any]], tokenizer: Any, tmp_path: Path
               ) -> tuple[list[list[int]], list[list[int]]]:
    """Input ids and labels of TRL's own preparation (SFTTrainer, completion_only_loss)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    args = trl.SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, report_to=[],
                         max_length=None, bf16=False, use_cpu=True,
                         gradient_checkpointing=False)
    logging.getLogger("trl").setLevel(logging.ERROR)
    trainer = trl.SFTTrainer(model=LlamaForCausalLM(config), args=args,
                             train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
    prepared = trainer.train_dataset
    return prepared["input_ids"], prepared["labels"]


def our_labels(manager: Any, rows: list[dict[str, Any]], tokenizer: Any, template: Any
               ) -> tuple[list[list[int]], list[list[int]]]:
    collator = manager.collators.create("completion-only")
    prepared = collator.prepare(Dataset.from_list(rows), tokenizer, template, desc=None)
    return prepared.dataset["input_ids"], prepared.dataset["labels"]


def test_completion_only_equals_trl_on_conversational_prompt_completion(
        manager: Any, configured: tuple[Any, Any], tmp_path: Path) -> None:
    template, tokenizer = configured
    rows = [{"prompt": c[:-1], "completion": c[-1:]} for c in CONVERSATIONS]
    assert our_labels(manager, rows, tokenizer, template) == trl_labels(rows, tokenizer,
                                                                        tmp_path)


PLAIN = [
    {"prompt": "Question: what is 2+2?\nAnswer:", "completion": " 4"},
    {"prompt": "Translate 'chat' to English:", "completion": " cat 🐈"},
    {"prompt": "hello ", "completion": "world"},  # " world" straddles: trained by both
]


def test_completion_only_equals_trl_on_plain_prompt_completion(
        manager: Any, configured: tuple[Any, Any], tmp_path: Path) -> None:
    template, tokenizer = configured
    assert our_labels(manager, PLAIN, tokenizer, template) == trl_labels(PLAIN, tokenizer,
                                                                         tmp_path)


def test_plain_text_differs_from_trl_only_where_tokenization_diverges_before_the_boundary(
        manager: Any, configured: tuple[Any, Any], tmp_path: Path) -> None:
    """TRL starts the completion where the tokens of the prompt alone and of prompt+completion
    first differ; when a merge across the boundary changes an earlier token, TRL also trains
    prompt-only tokens. Our rule trains exactly the tokens that touch the completion."""
    template, tokenizer = configured
    row = {"prompt": "ababc", "completion": "es"}  # "ab" "abc" alone, "ab" "ab" "ces" together
    assert tokenizer.tokenize("ababc") == ["ab", "abc"]
    assert tokenizer.tokenize("ababces") == ["ab", "ab", "ces"]
    ours_ids, ours = our_labels(manager, [row], tokenizer, template)
    trl_ids, theirs = trl_labels([row], tokenizer, tmp_path)
    assert ours_ids == trl_ids
    text = row["prompt"] + row["completion"] + template.eos_token
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    boundary = len(row["prompt"])
    touching = [end > boundary and end > start for start, end in offsets]
    assert [label != IGNORE_INDEX for label in ours[0]] == touching
    differ = [i for i, (a, b) in enumerate(zip(ours[0], theirs[0], strict=True)) if a != b]
    assert differ and all(offsets[i][1] <= boundary for i in differ)  # TRL trains prompt tokens


def test_assistant_only_equals_transformers_assistant_tokens_mask(
        manager: Any, configured: tuple[Any, Any]) -> None:
    """The llama-3.1 template keeps ``{% generation %}`` on the tokenizer, so transformers'
    own mask is available: ours must equal it token for token."""
    template, tokenizer = configured
    collator = manager.collators.create("assistant-only")
    rows = [{"messages": c} for c in CONVERSATIONS]
    prepared = collator.prepare(Dataset.from_list(rows), tokenizer, template, desc=None)
    for conversation, row in zip(CONVERSATIONS, prepared.dataset, strict=True):
        theirs = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
        assert row["input_ids"] == list(theirs["input_ids"])
        assert [int(label != IGNORE_INDEX) for label in row["labels"]] == \
            list(theirs["assistant_masks"])


@pytest.mark.parametrize("template_name", ["llama-3.1", "chatml"])
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(messages=conversations())
def test_assistant_only_equals_transformers_on_generated_conversations(
        manager: Any, template_name: str, messages: list[dict[str, str]]) -> None:
    template = manager.templates.get(template_name)
    tokenizer = llama_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer = template.configure_tokenizer(tokenizer, pad_token="<|finetune_right_pad_id|>")
    collator = manager.collators.create("assistant-only")
    [row] = collator.prepare(Dataset.from_list([{"messages": messages}]), tokenizer, template,
                             desc=None).dataset
    theirs = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    assert row["input_ids"] == list(theirs["input_ids"])
    assert [int(label != IGNORE_INDEX) for label in row["labels"]] == \
        list(theirs["assistant_masks"])
