"""Build the small Llama-3-style tokenizer shipped in ``sft_plugins/assets/llama3_tokenizer``.

It is what the demo and the tests use instead of downloading a real one: byte-level BPE with the
same pre-tokenizer regex, post-processor (BOS prepended, untrimmed offsets) and the same 256
special tokens as Llama 3.1, in the same order, after a 2 048-token learned vocabulary instead of
128 000. Run it from the repository root; the output is committed.
"""

from __future__ import annotations

import json
import pydoc
import random
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

OUT = Path("sft_plugins/assets/llama3_tokenizer")
VOCAB_SIZE = 2048
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NAMED_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
}


def special_tokens() -> list[str]:
    """The 256 Llama 3.1 special tokens in id order (128000 + i in the real vocabulary)."""
    tokens, reserved = [], 0
    for i in range(256):
        if i in NAMED_SPECIALS:
            tokens.append(NAMED_SPECIALS[i])
        else:
            tokens.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return tokens


def corpus() -> list[str]:
    """English prose (standard-library docs) plus the letters, digits and punctuation of the
    demo's tasks, so common words are single tokens and nothing falls back to many bytes."""
    texts = [pydoc.render_doc(m, renderer=pydoc.plaintext)
             for m in ("json", "random", "string", "textwrap", "collections", "itertools")]
    rng = random.Random(0)
    for _ in range(3000):
        letters = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9)))
        texts.append(f"Sort the letters: {letters}\n{''.join(sorted(letters))}")
        texts.append(f"{rng.randint(0, 999)} + {rng.randint(0, 999)} = {rng.randint(0, 1998)}.")
    return texts


def build() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    tokenizer.add_special_tokens(special_tokens())
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos)],
        ),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )


if __name__ == "__main__":
    build().save_pretrained(OUT)
    # Name the class every transformers release knows, not this release's backend alias.
    config_path = OUT / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {OUT}")
