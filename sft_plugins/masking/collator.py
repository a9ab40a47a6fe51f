"""The base class of every masking collator: its options, what a subclass decides, and padding.

A subclass only says which characters of a rendered example carry loss, and with what weight
(:meth:`MaskingCollator.weigh`). The base class validates the options every collator shares,
finds the pad token, prepares a data set once (:mod:`.preparation`) and, called on prepared
rows, pads them into a batch (:func:`sft_plugins.batching.pad_batch`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from datasets import IterableDataset

from sft_plugins.bad_examples import POLICIES, OnBadExample
from sft_plugins.batching import pad_batch
from sft_plugins.errors import MaskingError, PluginOptionError, TemplateError
from sft_plugins.masking.preparation import PreparedDataset, prepare_dataset, prepare_stream
from sft_plugins.masking.rendering import EXPANSIONS, Expansion, RenderedExample, Weighting
from sft_plugins.templates import ChatTemplate

if TYPE_CHECKING:
    import datasets

Truncation = Literal["keep_start", "keep_end", "drop"]
TRUNCATIONS: tuple[str, ...] = ("keep_start", "keep_end", "drop")
PADDING_SIDES: tuple[str, ...] = ("right", "left")


class MaskingCollator:
    """Base class of every masking collator: prepares examples once, then pads batches.

    Subclasses set ``name``, ``aliases``, ``description`` and implement :meth:`weigh`. The
    constructor's keyword arguments are the collator's options (subclasses add their own and
    pass these on):

    ``max_length``: longest sequence kept, in tokens (``None``: no limit).
    ``truncation``: what to do with a longer example: ``keep_start`` (cut the end), ``keep_end``
    (cut the start) or ``drop`` (skip it, counted). An example left with no trained token is
    skipped and counted (``strict=True``: raised).
    ``pad_to_multiple_of``: round the padded length up to a multiple of this.
    ``padding_side``: ``right`` (default) or ``left``.
    ``pad_token``: the padding token; default the template's, else the tokenizer's. Never the
    end-of-sequence token, which a model must learn to produce.
    ``on_bad_example``: ``error`` (default) or ``skip`` (counted and reported) for an example
    that cannot be masked: no assistant turn, empty completion, a span outside the text... (the
    policy and words of :mod:`sft_plugins.bad_examples`).
    ``literal_special_tokens``: special-token strings inside the data (``<|eot_id|>`` quoted
    in an answer) are tokenized as the text they are (default, with a fast tokenizer), not as
    the special tokens; ``False`` gives ``apply_chat_template``'s behaviour
    (:mod:`sft_plugins.literal_text`).
    ``expand``: ``off`` (default), ``reasoning`` or ``all``: split a conversation into one
    example per assistant turn, each trained in the context the model sees when it generates that
    turn, where the template would drop a trained turn's reasoning (``reasoning``) or always
    (``all``); see :func:`~sft_plugins.masking.rendering.render_examples`. With ``off``, a
    trained turn whose reasoning the template drops is a bad example (``reasoning_dropped``).
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give a subclass its docstring as ``description``, and, when its ``__init__`` takes
        its own keyword options plus ``**options`` for the base, a signature that lists both,
        so the registry validates every option and the command line can offer them."""
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("description") and cls.__doc__:
            cls.description = inspect.cleandoc(cls.__doc__)
        own = list(inspect.signature(cls.__init__).parameters.values())
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own):
            cls.__signature__ = _with_base_options(own)  # type: ignore[attr-defined]

    def __init__(self, *, max_length: int | None = None, truncation: Truncation = "keep_start",
                 strict: bool = False, pad_to_multiple_of: int | None = None,
                 padding_side: Literal["right", "left"] = "right", pad_token: str | None = None,
                 on_bad_example: OnBadExample = "error",
                 literal_special_tokens: bool = True, expand: Expansion = "off") -> None:
        self._check_option("max_length", max_length, max_length is None or max_length >= 1,
                           "a positive number of tokens")
        self._check_option("truncation", truncation, truncation in TRUNCATIONS,
                           " or ".join(TRUNCATIONS))
        self._check_option("pad_to_multiple_of", pad_to_multiple_of,
                           pad_to_multiple_of is None or pad_to_multiple_of >= 1, "a positive int")
        self._check_option("padding_side", padding_side, padding_side in PADDING_SIDES,
                           " or ".join(PADDING_SIDES))
        self._check_option("on_bad_example", on_bad_example, on_bad_example in POLICIES,
                           " or ".join(POLICIES))
        self._check_option("expand", expand, expand in EXPANSIONS, " or ".join(EXPANSIONS))
        self.max_length = max_length
        self.truncation = truncation
        self.strict = strict
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side
        self.pad_token = pad_token
        self.on_bad_example = on_bad_example
        self.literal_special_tokens = literal_special_tokens
        self.expand = expand
        self.pad_token_id: int | None = None
        """Set by :meth:`prepare` (or by hand when only padding is needed)."""

    def _check_option(self, option: str, value: object, valid: bool, expected: str) -> None:
        if not valid:
            raise self._option_error(option, value, expected)

    def _option_error(self, option: str, value: object, expected: str) -> Exception:
        return PluginOptionError(f"collator {self.name!r}: option {option}={value!r} is invalid; "
                                 f"expected {expected}")

    # -- what subclasses decide ---------------------------------------------------------

    def weigh(self, example: RenderedExample) -> Weighting:
        """The weighted character spans of one rendered example (and the weight of the rest).

        Raise :class:`~sft_plugins.errors.SkipExample` (or a :class:`DataError`) for an example
        this collator cannot train on; preparation counts it or raises it, as
        ``on_bad_example`` says.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement weigh()")

    @property
    def weighted(self) -> bool:
        """True when this collator can give a token a weight strictly between 0 and 1 (then
        preparation writes a ``loss_weights`` column). Subclasses with fractional weights
        override it."""
        return False

    # -- preparation --------------------------------------------------------------------

    def resolve_pad_token_id(self, tokenizer: Any, template: ChatTemplate | None) -> int:
        """The pad token id, by the rule tokenizer configuration follows too
        (:meth:`ChatTemplate.training_pad_token`): the ``pad_token`` option, else the template's
        pad token or the first of its fallbacks the vocabulary has, else the tokenizer's; never
        the token that ends a trained turn (labels here follow positions, but any code that
        masks labels by pad id would then hide the stop token). Without a template, the
        tokenizer's pad token, which must not be its end of sequence.
        """
        token = self._pad_token(tokenizer, template)
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == getattr(tokenizer, "unk_token_id", object()):
            raise MaskingError(f"collator {self.name!r}: pad token {token!r} is not in the "
                               "tokenizer's vocabulary")
        return int(token_id)

    def _pad_token(self, tokenizer: Any, template: ChatTemplate | None) -> str:
        if isinstance(template, ChatTemplate):
            try:
                return template.training_pad_token(tokenizer, self.pad_token)
            except TemplateError as exc:
                raise MaskingError(f"collator {self.name!r}: {exc}") from None
        token = self.pad_token or getattr(template, "pad_token", None) or tokenizer.pad_token
        if token is None:
            raise MaskingError(f"collator {self.name!r}: no pad token (the template and the "
                               "tokenizer have none); pass pad_token=<an unused special token>")
        end = getattr(template, "eos_token", None) if template is not None else \
            tokenizer.eos_token
        if token == end:
            raise MaskingError(f"collator {self.name!r}: the pad token {token!r} ends a trained "
                               "turn (the end-of-sequence token the model must learn to "
                               "produce); pass pad_token=<an unused special token>")
        return token

    def bind(self, tokenizer: Any, template: ChatTemplate | None) -> None:
        """Learn what preparation and padding need from the tokenizer and template (the pad
        token id). Subclasses that need more (a marker's text) extend it."""
        self.pad_token_id = self.resolve_pad_token_id(tokenizer, template)

    def prepare(self, dataset: datasets.Dataset | datasets.IterableDataset, tokenizer: Any,
                template: ChatTemplate | None = None, *, num_proc: int | None = None,
                batch_size: int = 1000,
                load_from_cache_file: bool | None = None,
                desc: str | None = "Tokenizing and masking",
                split: str = "train") -> PreparedDataset:
        """Tokenize and mask every example once (``datasets.map``, batched, cacheable).

        A ``datasets.IterableDataset`` is labelled the same way, a batch of ``batch_size``
        rows at a time while it is read (``num_proc``, ``load_from_cache_file`` and ``desc``
        do not apply); skips are settled as they are met and the report fills as it is read
        (``split`` names it in the warnings that quote them).

        Returns a data set with ``input_ids``, ``labels`` (and ``loss_weights`` when
        :attr:`weighted`) and a report of every skipped example. Errors name the example's
        file and line when the rows carry ``source_file``/``source_line`` (as
        :mod:`sft_plugins.data` writes them), else its index. An invalid example raises
        (:class:`MaskingError`, :class:`DataError`, :class:`TemplateError`) unless
        ``on_bad_example="skip"``. Each row is labelled by
        :func:`~sft_plugins.masking.label_examples`.
        """
        if isinstance(dataset, IterableDataset):
            return prepare_stream(self, dataset, tokenizer, template, batch_size=batch_size,
                                  split=split)
        return prepare_dataset(self, dataset, tokenizer, template, num_proc=num_proc,
                               batch_size=batch_size,
                               load_from_cache_file=load_from_cache_file, desc=desc)

    # -- padding ------------------------------------------------------------------------

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad prepared rows into a batch: ``input_ids``, ``attention_mask``, ``labels`` and,
        when any row has them, ``loss_weights`` (rows without get 1 where labelled). Pads are
        the pad token, label ``IGNORE_INDEX``, weight 0."""
        if self.pad_token_id is None:
            raise MaskingError(f"collator {self.name!r} has no pad token id: prepare the data "
                               "with collator.prepare(...) first, or set collator.pad_token_id")
        batch, rows = pad_batch(features, self.pad_token_id,
                                pad_to_multiple_of=self.pad_to_multiple_of,
                                padding_side=self.padding_side)
        attention = torch.zeros_like(batch["input_ids"])
        for row, cols in enumerate(rows):
            attention[row, cols] = 1
        batch["attention_mask"] = attention
        return batch


def _with_base_options(own: list[inspect.Parameter]) -> inspect.Signature:
    """A subclass's ``__init__`` parameters (less ``self`` and ``**options``) followed by the
    base class's options it does not redefine."""
    base = inspect.signature(MaskingCollator.__init__).parameters.values()
    merged = [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in merged}
    merged += [p for p in base if p.name not in names and p.name != "self"]
    return inspect.Signature(merged[1:])


__all__ = ["TRUNCATIONS", "MaskingCollator", "Truncation"]
