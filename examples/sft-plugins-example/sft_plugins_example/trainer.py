"""Subclassing SFTPluginTrainer: an auxiliary z-loss on top of the weighted token loss.

The z-loss (Chowdhery et al. 2022, PaLM, section 5) adds ``coefficient * log(Z)**2`` per trained
token, ``Z`` the softmax normaliser, to keep logits from drifting. It needs the full logits, so
this subclass gives up the trained-positions-only ``lm_head`` of the base class. It overrides
only the documented extension point, ``compute_token_loss``; the base class keeps normalising by
the total weight of each optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sft_plugins.loss import TokenLoss, loss_from_logits, shifted_targets
from sft_plugins.trainer import SFTPluginTrainer


class ZLossTrainer(SFTPluginTrainer):
    """``SFTPluginTrainer`` plus ``z_loss * sum(w * logsumexp(logits)**2)``."""

    def __init__(self, *args: Any, z_loss: float = 1e-4, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.z_loss = z_loss

    def compute_token_loss(self, model: nn.Module, inputs: dict[str, Any],
                           labels: torch.Tensor, loss_weights: torch.Tensor | None
                           ) -> tuple[TokenLoss, Any]:
        outputs = model(**inputs, use_cache=False)
        loss = loss_from_logits(outputs.logits, labels, loss_weights)
        _, weights = shifted_targets(labels, loss_weights)
        log_z = torch.logsumexp(outputs.logits[:, :-1].float(), dim=-1)
        penalty = (weights * log_z.square()).sum()
        return TokenLoss(loss.weighted_sum + self.z_loss * penalty, loss.weight_sum), outputs
