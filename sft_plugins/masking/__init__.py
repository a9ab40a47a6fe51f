"""Which tokens carry loss, and with what weight: character spans + tokenizer offsets -> labels.

A chat template renders a conversation and says which characters each assistant turn produced
(its trained span). A :class:`MaskingCollator` turns an example into text plus weighted character
spans (:meth:`MaskingCollator.weigh`); one batched fast-tokenizer call and the encodings' offsets
(or, for byte-level BPE, the tokens' byte lengths) then give every token its weight:

- a token that touches a weighted span (shares at least one character with it) gets the span's
  weight (the largest one, if it touches two);
- every other real token gets the collator's ``background`` weight (0 for a plain mask);
- pads weigh 0.

So a token that straddles the prompt/completion boundary of plain text is trained: it produces
completion characters. Searching token ids for a marker is not needed, and a marker that
tokenizes differently in context cannot be missed.

The work is split the way it is cheap. :meth:`MaskingCollator.prepare` tokenizes and masks every
example once, batched, inside ``datasets.map`` (``num_proc`` and the ``datasets`` cache work); it
reports every example it skipped, and why, before training starts. Calling the collator on a
list of prepared rows only pads them. Labels are ``IGNORE_INDEX`` where the weight is 0; a float
``loss_weights`` column exists only when some weight is strictly between 0 and 1, so the plain
path stays plain.

One stage per module, in the order an example goes through them:

- :mod:`.rendering`: a row -> text and the turns to learn (:func:`render_example`);
- :mod:`.alignment`: character spans -> token ranges (byte lengths, offsets, or prefixes);
- :mod:`.labels`: token ranges -> weights, labels, truncation, a batch at once in numpy;
- :mod:`.labeller`: all of it for a list of rows (:func:`label_examples`), as training does;
- :mod:`.preparation`: the same over a data set in ``datasets.map``, written to Arrow, and its
  report;
- :mod:`.collator`: the :class:`MaskingCollator` base class, its options and padding.
"""

from __future__ import annotations

from sft_plugins.batching import pad_batch
from sft_plugins.errors import SkipExample
from sft_plugins.loss import IGNORE_INDEX
from sft_plugins.masking.alignment import (
    ByteLevelSpans,
    encode_slow,
    token_ranges_fast,
    token_ranges_slow,
)
from sft_plugins.masking.collator import MaskingCollator
from sft_plugins.masking.labeller import Labelled, label_examples
from sft_plugins.masking.labels import token_weights
from sft_plugins.masking.preparation import PreparationReport, PreparedDataset
from sft_plugins.masking.rendering import (
    RenderedExample,
    Turn,
    WeightedSpan,
    Weighting,
    render_example,
)

__all__ = [
    "IGNORE_INDEX",
    "ByteLevelSpans",
    "Labelled",
    "MaskingCollator",
    "PreparationReport",
    "PreparedDataset",
    "RenderedExample",
    "SkipExample",
    "Turn",
    "WeightedSpan",
    "Weighting",
    "encode_slow",
    "label_examples",
    "pad_batch",
    "render_example",
    "token_ranges_fast",
    "token_ranges_slow",
    "token_weights",
]
