"""``SFTPluginTrainer``: the one Trainer subclass the plugins are injected into.

It takes a chat template, a masking collator and an embedding perturber, by registered name (with
options) or as objects, and injects them: the template configures the tokenizer, the collator
tokenizes and masks every example before step 1 and pads the batches, the perturber is hooked
onto the input embeddings for the duration of ``train()`` only. Without ``collator=``, the
training data picks it (:func:`~sft_plugins.given_data.default_collator_name`, as
``sft-plugins train`` does).

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

Streams. ``train_dataset``/``eval_dataset`` may be ``datasets.IterableDataset`` (from
``load_sft_dataset(..., streaming=True)`` or ``datasets.load_dataset(..., streaming=True)``):
they are labelled (and the training stream packed, best-fit over a bounded buffer) while training
reads them, in the training process, which counts their skips as they are met and logs them
(``skipped_examples``). ``max_steps`` is then required. Under several processes each rank reads
its own part of the training stream (``datasets.distributed.split_dataset_by_node``; whole files
when their number divides by the number of ranks, else every N-th example), prepared as one
process would and never dispatched or split again by accelerate; a rank whose part ends first
trains zero-weight batches until every rank has finished the pass, so every example is trained
once per pass and the ranks' steps stay in step. An evaluation stream is evaluated whole by
every rank.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow.compute as pc
import torch
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import gather_object
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerState
from transformers.modeling_utils import unwrap_model
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    TrainOutput,
    rotate_checkpoints,
    unwrap_peft_model,
)

from sft_plugins.arrow_rows import column_names, visible_rows
from sft_plugins.attention import attend_packed_rows_by_example
from sft_plugins.bad_examples import PassCounts, merge_counts
from sft_plugins.batching import (
    DEFAULT_PACKING_BUFFER,
    PackedCollator,
    StreamPacker,
    pack_prepared,
    pack_stream,
)
from sft_plugins.callbacks import PerturberCallback
from sft_plugins.checkpoints import (
    CheckpointError,
    disk_full_error,
    is_disk_full,
    mark_complete,
    resolve_checkpoint,
)
from sft_plugins.data import DataSummary
from sft_plugins.errors import ConfigError, DataError, LaunchError, ModelLoadError
from sft_plugins.given_data import (
    check_taken_as_prepared,
    default_collator_name,
    labels_from_token_masks,
    trained_token_summary,
)
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
from sft_plugins.preemption import SaveOnStopSignal
from sft_plugins.templates import ChatTemplate

logger = logging.getLogger(__name__)


def _core_model(model: nn.Module) -> nn.Module:
    """The transformers model under distributed, ``torch.compile`` and PEFT wrappers."""
    return unwrap_peft_model(unwrap_model(model))


def _embedding_rows(model: nn.Module | None) -> int | None:
    """How many token ids the model's input embedding has rows for (``None``: unknown)."""
    core = _core_model(model) if model is not None else None
    embedding = core.get_input_embeddings() if hasattr(core, "get_input_embeddings") else None
    return getattr(embedding, "num_embeddings", None)


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

    A ``datasets.IterableDataset`` is prepared while training reads it (module docstring,
    "Streams"); packed, it is packed over ``packing_buffer_size`` examples at a time.

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
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | None = None,
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
        packing_buffer_size: int = DEFAULT_PACKING_BUFFER,
        resume_incomplete: bool = False,
        data_summary: DataSummary | None = None,
        **kwargs: Any,
    ) -> None:
        self._check_launch(args)
        self._check_streams(args, train_dataset, eval_dataset)
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
        self.packing_buffer_size = packing_buffer_size
        self.packer: StreamPacker | None = None
        """The packer of a packed training stream (its ``report()``: the fill so far)."""
        self.stream_sharing: dict[str, str] = {}
        """How each streamed split is shared between ranks: ``shards`` (each rank reads its own
        files), ``examples`` (each rank reads every example and keeps every N-th) or ``whole``
        (one process, or an evaluation stream every rank evaluates whole)."""
        self._spent_iterator: Any = None
        self._pass_iterator: Any = None
        self._filler: dict[str, Any] | None = None
        self._last_batch: dict[str, Any] | None = None
        self._embedding_rows: int | None = None
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
        self.stop_signals = SaveOnStopSignal(self._most_on_any_rank)
        """SIGTERM or a first Ctrl-C during :meth:`train` saves a checkpoint and stops
        (``stop_signals.stopped_at``)."""
        self.add_callback(self.stop_signals)

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

    @staticmethod
    def _check_streams(args: Any, train_dataset: Any, eval_dataset: Any) -> None:
        """Refuse, before anything is built, what a stream cannot do: tell its length (so the
        run needs ``max_steps``), be counted in worker processes, be split twice."""
        streams = [d for d in (train_dataset, eval_dataset) if isinstance(d, IterableDataset)]
        if not streams or args is None:
            return
        if isinstance(train_dataset, IterableDataset) and args.max_steps <= 0:
            raise ConfigError("the training data is a stream (datasets.IterableDataset), which "
                              "has no length, so the number of steps cannot follow from "
                              "num_train_epochs: set max_steps (--max_steps N)")
        if args.dataloader_num_workers:
            raise ConfigError(f"dataloader_num_workers={args.dataloader_num_workers}: a stream "
                              "is labelled in the training process, which counts its skipped "
                              "examples; set dataloader_num_workers=0 (--dataloader_num_workers "
                              "0)")
        if any(getattr(d, "_distributed", None) is not None for d in streams):
            raise ConfigError("the stream was already split between ranks "
                              "(split_dataset_by_node); pass the whole stream: the trainer "
                              "gives each rank its part")

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

        A ``datasets.IterableDataset`` (already this rank's part, for training) is prepared the
        same way into a stream labelled as it is read; its report fills as training reads it.
        Any other object (a torch ``Dataset``, a list) is taken as prepared rows, as it is; one
        whose first row is a mapping without ``input_ids`` is refused.
        """
        if not isinstance(dataset, (Dataset, IterableDataset)):
            check_taken_as_prepared(dataset, split)
            return dataset
        if "input_ids" in column_names(dataset):
            return labels_from_token_masks(dataset, split)
        if self.processing_class is None:
            raise TypeError("SFTPluginTrainer needs processing_class (the tokenizer) to "
                            "prepare a data set of conversations")
        prepared = self.collator.prepare(dataset, self.processing_class, self.chat_template,
                                         num_proc=self.dataset_num_proc, split=split)
        report = self.preparation[split] = prepared.report
        if isinstance(prepared.dataset, IterableDataset):
            logger.info("%s: a stream, labelled while training reads it", split)
            return prepared.dataset
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
        self._embedding_rows = _embedding_rows(self.model)
        with self.args.main_process_first(desc="sft-plugins: preparing the data sets"):
            if train_dataset is not None:
                train_dataset = self._prepare_for(self.model, self._rank_part(train_dataset),
                                                  "train")
                length = packing_max_length or self.collator.max_length
                if packing and isinstance(train_dataset, IterableDataset):
                    train_dataset, self.packer = pack_stream(train_dataset, length,
                                                             self.packing_buffer_size)
                elif packing:  # best-fit rows, see sft_plugins.batching
                    train_dataset = pack_prepared(train_dataset, length)
            eval_dataset = self._prepare_later(eval_dataset, "eval")
        if packing and train_dataset is not None:
            attend_packed_rows_by_example(_core_model(self.model))
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset

    def _rank_part(self, dataset: Any) -> Any:
        """This rank's part of a training stream (``split_dataset_by_node``): its own files
        when their number divides by the number of ranks, else every N-th example. A data set
        with a length is left to the Trainer's distributed sampler, as before."""
        if not isinstance(dataset, IterableDataset):
            return dataset
        ranks = self.accelerator.num_processes
        if ranks == 1:
            self.stream_sharing["train"] = "whole"
            return dataset
        strategy = "shards" if dataset.num_shards % ranks == 0 else "examples"
        self.stream_sharing["train"] = strategy
        logger.info("train: a stream of %d shard(s) split between %d ranks by %s",
                    dataset.num_shards, ranks, strategy)
        return split_dataset_by_node(dataset, rank=self.accelerator.process_index,
                                     world_size=ranks, strategy=strategy)

    def _prepare_for(self, model: Any, dataset: Any, split: str) -> Any:
        """``prepare_dataset``, then stop before training on a token id the model cannot embed
        (a tokenizer that is not the model's): the first forward would fail mid-training with
        an index error. (A stream's batches are checked as they are collated.)"""
        if isinstance(dataset, IterableDataset):
            self.stream_sharing.setdefault(split, "whole")
        prepared = self.prepare_dataset(dataset, split)
        rows = _embedding_rows(model)
        if rows is None or not isinstance(prepared, Dataset) or not len(prepared):
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
        for split in self.stream_sharing:  # counted from here, by the rank that reads it
            record = self._streamed_record(split)
            if record is not None:
                record.restart_counts()
        if (self.preparation or self.data_summary) and self.args.should_save:
            self._write_data_summary()
        self.stop_signals.install()
        try:
            result = super().train(checkpoint, *args, **kwargs)
        except BaseException:
            if self.stream_sharing and self.args.should_save:  # what was read, as far as read
                self._write_data_summary()
            raise
        finally:
            self.stop_signals.remove()
            if self._perturber_callback is not None:
                self._perturber_callback.remove()
        if self.stream_sharing:  # streams are counted while training reads them
            self._write_data_summary(gathered=True)
        return result

    def _write_data_summary(self, *, gathered: bool = False) -> None:
        """One ``data_summary.json``: the data loader's skips and preparation's, per split.

        ``gathered`` (after training, on every rank: a collective) first brings the counts of
        each streamed split to what all ranks read, logs them, and reports the stream packer's
        fill; only the main process writes."""
        summary = self.data_summary or DataSummary(on_bad_example=self.collator.on_bad_example)
        if gathered:
            for split in self.stream_sharing:
                data, labelling = self._stream_counts(split, gathered=True)
                record, report = self._streamed_record(split), self.preparation.get(split)
                if data is not None and record is not None:
                    record.set_counts(data)
                if labelling is not None and report is not None:
                    report.total, report.kept = labelling.examples, labelling.kept
                    report.skipped, report.first_skips = labelling.skipped, labelling.samples
        for split, report in self.preparation.items():
            summary.add_preparation(split, report)
        for record in summary.splits:
            record.streaming = record.streaming or record.split in self.stream_sharing
        if gathered and self.args.should_save:
            logger.warning("streamed data, as read:\n%s", summary.render())
            if self.packer is not None:
                logger.warning("train (this rank): %s", self.packer.report().summary())
        if self.args.should_save:
            summary.write_json(self.args.output_dir)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """``push_to_hub``: the hub repository is created at construction. Without a network,
        a token or the right to create it, say so in one line before anything trains."""
        try:
            super().init_hf_repo(token, private)
        except Exception as exc:  # the call is hub I/O only: whatever fails is the hub's
            name = self.args.hub_model_id or os.path.basename(os.path.abspath(
                self.args.output_dir))
            raise ConfigError(f"--push_to_hub: cannot create the hub repository {name!r} "
                              f"({type(exc).__name__}: {exc}); check the network and the token "
                              "(hf auth login, --hub_token), or drop --push_to_hub") from exc

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """The upload after training; a failure says that the model is saved locally."""
        try:
            return super().push_to_hub(*args, **kwargs)
        except Exception as exc:  # the upload is hub I/O only
            raise ConfigError(f"the model is saved in {self.args.output_dir}, but pushing it to "
                              f"{self.hub_model_id!r} failed ({type(exc).__name__}: {exc}); "
                              f"upload it with: hf upload {self.hub_model_id} "
                              f"{self.args.output_dir}") from exc

    def _most_on_any_rank(self, value: int) -> int:
        """The largest of ``value`` (0 to 64: a signal number, or 0) over the processes of the
        run, by the one all-reduce (a sum of one-hot counts) every step already made."""
        if self.args.world_size <= 1:
            return value
        counts = torch.nn.functional.one_hot(torch.tensor(value), 65).float()
        total = self.accelerator.reduce(counts.to(self.args.device), reduction="sum")
        return int(total.nonzero().max().item())

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
        if isinstance(dataset, (Dataset, IterableDataset)):
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
        summed across data-parallel ranks.

        For a training stream, the ranks also agree on how many micro-batches the step has:
        a rank whose part of the pass has ended fills in zero-weight batches while another
        still has data (as DDP's ``join`` shadows an uneven rank), and the pass ends for all
        ranks together when none has any left. A pass that gives no batch at all is an error.
        """
        batches: list[Any] = []
        if epoch_iterator is self._spent_iterator:  # every rank has finished this pass
            return batches, None
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if isinstance(self.train_dataset, IterableDataset):
            batches = self._even_out(batches, epoch_iterator)
        if not batches or "labels" not in batches[0]:
            return batches, None
        total = sum(self.loss_weight_total(b).to(device) for b in batches)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return batches, total

    def _even_out(self, batches: list[Any], epoch_iterator: Any) -> list[Any]:
        """This rank's micro-batches, padded with zero-weight ones to as many as the rank with
        the most has (none: the pass is over for every rank)."""
        first_of_pass = self._pass_iterator is not epoch_iterator
        self._pass_iterator = epoch_iterator
        most = len(batches)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.gather(torch.tensor([most], device=self.args.device))
            most = int(counts.max().item())
        if most == 0:
            if first_of_pass and self.state.global_step:
                raise DataError(
                    f"cannot resume at step {self.state.global_step}: the Trainer resumes a "
                    "stream by skipping that many steps' batches of its first pass, and the "
                    "first pass is shorter (the run had begun a second pass). Resume from a "
                    "checkpoint within the first pass over the data, or train from the start")
            if first_of_pass:
                raise DataError(f"train: a whole pass over the stream gave no example to train "
                                f"on ({self._skips_described()}); check the data and "
                                "--on_bad_example, --max_length and the collator's truncation")
            self._spent_iterator = epoch_iterator
            return batches
        if batches:
            self._filler = None
            self._last_batch = batches[-1]
        return batches + [self._filler_batch()] * (most - len(batches))

    def _filler_batch(self) -> dict[str, Any]:
        """A micro-batch that trains nothing: the last real one with every weight 0 (the same
        shapes, so every rank runs the same forward and backward), or one pad token."""
        if self._filler is None:
            last = self._last_batch
            if last is None:
                last = self.data_collator([{"input_ids": [self.collator.pad_token_id or 0],
                                            "labels": [IGNORE_INDEX]}])
            filler = dict(last)
            filler["labels"] = torch.full_like(last["labels"], IGNORE_INDEX)
            if WEIGHTS_KEY in filler:
                filler[WEIGHTS_KEY] = torch.zeros_like(last[WEIGHTS_KEY])
            self._filler = filler
        return self._filler

    def _get_dataloader(self, dataset: Any, description: str, batch_size: int,
                        sampler_fn: Any = None, is_training: bool = False,
                        dataloader_key: str | None = None) -> Any:
        """``Trainer._get_dataloader``, except for a stream: it is this rank's own part (or an
        evaluation stream every rank reads whole), so accelerate must neither dispatch rank 0's
        batches to the others (its default for an ``IterableDataset``) nor split it again;
        it is prepared as one process's loader (device placement, end-of-data tracking), with
        each batch's token ids checked against the model's embedding as it is collated."""
        if not isinstance(dataset, IterableDataset):
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn,
                                           is_training, dataloader_key)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=self._collate_checked,
                            pin_memory=self.args.dataloader_pin_memory)
        return prepare_data_loader(loader, self.accelerator.device, num_processes=1,
                                   process_index=0, put_on_device=True, dispatch_batches=False,
                                   non_blocking=self.accelerator.non_blocking)

    def _collate_checked(self, features: list[dict[str, Any]]) -> Any:
        batch = self.data_collator(features)
        rows = self._embedding_rows
        if rows is not None and "input_ids" in batch and batch["input_ids"].numel():
            top = int(batch["input_ids"].max())
            if top >= rows:
                raise ModelLoadError(
                    f"a streamed batch has token id {top}, but the model's input embedding has "
                    f"{rows} rows: the tokenizer is not this model's. Use the model's own "
                    "tokenizer (--tokenizer_name_or_path), or grow the embedding to the "
                    "tokenizer first (model.resize_token_embeddings(len(tokenizer)))")
        return batch

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """``Trainer.log``; with a training stream, each training log also carries
        ``skipped_examples``: the examples its data rules and labelling have skipped so far
        (summed over the ranks when they read different files)."""
        if "loss" in logs and "train" in self.stream_sharing:
            skipped = torch.tensor([float(self._skipped_so_far("train"))],
                                   device=self.args.device)
            if self.stream_sharing["train"] == "shards":
                skipped = self.accelerator.reduce(skipped, reduction="sum")
            logs["skipped_examples"] = int(skipped.item())
        super().log(logs, start_time)

    def _stream_counts(self, split: str, *, gathered: bool = False
                       ) -> tuple[PassCounts | None, PassCounts | None]:
        """What reading a streamed split has counted so far: the data rules' (when the data
        summary has the split) and labelling's. ``gathered``: of the whole run, which takes
        every rank (a collective): summed when each rank read its own files, else this rank's,
        since every rank read the same examples (rank 0's is the one written)."""
        record = self._streamed_record(split)
        report = self.preparation.get(split)
        counts = (None if record is None else record.counts(),
                  None if report is None else PassCounts(
                      report.total, report.kept, dict(report.skipped), list(report.first_skips),
                      report.rows if report.rows is not None else report.total))
        if not gathered or self.stream_sharing.get(split) != "shards":
            return counts
        everyone = gather_object([counts])
        data, labelling = ([rank[i] for rank in everyone] for i in (0, 1))
        return (None if counts[0] is None else merge_counts(data),  # type: ignore[arg-type]
                None if counts[1] is None else merge_counts(labelling))  # type: ignore[arg-type]

    def _streamed_record(self, split: str) -> Any:
        return next((r for r in (self.data_summary.splits if self.data_summary else ())
                     if r.split == split and r.streaming), None)

    def _skipped_so_far(self, split: str) -> int:
        return sum(c.skipped_total for c in self._stream_counts(split) if c is not None)

    def _skips_described(self) -> str:
        counts = [c for c in self._stream_counts("train") if c is not None]
        skipped = merge_counts(counts).skipped
        return ("skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(skipped.items()))
                if skipped else "none skipped")

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


__all__ = ["SFTPluginTrainer"]
