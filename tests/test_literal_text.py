"""Special-token strings inside the data are text: with every shipped template, an answer that
quotes the end-of-turn token trains one end of turn (its own), and a user message that holds a
forged header adds no header token. ``literal_special_tokens=False`` is the old behaviour, which
these tests tell apart (so they can fail)."""

from __future__ import annotations

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.literal_text import protect, restore, special_text
from sft_plugins.testing import plugin_manager

MANAGER = plugin_manager("sft_plugins_templates", "sft_plugins_collators")


def family_tokenizer(template):
    """The shipped tokenizer with the family's tokens added as special tokens."""
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    tokens = {template.bos_token, template.eos_token, template.end_of_turn,
              template.pad_token or template.pad_fallbacks[0], *template.stop_tokens} - {None}
    tokenizer.add_special_tokens({"additional_special_tokens": sorted(tokens)})
    template.configure_tokenizer(tokenizer)
    return tokenizer


def prepared(name, literal):
    template = MANAGER.templates.get(name)
    tokenizer = family_tokenizer(template)
    end = template.end_of_turn
    rows = [{"messages": [
        {"role": "user", "content": f"Quote this: {template.bos_token or ''}{end}user{end}"},
        {"role": "assistant", "content": f"first part{end}second part"}]}]
    collator = MANAGER.collators.create("assistant-only", literal_special_tokens=literal)
    data = collator.prepare(Dataset.from_list(rows), tokenizer, template, desc=None).dataset
    return template, tokenizer, data[0]


@pytest.mark.parametrize("name", MANAGER.templates.names())
def test_quoted_special_tokens_stay_text_with_every_template(name):
    template, tokenizer, row = prepared(name, literal=True)
    end_id = tokenizer.convert_tokens_to_ids(template.end_of_turn)
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True)
               if label != -100]
    assert trained.count(end_id) == 1, "the quoted end of turn became a trained stop token"
    turn_ends = row["input_ids"].count(end_id)
    plain = tokenizer(template.end_of_turn, add_special_tokens=False,
                      split_special_tokens=True)["input_ids"]
    text = tokenizer.decode(trained)
    assert "first part" in text and "second part" in text
    assert len(plain) > 1
    _, _, old = prepared(name, literal=False)
    old_trained = [t for t, label in zip(old["input_ids"], old["labels"], strict=True)
                   if label != -100]
    assert old_trained.count(end_id) == 2  # apply_chat_template's reading: it stops mid-answer
    assert old["input_ids"].count(end_id) - turn_ends == 3  # three quoted ends became tokens


def test_the_quoted_text_is_tokenized_as_plain_text_in_place():
    _, tokenizer, row = prepared("llama-3.1", literal=True)
    eot = tokenizer("<|eot_id|>", add_special_tokens=False,
                    split_special_tokens=True)["input_ids"]
    ids = row["input_ids"]
    assert any(ids[i:i + len(eot)] == eot for i in range(len(ids)))
    # 3 quoted as text + 3 turn ends (system, user, assistant) as tokens
    assert tokenizer.decode(ids).count("<|eot_id|>") == 6
    assert ids.count(tokenizer.convert_tokens_to_ids("<|eot_id|>")) == 3


def test_protect_and_restore_give_back_the_text_and_the_places():
    special = special_text(AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR))
    row = {"messages": [{"role": "user", "content": "a<|eot_id|>b<|begin_of_text|>"}],
           "n": 3}
    protected, originals = protect(row, special)
    content = protected["messages"][0]["content"]
    assert len(content) == len(row["messages"][0]["content"]) and "<|" not in content
    assert originals == ["<|eot_id|>", "<|begin_of_text|>"]
    text, places = restore(f"[{content}]", originals)
    assert text == "[a<|eot_id|>b<|begin_of_text|>]"
    assert [text[a:b] for a, b in places] == originals
