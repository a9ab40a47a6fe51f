"""Files shipped with the package so the demo and tests never download anything."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent

LLAMA3_TOKENIZER_DIR = ASSETS / "llama3_tokenizer"
"""A byte-level BPE tokenizer with Llama 3.1's pre-tokenizer, post-processor and 256 special
tokens (in their real order), over a 2 048-token vocabulary; built by
``scripts/build_tokenizer.py``. Load it with ``AutoTokenizer.from_pretrained``."""
