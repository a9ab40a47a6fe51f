"""``SFTPluginTrainer``: the one Trainer subclass the plugins are injected into.

Plugins never subclass the Trainer. Downstream code may, and is meant to override only these:

``compute_token_loss(model, inputs, labels, loss_weights)``
    Run the model and return the micro-batch's un-normalised :class:`~sft_plugins.loss.TokenLoss`.
    Override to change the per-token loss (label smoothing, a distillation term, ...); the
    trainer keeps normalising by the total weight of the optimizer step.
``loss_weight_total(batch)``
    The ``sum(w)`` one micro-batch contributes to the normaliser. Override together with
    ``compute_token_loss`` when your loss weighs tokens differently.

Everything else is ``transformers.Trainer`` as documented there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from sft_plugins.loss import (
    FAST_PATH_MODEL_TYPES,
    TokenLoss,
    capture_last_hidden_state,
    loss_from_hidden_states,
    loss_from_logits,
    loss_weight_total,
    softcap_of,
)

WEIGHTS_KEY = "loss_weights"


def _core_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/accelerate and PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _head_is_plain_linear(head: nn.Module | None) -> bool:
    """False for an ``lm_head`` that carries an adapter or is wrapped/quantized: calling its
    weight directly would skip what the wrapper adds."""
    return type(head) is nn.Linear


class SFTPluginTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is ``sum(w * nll) / sum(w)`` over each optimizer step.

    Batches carry ``labels`` (-100 where nothing is learned) and optionally float
    ``loss_weights``. The sum of weights runs over all micro-batches of a gradient-accumulation
    step and all data-parallel ranks, so neither changes the result. The ``lm_head`` runs only
    on positions that carry weight (in checkpointed chunks of ``logits_chunk_size``) when the
    architecture is one whose logits are known to be ``lm_head(last_hidden_state)``; otherwise,
    and under FSDP or DeepSpeed (whose sharded ``lm_head`` only its own forward can run), the
    model's full logits are used.
    """

    loss_is_scaled_for_ga = True  # normalised by the step's total weight, never divided again

    def __init__(self, *args: Any, logits_chunk_size: int = 1024, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Prepared batches hold only model inputs, labels and loss weights; the Trainer would
        # otherwise drop `loss_weights`, which no model's forward names.
        self.args.remove_unused_columns = False
        self.logits_chunk_size = logits_chunk_size

    # ---- extension points -------------------------------------------------------------------

    def loss_weight_total(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """``sum(w)`` of one micro-batch, on the shifted targets the loss uses."""
        return loss_weight_total(batch["labels"], batch.get(WEIGHTS_KEY))

    def compute_token_loss(self, model: nn.Module, inputs: dict[str, Any],
                           labels: torch.Tensor, loss_weights: torch.Tensor | None
                           ) -> tuple[TokenLoss, Any]:
        """Run ``model`` on ``inputs`` and return the un-normalised weighted loss and outputs."""
        core = _core_model(model)
        head = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
        fast = (
            model.training
            and getattr(core.config, "model_type", None) in FAST_PATH_MODEL_TYPES
            and _head_is_plain_linear(head)
            and not self.is_fsdp_enabled
            and not self.is_deepspeed_enabled
        )
        if not fast:
            outputs = model(**inputs, use_cache=False)
            return loss_from_logits(outputs.logits, labels, loss_weights), outputs
        with capture_last_hidden_state(core.get_decoder()) as captured:
            outputs = model(**inputs, use_cache=False, logits_to_keep=1)
        loss = loss_from_hidden_states(captured[-1], head, labels, loss_weights,
                                       chunk_size=self.logits_chunk_size,
                                       softcap=softcap_of(core.config))
        return loss, outputs

    # ---- Trainer overrides ------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator: Iterator[Any], num_batches: int,
                          device: torch.device) -> tuple[list[Any], torch.Tensor | None]:
        """Collect one optimizer step's micro-batches and the total loss weight they carry,
        summed across data-parallel ranks."""
        batches: list[Any] = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches or "labels" not in batches[0]:
            return batches, None
        total = sum(self.loss_weight_total(b).to(device) for b in batches)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return batches, total

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """``sum(w * nll)`` of this micro-batch over the step's ``sum(w)``.

        ``num_items_in_batch`` is the step's total weight from :meth:`get_batch_samples` while
        training. Data-parallel training averages gradients over ranks, so the loss is scaled
        by the number of ranks to leave a global ``sum / sum``. Evaluation normalises each batch
        by its own weight.
        """
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        loss_weights = inputs.pop(WEIGHTS_KEY, None)
        token_loss, outputs = self.compute_token_loss(model, inputs, labels, loss_weights)
        if model.training and num_items_in_batch is not None:
            denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32,
                                          device=token_loss.weighted_sum.device)
            scale = (self.accelerator.num_processes
                     if self.args.average_tokens_across_devices else 1)
        else:
            denominator = token_loss.weight_sum.to(token_loss.weighted_sum.device)
            scale = 1
        loss = token_loss.weighted_sum / denominator.clamp_min(torch.finfo(torch.float32).tiny)
        loss = loss * scale
        return (loss, outputs) if return_outputs else loss


__all__ = ["SFTPluginTrainer"]
