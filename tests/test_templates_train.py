"""Every shipped template trains with nothing but its name: the trainer resolves it, configures
the tokenizer's pad token the way the template declares it, prepares, masks and steps."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainingArguments

from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.errors import SFTPluginsError
from sft_plugins.testing import plugin_manager
from sft_plugins.trainer import SFTPluginTrainer

MANAGER = plugin_manager("sft_plugins_templates", "sft_plugins_collators",
                         "sft_plugins_perturbers")
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Sort the letters: c a b"},
                  {"role": "assistant", "content": "a b c"}]},
    {"messages": [{"role": "user", "content": "Sort the letters: q p r"},
                  {"role": "assistant", "content": "p q r"},
                  {"role": "user", "content": "And z y?"},
                  {"role": "assistant", "content": "y z"}]},
]


def family_tokenizer(name: str):
    """The shipped tokenizer with the family's special tokens added, as the family's own
    tokenizer has them (its pad token left unset: the template must choose it)."""
    template = MANAGER.templates.get(name)
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    pad = template.pad_token or template.pad_fallbacks[0]
    tokens = {template.bos_token, template.eos_token, template.end_of_turn, pad,
              *template.stop_tokens} - {None}
    tokenizer.add_special_tokens({"additional_special_tokens": sorted(tokens)})
    tokenizer.eos_token = template.eos_token or tokenizer.eos_token
    tokenizer.pad_token = None
    return tokenizer


@pytest.mark.parametrize("name", MANAGER.templates.names())
def test_a_shipped_template_trains_with_only_its_name(name, tmp_path):
    tokenizer = family_tokenizer(name)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[],
                             per_device_train_batch_size=2, use_cpu=True, save_strategy="no")
    trainer = SFTPluginTrainer(model=model, args=args, processing_class=tokenizer,
                               train_dataset=Dataset.from_list(CONVERSATIONS), template=name,
                               plugin_manager=MANAGER)
    assert trainer.preparation["train"].kept == 2
    template = MANAGER.templates.get(name)
    assert tokenizer.pad_token != (template.end_of_turn or template.eos_token)
    result = trainer.train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))


def test_phi_pads_with_its_end_of_sequence_which_is_not_its_end_of_turn(tmp_path):
    tokenizer = family_tokenizer("phi-3.5")
    MANAGER.templates.get("phi-3.5").configure_tokenizer(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>" != "<|end|>"


def test_one_pad_rule_for_the_tokenizer_and_the_collator():
    """A family whose own pad token the vocabulary lacks pads with its first fallback that the
    vocabulary has: the tokenizer configuration and the collator choose it by the same rule
    (before, the collator took the missing token and failed), and neither pads with the end of
    turn."""
    llama = MANAGER.templates.get("llama-3.1")
    template = llama.with_options(
        pad_token="<|no-such-token|>",
        pad_fallbacks=("<|also-missing|>", "<|reserved_special_token_3|>"))
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    tokenizer.pad_token = None
    template.configure_tokenizer(tokenizer)
    collator = MANAGER.collators.create("assistant-only")
    collator.bind(tokenizer, template)
    assert tokenizer.pad_token == "<|reserved_special_token_3|>"
    assert collator.pad_token_id == tokenizer.pad_token_id
    with pytest.raises(SFTPluginsError, match="end-of-turn"):
        MANAGER.collators.create("assistant-only", pad_token="<|eot_id|>").bind(tokenizer,
                                                                                llama)
    with pytest.raises(SFTPluginsError, match="end-of-turn"):
        llama.configure_tokenizer(tokenizer, pad_token="<|eot_id|>")
