"""``sdpa_packed``: SDPA that attends one packed example at a time.

transformers gives SDPA a packed row as one ``max_length`` x ``max_length`` block-diagonal mask,
so the kernel computes (and differentiates) every score between examples only to mask it away:
a row of 1 024 tokens holding eight examples costs the attention of one 1 024-token sequence,
not of eight short ones. FlashAttention's varlen kernels avoid that on CUDA when installed; on
the CPU, and wherever ``flash_attn`` is missing, nothing does.

This implementation splits each row where its ``position_ids`` stop counting up (the rule of
transformers' ``find_packed_sequence_indices``, so the pieces are exactly the blocks of that
mask) and runs transformers' own ``sdpa_attention_forward`` on each piece with its diagonal
block of the mask. The result equals ``sdpa`` on the whole row (tested to float32 round-off);
the work is ``sum(n_i**2)`` instead of ``max_length**2``. Everything else goes to ``sdpa``
unchanged: rows that are not packed, a mask that lets sequences see each other (transformers
builds the block-diagonal mask only when the batch has no ``attention_mask``), decoding with a
cache, a position bias. So a model can keep ``sdpa_packed`` for evaluation and generation.

Importing this module registers the name with transformers' ``AttentionInterface`` and
``AttentionMaskInterface`` (the mask is SDPA's); :class:`~sft_plugins.trainer.SFTPluginTrainer`
switches a model from ``sdpa`` to it when it packs. To choose it yourself::

    import sft_plugins.attention  # registers "sdpa_packed"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa_packed")
"""

from __future__ import annotations

import itertools
import logging
import weakref
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

logger = logging.getLogger(__name__)

SDPA_PACKED = "sdpa_packed"


def packed_segments(position_ids: torch.Tensor) -> list[list[int]] | None:
    """Lengths of the sequences in each row: a new one starts wherever a position is not its
    predecessor + 1. ``None`` when every row is a single sequence (nothing to split)."""
    starts = torch.diff(position_ids, dim=-1) != 1  # True at i: a sequence starts at i + 1
    if not bool(starts.any()):
        return None
    width = position_ids.shape[1]
    segments = []
    for row in starts.cpu():
        bounds = [0, *(row.nonzero().flatten() + 1).tolist(), width]
        segments.append([end - start for start, end in itertools.pairwise(bounds)])
    return segments


def _attends_across(mask: torch.Tensor, segments: list[list[int]]) -> bool:
    """Whether the mask (one per row) lets a token see another sequence of its row.
    transformers builds a block-diagonal mask only without an ``attention_mask``; given one, it
    lets packed sequences see each other, and so must this implementation to stay equal to
    ``sdpa``. Reads the off-block parts as views: no row-sized temporaries, one device sync."""
    outside = []
    for row, lengths in enumerate(segments):
        start = 0
        for n in lengths:
            end = start + n
            outside += [mask[row, ..., start:end, :start].any(),
                        mask[row, ..., start:end, end:].any()]
            start = end
    return bool(torch.stack(outside).any())


_this_forward: tuple[weakref.ref, weakref.ref, int, list[list[int]] | None] | None = None
"""The last answer of :func:`_separate_sequences`, with weak references to the position ids and
mask it was for, and the batch size."""


def _separate_sequences(position_ids: torch.Tensor, mask: torch.Tensor,
                        batch: int) -> list[list[int]] | None:
    """The sequence lengths of each of ``batch`` rows (``position_ids`` and ``mask`` may hold
    one row for all) when the rows are packed and the mask keeps the sequences apart, else
    ``None``. Every layer of one forward gets the same two tensors, so the answer (a few device
    syncs) is worked out once per forward; weak references neither keep the tensors alive nor
    match a new tensor that reuses a freed one's address."""
    global _this_forward
    if (_this_forward is not None and _this_forward[0]() is position_ids
            and _this_forward[1]() is mask and _this_forward[2] == batch):
        return _this_forward[3]
    segments = packed_segments(position_ids.expand(batch, -1))
    if segments is not None and _attends_across(mask.expand(batch, *mask.shape[1:]), segments):
        segments = None
    _this_forward = (weakref.ref(position_ids), weakref.ref(mask), batch, segments)
    return segments


def sdpa_packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Same signature and result as transformers' ``sdpa_attention_forward`` (output
    ``(batch, length, heads, head_dim)``, no weights)."""
    position_ids = kwargs.get("position_ids")
    batch, length = query.shape[0], query.shape[2]
    segments = None
    if (position_ids is not None and position_ids.dim() == 2 and key.shape[2] == length
            and position_ids.shape[-1] == length and kwargs.get("position_bias") is None
            and attention_mask is not None and attention_mask.dtype == torch.bool):
        segments = _separate_sequences(position_ids, attention_mask, batch)
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    mask = attention_mask.expand(batch, *attention_mask.shape[1:])
    rows = []
    for row, lengths in enumerate(segments):
        # split's backward is one cat, where indexing would add a full-size zero gradient per piece
        pieces = zip(query[row].split(lengths, 1), key[row].split(lengths, 1),
                     value[row].split(lengths, 1), strict=True)
        outputs, start = [], 0
        for q, k, v in pieces:
            end = start + q.shape[1]
            out, _ = sdpa_attention_forward(module, q[None], k[None], v[None],
                                            mask[row, None, ..., start:end, start:end],
                                            dropout=dropout, scaling=scaling, **kwargs)
            outputs.append(out)
            start = end
        rows.append(torch.cat(outputs, dim=1))
    return torch.cat(rows, dim=0), None


def attend_packed_rows_by_example(model: Any) -> bool:
    """Switch a transformers model from ``sdpa`` to ``sdpa_packed``; other implementations
    (``eager``, FlashAttention, flex) are left as chosen. Returns whether it switched."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(SDPA_PACKED)
    logger.info("packed rows: attention switched from sdpa to %s (one example at a time, "
                "same result)", SDPA_PACKED)
    return True


AttentionInterface.register(SDPA_PACKED, sdpa_packed_attention_forward)
AttentionMaskInterface.register(SDPA_PACKED, sdpa_mask)
