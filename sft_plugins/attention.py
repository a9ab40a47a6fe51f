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
    """Whether the mask lets a token see another sequence of its row. transformers builds a
    block-diagonal mask only without an ``attention_mask``; given one, it lets packed sequences
    see each other, and so must this implementation to stay equal to ``sdpa``. Reads the
    off-block parts as views: no row-sized temporaries, one device sync."""
    outside = []
    for row, lengths in enumerate(segments):
        rows = mask[row if mask.shape[0] > 1 else 0]
        start = 0
        for n in lengths:
            end = start + n
            outside += [rows[..., start:end, :start].any(), rows[..., start:end, end:].any()]
            start = end
    return bool(torch.stack(outside).any())


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
    length = query.shape[2]
    segments = None
    if (position_ids is not None and position_ids.dim() == 2 and key.shape[2] == length
            and position_ids.shape[-1] == length and kwargs.get("position_bias") is None
            and attention_mask is not None and attention_mask.dtype == torch.bool):
        segments = packed_segments(position_ids.expand(query.shape[0], -1))
    if segments is None or _attends_across(attention_mask, segments):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    rows = []
    for row, lengths in enumerate(segments):
        # split's backward is one cat, where indexing would add a full-size zero gradient per piece
        pieces = zip(query[row].split(lengths, 1), key[row].split(lengths, 1),
                     value[row].split(lengths, 1), strict=True)
        outputs, start = [], 0
        for q, k, v in pieces:
            end = start + q.shape[1]
            mask = attention_mask[row if attention_mask.shape[0] > 1 else 0, None, ...,
                                  start:end, start:end]
            out, _ = sdpa_attention_forward(module, q[None], k[None], v[None], mask,
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
