"""``SFTPluginTrainer``: the one Trainer subclass the plugins are injected into.

It takes a chat template, a masking collator and an embedding perturber, by registered name (with
options) or as objects, and injects them: the template configures the tokenizer, the collator
tokenizes and masks every example before step 1 and pads the batches, the perturber is hooked
onto the input embeddings for the duration of ``train()`` only. Without ``collator=``, the
training data picks it (:func:`default_collator_name`, as ``sft-plugins train`` does).

Plugins never subclass the Trainer. Downstream code may, and is meant to override only these:

``prepare_dataset(dataset, split)``
    The extension point for custom data preparation: turn one split's rows into
    ``input_ids``/``labels``/``loss_weights`` rows (default: the collator's ``prepare``; data
    that already has ``input_ids`` is used as is). It runs once per split after
    ``Trainer.__init__``, on the main process first (``args.main_process_first``), so it may
    use ``self.args``, ``self.accelerator``, ``self.processing_class``, ``self.collator`` and
    ``self.chat_template``, and the other ranks load what the main process wrote to the
    ``datasets`` cache.

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

import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow.compute as pc
import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainerState
from transformers.modeling_utils import unwrap_model
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    TrainOutput,
    rotate_checkpoints,
    unwrap_peft_model,
)

from sft_plugins.arrow_rows import visible_rows
from sft_plugins.attention import attend_packed_rows_by_example
from sft_plugins.batching import PackedCollator, pack_prepared
from sft_plugins.callbacks import PerturberCallback
from sft_plugins.checkpoints import (
    CheckpointError,
    disk_full_error,
    is_disk_full,
    mark_complete,
    resolve_checkpoint,
)
from sft_plugins.data import DataSummary
from sft_plugins.errors import DataError, LaunchError, ModelLoadError
from sft_plugins.loss import (
    FAST_PATH_MODEL_TYPES,
    IGNORE_INDEX,
    WEIGHTS_KEY,
    TokenLoss,
    capture_last_hidden_state,
    loss_from_hidden_states,
    loss_from_logits,
    loss_weight_total,
    softcap_of,
)
from sft_plugins.manager import PluginManager, get_plugin_manager
from sft_plugins.masking import MaskingCollator, PreparationReport
from sft_plugins.perturb import Perturber
from sft_plugins.preemption import SaveOnSigterm
from sft_plugins.templates import ChatTemplate

logger = logging.getLogger(__name__)


def _core_model(model: nn.Module) -> nn.Module:
    """The transformers model under distributed, ``torch.compile`` and PEFT wrappers."""
    return unwrap_peft_model(unwrap_model(model))


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

    ``packing=True`` packs the prepared training examples into rows of ``packing_max_length``
    tokens (default: the collator's ``max_length``) whose ``position_ids`` restart at each
    example, so attention and loss never cross examples (:mod:`sft_plugins.batching`); a model
    on ``sdpa`` is switched to ``sdpa_packed``, which attends one example at a time
    (:mod:`sft_plugins.attention`).

    ``collator=None`` (the default) uses the collator :func:`default_collator_name` picks for
    ``train_dataset``: ``completion-only`` for prompt/completion data, ``all-tokens`` for plain
    text, ``assistant-only`` otherwise.

    ``Trainer.__init__`` runs first, with the data sets as given; then every split goes through
    :meth:`prepare_dataset` under ``args.main_process_first`` and the prepared sets become
    ``train_dataset``/``eval_dataset``.
    """

    loss_is_scaled_for_ga = True  # normalised by the step's total weight, never divided again

    def __init__(
        self,
        model: Any = None,
        args: Any = None,
        *,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | None = None,
        processing_class: Any = None,
        data_collator: Any = None,
        template: str | ChatTemplate | None = None,
        template_options: Mapping[str, Any] | None = None,
        collator: str | MaskingCollator | None = None,
        collator_options: Mapping[str, Any] | None = None,
        perturber: str | Perturber | None = None,
        perturber_options: Mapping[str, Any] | None = None,
        plugin_manager: PluginManager | None = None,
        dataset_num_proc: int | None = None,
        logits_chunk_size: int = 1024,
        full_logits: bool = False,
        packing: bool = False,
        packing_max_length: int | None = None,
        resume_incomplete: bool = False,
        data_summary: DataSummary | None = None,
        **kwargs: Any,
    ) -> None:
        self._check_launch(args)
        self.resume_incomplete = resume_incomplete
        """Resume from a checkpoint that lacks optimizer, scheduler or RNG state, or was never
        marked complete, with a warning instead of an error."""
        self.finished_before_start = False
        """Set by :meth:`train` when the checkpoint resumed from had already finished the run."""
        self.plugin_manager = plugin_manager or get_plugin_manager()
        self.logits_chunk_size = logits_chunk_size
        self.full_logits = full_logits
        """Always use the model's full logits (to compare against, or to debug)."""
        self.dataset_num_proc = dataset_num_proc
        self.packing = packing
        """Training rows are packed examples (:mod:`sft_plugins.batching`)."""
        self.data_summary = data_summary
        """What loading the data kept and skipped (``load_sft_dataset``'s summary); :meth:`train`
        adds what preparation kept and writes both to ``data_summary.json``."""
        self._resolve_plugins(model, processing_class, train_dataset, template=template,
                              template_options=template_options, collator=collator,
                              collator_options=collator_options, perturber=perturber,
                              perturber_options=perturber_options)
        self.preparation: dict[str, PreparationReport] = {}
        super().__init__(model=model, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         data_collator=self._choose_data_collator(
                             data_collator, processing_class, packing=packing),
                         **kwargs)
        # Prepared batches hold only model inputs, labels and loss weights; the Trainer would
        # otherwise drop `loss_weights`, which no model's forward names.
        self.args.remove_unused_columns = False
        self._prepare_datasets(train_dataset, eval_dataset, packing=packing,
                               packing_max_length=packing_max_length)
        self._warn_if_fsdp_fell_back()
        self._perturber_callback: PerturberCallback | None = None
        if self.perturber is not None:
            self._perturber_callback = PerturberCallback(self.perturber)
            self.add_callback(self._perturber_callback)
        self.sigterm = SaveOnSigterm(self._on_any_rank)
        """SIGTERM during :meth:`train` saves a checkpoint and stops (``sigterm.stopped_at``)."""
        self.add_callback(self.sigterm)

    @staticmethod
    def _check_launch(args: Any) -> None:
        """Stop, before any work, processes launched together that would each train alone
        (accelerate does not join CPU processes unless asked to)."""
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and args is not None and args.world_size == 1:
            raise LaunchError(
                f"this process is one of {launched} launched (WORLD_SIZE={launched}), but the "
                "Trainer runs it alone: every process would train its own copy on all the data. "
                "Without a GPU, pass --use_cpu true (use_cpu=True) so the processes train "
                "together over gloo")

    def _warn_if_fsdp_fell_back(self) -> None:
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        fsdp_asked = bool(self.args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP") == "true"
        if fsdp_asked and not self.is_fsdp_enabled and launched > 1:
            logger.warning("FSDP was asked for, but accelerate runs it only on accelerators: "
                           "these %d processes train as DDP, each holding the whole model",
                           launched)

    def _configure_generation(self, model: nn.Module, tokenizer: Any) -> None:
        """Make the saved generation config stop at every stop token of the template (the
        end-of-turn token first), so ``generate`` after ``apply_chat_template`` stops where
        the model was trained to."""
        config = getattr(model, "generation_config", None)
        if config is None or self.chat_template is None:
            return
        stops = self.chat_template.stop_token_ids(tokenizer)
        if stops:
            config.eos_token_id = stops
        config.pad_token_id = tokenizer.pad_token_id

    # ---- plugin resolution ------------------------------------------------------------------

    def _resolve_plugins(self, model: Any, processing_class: Any, train_dataset: Any, *,
                         template: str | ChatTemplate | None,
                         template_options: Mapping[str, Any] | None,
                         collator: str | MaskingCollator | None,
                         collator_options: Mapping[str, Any] | None,
                         perturber: str | Perturber | None,
                         perturber_options: Mapping[str, Any] | None) -> None:
        """Set :attr:`chat_template` (configuring the tokenizer and the model's generation
        config with it), :attr:`collator` (by default :func:`default_collator_name` of the
        training set) and :attr:`perturber`."""
        self.chat_template = self.plugin_manager.resolve_template(template, processing_class,
                                                                  template_options)
        if self.chat_template is not None and processing_class is not None:
            self.chat_template.configure_tokenizer(processing_class)
            if model is not None:
                self._configure_generation(_core_model(model), processing_class)
        self.collator = self._resolve(
            default_collator_name(train_dataset) if collator is None else collator,
            collator_options, self.plugin_manager.collators)
        self.perturber = (None if perturber is None else
                          self._resolve(perturber, perturber_options,
                                        self.plugin_manager.perturbers))

    def _choose_data_collator(self, data_collator: Any, processing_class: Any, *,
                              packing: bool) -> Any:
        """The Trainer's ``data_collator``: the one given, else the masking collator (bound to
        the tokenizer for its pad token), or for packed rows a ``PackedCollator``."""
        if data_collator is not None:
            return data_collator
        if self.collator.pad_token_id is None and processing_class is not None:
            self.collator.bind(processing_class, self.chat_template)
        return PackedCollator(self.collator.pad_token_id) if packing else self.collator

    def _resolve(self, item: Any, options: Mapping[str, Any] | None, registry: Any) -> Any:
        if isinstance(item, str):
            return registry.create(item, **dict(options or {}))
        if options:
            raise TypeError(f"options {sorted(options)} were given for {item!r}, which is "
                            "already built; pass its name instead, or build it with them")
        return item

    # ---- extension points -------------------------------------------------------------------

    def prepare_dataset(self, dataset: Dataset, split: str) -> Dataset:
        """Tokenize and mask ``dataset`` once, before step 1; report what was kept and skipped.

        The extension point for custom preparation: override it (calling
        ``super().prepare_dataset`` or not) to filter, augment or tokenize rows your own way.
        ``split`` is ``"train"``, ``"eval"`` or ``"eval-<name>"`` for the sets given at
        construction (``"eval"``/``"test"`` and ``"<split>-<name>"`` for those given to
        :meth:`evaluate`/:meth:`predict`). It runs after ``Trainer.__init__``, on the main
        process first (``args.main_process_first``; the other ranks then load the ``datasets``
        cache it wrote), so ``self.args``, ``self.accelerator``, ``self.processing_class``,
        ``self.collator`` and ``self.chat_template`` are all set. Return rows with
        ``input_ids`` and ``labels`` (-100 where nothing is learned) and optionally float
        ``loss_weights``; the trainer then checks their token ids against the model's input
        embedding and, with ``packing=True``, packs the training rows.

        By default, rows that already carry ``input_ids`` and ``labels`` are taken as prepared;
        rows with ``input_ids`` and a 0/1 ``assistant_masks`` or ``completion_mask`` (TRL's
        pre-tokenized columns) get ``labels`` from it; ``input_ids`` alone is refused. Other
        rows go through the collator's ``prepare``, whose report is kept in
        :attr:`preparation` and written to ``data_summary.json`` by :meth:`train`.
        """
        if "input_ids" in dataset.column_names:
            return labels_from_token_masks(dataset, split)
        if self.processing_class is None:
            raise TypeError("SFTPluginTrainer needs processing_class (the tokenizer) to "
                            "prepare a data set of conversations")
        prepared = self.collator.prepare(dataset, self.processing_class, self.chat_template,
                                         num_proc=self.dataset_num_proc)
        report = self.preparation[split] = prepared.report
        if report.total and not report.kept:
            first = f"; the first: {report.first_skips[0]}" if report.first_skips else ""
            raise DataError(f"{split}: preparation kept none of the {report.total} examples "
                            f"(skipped: {report.skip_counts()}{first}), so there is nothing to "
                            "train on. Raise max_length, or change the collator's truncation "
                            "rule")
        logger.warning("%s: %s; %s", split, report.summary(),
                       trained_token_summary(prepared.dataset))
        return prepared.dataset

    def _prepare_datasets(self, train_dataset: Any, eval_dataset: Any, *, packing: bool,
                          packing_max_length: int | None) -> None:
        """Prepare the data sets given at construction on the main process first (it writes
        the ``datasets`` cache, the other ranks load it) and make them the Trainer's."""
        with self.args.main_process_first(desc="sft-plugins: preparing the data sets"):
            if train_dataset is not None:
                train_dataset = self._prepare_for(self.model, train_dataset, "train")
                if packing:  # best-fit rows, see sft_plugins.batching
                    train_dataset = pack_prepared(train_dataset,
                                                  packing_max_length or self.collator.max_length)
            eval_dataset = self._prepare_later(eval_dataset, "eval")
        if packing and train_dataset is not None:
            attend_packed_rows_by_example(_core_model(self.model))
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset

    def _prepare_for(self, model: Any, dataset: Dataset, split: str) -> Dataset:
        """``prepare_dataset``, then stop before training on a token id the model cannot embed
        (a tokenizer that is not the model's): the first forward would fail mid-training with
        an index error."""
        prepared = self.prepare_dataset(dataset, split)
        core = _core_model(model) if model is not None else None
        embedding = core.get_input_embeddings() if hasattr(core, "get_input_embeddings") else None
        rows = getattr(embedding, "num_embeddings", None)
        if rows is None or not len(prepared):
            return prepared
        ids = visible_rows(prepared).column("input_ids")
        tokens = pc.list_flatten(ids)
        first = pc.index(pc.greater_equal(tokens, rows), True).as_py()
        if first >= 0:
            raise ModelLoadError(
                f"{split} example {pc.list_parent_indices(ids)[first].as_py()} has token id "
                f"{tokens[first].as_py()}, but the model's input embedding has {rows} rows: the "
                "tokenizer is not this model's. Use the model's own tokenizer "
                "(--tokenizer_name_or_path), or grow the embedding to the tokenizer first "
                "(model.resize_token_embeddings(len(tokenizer)))")
        return prepared

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
            and not self.full_logits
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

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any,
              **kwargs: Any) -> Any:
        """``Trainer.train``, with the preparation report written to the output directory and
        the perturber's hooks removed in a ``finally``, also when training raises.

        ``resume_from_checkpoint=True`` (or ``"true"``) resumes from the newest *complete*
        checkpoint of ``output_dir`` (:mod:`sft_plugins.checkpoints`), saying which newer ones
        it passed over. A checkpoint without optimizer, scheduler or RNG state is refused unless
        ``resume_incomplete=True``. A checkpoint at the run's last step trains nothing: the run
        had finished (:attr:`finished_before_start`).
        """
        checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir,
                                        accept_incomplete=self.resume_incomplete)
        if checkpoint is not None:
            finished = self._finished_at(checkpoint)
            if finished is not None:
                self.finished_before_start = True
                logger.warning("%s: the run had finished (step %d of %s); nothing to train",
                               checkpoint, finished.global_step, self.args.max_steps
                               if self.args.max_steps > 0 else
                               f"{self.args.num_train_epochs} epochs")
                return finished
        if (self.preparation or self.data_summary) and self.args.should_save:
            self._write_data_summary()
        self.sigterm.install()
        try:
            return super().train(checkpoint, *args, **kwargs)
        finally:
            self.sigterm.remove()
            if self._perturber_callback is not None:
                self._perturber_callback.remove()

    def _write_data_summary(self) -> None:
        """One ``data_summary.json``: the data loader's skips and preparation's, per split."""
        summary = self.data_summary or DataSummary(on_bad_example=self.collator.on_bad_example)
        for split, report in self.preparation.items():
            summary.add_preparation(split, report)
        summary.write_json(self.args.output_dir)

    def _on_any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process of the run."""
        if self.args.world_size <= 1:
            return flag
        total = self.accelerator.reduce(torch.tensor([float(flag)], device=self.args.device),
                                        reduction="sum")
        return bool(total.item() > 0)

    def _finished_at(self, checkpoint: str) -> TrainOutput | None:
        """A TrainOutput for a checkpoint that already reached the run's end, else ``None``."""
        try:
            state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{checkpoint}: its {TRAINER_STATE_NAME} cannot be read "
                                  f"({exc}); resume from another checkpoint") from None
        if self.args.max_steps > 0:
            done = state.global_step >= self.args.max_steps
        else:
            done = (state.epoch or 0) >= self.args.num_train_epochs - 1e-9
        if not done:
            return None
        self.state = state
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        return TrainOutput(state.global_step, losses[-1] if losses else float("nan"), {})

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """``Trainer._save_checkpoint``, then (once every rank has written its part) the
        checkpoint is marked complete; older checkpoints are rotated away (``save_total_limit``)
        only after that, so a kill at any moment leaves a complete checkpoint to resume from."""
        run_dir = self._get_output_dir(trial=trial)
        target = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # the Trainer would rotate before the mark
        try:
            super()._save_checkpoint(model, trial)
        except Exception as exc:
            if not is_disk_full(exc, run_dir):
                raise
            shutil.rmtree(target, ignore_errors=True)
            raise disk_full_error(run_dir, self.state.global_step, exc) from exc
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            mark_complete(target, self.state.global_step)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint,
                               use_mtime=True)

    def evaluate(self, eval_dataset: Any = None, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate``; a data set passed here is prepared as the one given at
        construction was (conversations are tokenized and masked, prepared rows kept)."""
        return super().evaluate(self._prepare_passed(eval_dataset, "eval"), *args, **kwargs)

    def predict(self, test_dataset: Any, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.predict``, preparing ``test_dataset`` first, as :meth:`evaluate` does."""
        return super().predict(self._prepare_passed(test_dataset, "test"), *args, **kwargs)

    def _prepare_passed(self, dataset: Any, split: str) -> Any:
        """A data set passed to :meth:`evaluate`/:meth:`predict`, prepared on the main process
        first like those given at construction (``None``, the sets given then, passes as is)."""
        if dataset is None:
            return None
        with self.args.main_process_first(desc=f"sft-plugins: preparing {split}"):
            return self._prepare_later(dataset, split)

    def _prepare_later(self, dataset: Any, split: str) -> Any:
        if isinstance(dataset, Dataset):
            return self._prepare_for(self.model, dataset, split)
        if isinstance(dataset, Mapping):
            return {k: self._prepare_later(v, f"{split}-{k}") for k, v in dataset.items()}
        return dataset

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``, plus what a trained directory needs to be used elsewhere.

        Under FSDP with a sharded state dict (which the Trainer's own final save skips), the
        final save gathers the full weights, so the output directory loads with
        ``from_pretrained`` like any other; checkpoints stay sharded. A LoRA adapter is saved
        with the generation config (peft writes none), whose stop tokens are the template's:
        the base model's own config may stop only at its end-of-text token.
        """
        plugin = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
        if (_internal_call or plugin is None
                or "FULL_STATE_DICT" in str(plugin.state_dict_type)):
            super().save_model(output_dir, _internal_call)
        else:
            sharded = plugin.state_dict_type
            plugin.set_state_dict_type("FULL_STATE_DICT")
            try:
                super().save_model(output_dir, _internal_call)
            finally:
                plugin.set_state_dict_type(sharded)
        unwrapped = unwrap_model(self.model)
        base = unwrap_peft_model(unwrapped)
        saved_an_adapter = base is not unwrapped
        if (self.args.should_save and saved_an_adapter
                and getattr(base, "generation_config", None) is not None):
            base.generation_config.save_pretrained(output_dir or self.args.output_dir)

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
        handle = self._perturber_callback.handle if self._perturber_callback else None
        if handle is not None:  # labels never reach the model: tell the perturber which
            handle.set_labels(labels)  # tokens are prompt (for noise_prompt=False)
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


DEFAULT_COLLATOR_SAMPLE = 100
"""How many leading rows :func:`default_collator_name` reads for a completion index or offset."""


def default_collator_name(dataset: Any) -> str:
    """The collator a training set gets when none is named, by the library and the CLI alike.

    ``completion-only`` for prompt/completion data: TRL's ``prompt`` and ``completion``
    columns (message lists or strings), or rows of :mod:`sft_plugins.data` whose
    ``completion_index`` (conversations from prompt/completion or Alpaca data) or
    ``completion_offset`` (string prompt/completion) is set in one of the first
    :data:`DEFAULT_COLLATOR_SAMPLE` rows. ``all-tokens`` for other plain ``text``.
    ``assistant-only`` for other conversations (``messages``), for pre-tokenized rows, and
    without a ``datasets.Dataset`` (``None``). Columns are looked at in the order the
    collators read a row: ``messages``, then ``prompt``/``completion``, then ``text``.
    """
    columns = set(dataset.column_names) if isinstance(dataset, Dataset) else set()
    if "messages" in columns:
        return ("completion-only" if _any_set(dataset, "completion_index")
                else "assistant-only")
    if {"prompt", "completion"} <= columns:
        return "completion-only"
    if "text" in columns:
        return "completion-only" if _any_set(dataset, "completion_offset") else "all-tokens"
    return "assistant-only"


def _any_set(dataset: Dataset, column: str) -> bool:
    """Whether ``column`` is non-null in one of the first rows of ``dataset``."""
    if column not in dataset.column_names:
        return False
    head = dataset.select(range(min(len(dataset), DEFAULT_COLLATOR_SAMPLE)))
    return any(value is not None for value in head[column])


TOKEN_MASK_COLUMNS = ("assistant_masks", "completion_mask")
"""Pre-tokenized columns (TRL's names) whose 1s mark the tokens to learn."""


def labels_from_token_masks(dataset: Dataset, split: str) -> Dataset:
    """``dataset`` with ``labels``: kept when present, else ``input_ids`` where a token-mask
    column is 1 and -100 elsewhere; a :class:`DataError` when neither column is there."""
    columns = dataset.column_names
    if "labels" in columns:
        return dataset
    mask = next((c for c in TOKEN_MASK_COLUMNS if c in columns), None)
    if mask is None:
        raise DataError(f"{split} rows have input_ids but no labels column; add labels (-100 "
                        f"where nothing is learned) or a 0/1 {' or '.join(TOKEN_MASK_COLUMNS)} "
                        "column, or pass conversations and let the collator tokenize them")

    def label(row: dict[str, Any]) -> dict[str, Any]:
        if len(row[mask]) != len(row["input_ids"]):
            raise DataError(f"{split} rows: {mask} has {len(row[mask])} entries for "
                            f"{len(row['input_ids'])} input_ids; they must be one per token")
        return {"labels": [t if m else IGNORE_INDEX
                           for t, m in zip(row["input_ids"], row[mask], strict=True)]}

    return dataset.map(label, remove_columns=[mask], desc=f"{split}: labels from {mask}")


def trained_token_summary(dataset: Dataset) -> str:
    """Tokens, trained tokens and trained fraction of a prepared data set, read from Arrow."""
    labels = pc.list_flatten(visible_rows(dataset).column("labels"))
    total = len(labels)
    trained = total - pc.sum(pc.equal(labels, IGNORE_INDEX)).as_py() if total else 0
    fraction = trained / total if total else 0.0
    return f"{total} tokens, {trained} trained ({fraction:.1%})"


__all__ = ["DEFAULT_COLLATOR_SAMPLE", "SFTPluginTrainer",
           "default_collator_name", "labels_from_token_masks", "trained_token_summary"]
