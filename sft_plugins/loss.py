"""The weighted token loss, computed only where a token carries weight.

The loss of one optimizer step is ``sum(w * nll) / sum(w)``, the sums running over every
micro-batch of a gradient-accumulation step and every data-parallel rank. This module computes
the numerator for one micro-batch; the trainer supplies the denominator.

For a Llama 3 vocabulary (128 256 entries) the ``lm_head`` output dominates the memory of a
step: a full ``[batch, length, vocabulary]`` float32 tensor plus its gradient. Completion-only
training puts weight on a fraction of the positions, so the trainer asks the model for (almost)
no logits, captures the decoder's last hidden states, and runs the ``lm_head`` here on the
weighted positions only, a chunk at a time, recomputing each chunk in the backward pass instead
of storing its logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
"""The label of a token that carries no loss (what ``torch.nn.CrossEntropyLoss`` ignores)."""
WEIGHTS_KEY = "loss_weights"
"""The batch and data-set column of per-token loss weights (present only when some weight is
strictly between 0 and 1)."""

FAST_PATH_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
})
"""Architectures whose logits are ``lm_head(decoder(x).last_hidden_state)``, optionally soft-capped
(checked against the model's own logits in the tests). Others use the model's full logits."""


@dataclass
class TokenLoss:
    """The weighted negative log-likelihood of one micro-batch, not yet normalised."""

    weighted_sum: torch.Tensor
    """``sum(w * nll)`` over the micro-batch, differentiable."""
    weight_sum: torch.Tensor
    """``sum(w)`` over the micro-batch (no gradient)."""


def shifted_targets(labels: torch.Tensor, loss_weights: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and weights aligned with the logits that predict them (position ``i`` predicts
    token ``i + 1``). A label of -100 weighs 0 whatever ``loss_weights`` says."""
    targets = labels[..., 1:]
    if loss_weights is None:
        weights = targets.ne(IGNORE_INDEX).to(torch.float32)
    else:
        weights = loss_weights[..., 1:].to(torch.float32) * targets.ne(IGNORE_INDEX)
    return targets, weights


def loss_weight_total(labels: torch.Tensor, loss_weights: torch.Tensor | None) -> torch.Tensor:
    """``sum(w)`` of a micro-batch, counted on shifted targets as the loss counts it."""
    return shifted_targets(labels, loss_weights)[1].sum()


def loss_from_logits(logits: torch.Tensor, labels: torch.Tensor,
                     loss_weights: torch.Tensor | None) -> TokenLoss:
    """The weighted loss from full ``[batch, length, vocab]`` logits (the fallback path)."""
    targets, weights = shifted_targets(labels, loss_weights)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                          targets.flatten().clamp_min(0), reduction="none")
    return TokenLoss((nll * weights.flatten()).sum(), weights.sum())


def _chunk_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               targets: torch.Tensor, weights: torch.Tensor,
               softcap: float | None) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return (F.cross_entropy(logits, targets, reduction="none") * weights).sum()


def loss_from_hidden_states(hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor,
                            loss_weights: torch.Tensor | None, *, chunk_size: int = 1024,
                            softcap: float | None = None) -> TokenLoss:
    """The weighted loss, running ``lm_head`` only on positions whose target has weight.

    ``hidden`` is the decoder's last hidden state ``[batch, length, dim]``. Each chunk of at
    most ``chunk_size`` positions is checkpointed: its logits exist only while that chunk's
    loss (and, in the backward pass, its gradient) is computed.
    """
    targets, weights = shifted_targets(labels, loss_weights)
    keep = weights.ne(0)
    picked = hidden[:, :-1][keep]
    picked_targets = targets[keep]
    picked_weights = weights[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, picked.shape[0], chunk_size):
        end = start + chunk_size
        args = (picked[start:end], lm_head.weight, lm_head.bias, picked_targets[start:end],
                picked_weights[start:end], softcap)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_nll, *args, use_reentrant=False)
        else:
            total = total + _chunk_nll(*args)
    if picked.shape[0] == 0:  # keep the graph connected so every rank runs the same backward
        total = total + (hidden.sum() + lm_head.weight.sum()) * 0.0
    return TokenLoss(total, weights.sum())


SOFTCAPPED_MODEL_TYPES = frozenset({"gemma2", "gemma3_text"})
"""Architectures whose forward soft-caps the logits with ``config.final_logit_softcapping``."""


def softcap_of(config: Any) -> float | None:
    """The final-logit soft-capping a model applies (Gemma 2/3), or ``None``."""
    if getattr(config, "model_type", None) not in SOFTCAPPED_MODEL_TYPES:
        return None
    value = getattr(config, "final_logit_softcapping", None)
    return float(value) if value else None


@contextmanager
def capture_last_hidden_state(decoder: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the decoder's ``last_hidden_state`` during one forward pass (hook removed after)."""
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        state = getattr(output, "last_hidden_state", None)
        captured.append(state if state is not None else output[0])

    handle = decoder.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


__all__ = [
    "FAST_PATH_MODEL_TYPES",
    "IGNORE_INDEX",
    "WEIGHTS_KEY",
    "TokenLoss",
    "capture_last_hidden_state",
    "loss_from_hidden_states",
    "loss_from_logits",
    "loss_weight_total",
    "shifted_targets",
    "softcap_of",
]
