"""Embedding perturbers: noise added to the input embeddings while training, and never otherwise.

A :class:`Perturber` turns the embedding output of one batch into perturbed embeddings. It is told
what it needs about the batch in a :class:`BatchInfo`: the real length of the sequence each token
belongs to (from the attention mask, or from ``position_ids`` restarting at 0 for packed rows),
which tokens may be noised (pads never; prompt tokens optionally not), the step, the step's alpha
and a seeded generator.

The noise lives in a forward hook on the model's input embeddings, not in the model's forward,
because under FSDP and ZeRO-3 the embedding weights are sharded and only the wrapped forward can
run them. A second, cheap pair of hooks on the outer model reads the batch's ``attention_mask``,
``position_ids`` and ``labels`` for the duration of one forward call, so the embedding hook knows
the lengths. Installing is :meth:`Perturber.install`, which returns a :class:`PerturberHandle`
usable as a context manager, so the hooks are removed in a ``finally`` whatever happens::

    perturber = get_plugin_manager().perturbers.create("neftune", alpha=5.0)
    with perturber.install(model, seed=42, total_steps=1000) as handle:
        for step, batch in enumerate(batches):
            handle.set_step(step)
            model(**batch).loss.backward()

The hook does nothing while the embedding module is in eval mode (evaluation, prediction,
``generate``) or while alpha is 0. Its noise comes from a generator seeded from the seed, the
process rank, the step and the micro-batch index within the step, so a run resumed from a
checkpoint draws the same noise as an uninterrupted one.

Noise scale (Jain et al. 2023, "NEFTune", arXiv 2310.05914): ``alpha / sqrt(L * d)`` times a unit
noise ``eps`` element-wise, ``L`` the sequence's length and ``d`` the embedding width, so the
expected squared norm of a sequence's noise is ``alpha**2 * E[eps**2]`` whatever ``L`` is.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sft_plugins.errors import PerturberError
from sft_plugins.loss import IGNORE_INDEX
from sft_plugins.options import parse_bool

SCHEDULES = ("constant", "linear")
"""Alpha schedules: ``constant``, or ``linear`` decay from alpha at step 0 to 0 at the last step."""


@dataclass(frozen=True)
class BatchInfo:
    """What a perturber is told about the batch whose embeddings it perturbs.

    ``lengths`` and ``noise_mask`` have the batch's ``(batch, sequence)`` shape and live on the
    embeddings' device.
    """

    lengths: torch.Tensor
    """Float: the real length of the sequence (or packed segment) each token belongs to; 0 on
    pads."""
    noise_mask: torch.Tensor
    """Bool: the tokens that may receive noise (real tokens, minus prompt tokens when the
    perturber leaves them clean)."""
    step: int
    """The optimizer step (the Trainer's ``global_step``) the batch belongs to."""
    alpha: float
    """Alpha for this step, after the schedule."""
    generator: torch.Generator
    """The generator to draw noise from, seeded from (seed, rank, step, micro-batch)."""


def _finite_non_negative(value: Any, *, perturber: str, option: str) -> float:
    """``value`` as a float, or a :class:`PerturberError` naming the perturber and option."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise PerturberError(
            f"perturber {perturber!r}: option {option!r} must be a finite number >= 0, "
            f"got {value!r}. NEFTune's paper uses 5, 10 or 15; 0 turns the noise off"
        )
    return number


def _as_bool(value: Any, *, perturber: str, option: str) -> bool:
    """Accept booleans and the strings a command line or config file gives for them."""
    if isinstance(value, bool):
        return value
    try:
        return parse_bool(str(value))
    except ValueError:
        pass
    raise PerturberError(
        f"perturber {perturber!r}: option {option!r} must be true or false, got {value!r}"
    )


def _choice(value: Any, choices: tuple[str, ...], *, perturber: str, option: str) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise PerturberError(
            f"perturber {perturber!r}: option {option!r} must be one of "
            f"{', '.join(choices)}, got {value!r}"
        )
    return text


class Perturber:
    """Base class of embedding perturbers; subclass it and register the subclass.

    The constructor's keyword arguments are the options (``Registry.create`` checks them against
    the signature). The shared ones:

    ``alpha``
        Noise scale, a finite number >= 0 (0 turns the noise off).
    ``schedule``
        ``"constant"`` (default) or ``"linear"``: alpha decays linearly to 0 over training.
    ``noise_prompt``
        ``True`` (default) noises every real token, as NEFTune does; ``False`` leaves tokens
        whose label is -100 (the prompt) clean, which needs ``labels`` in the batch.

    A subclass usually overrides only :meth:`unit_noise` (the distribution of ``eps``); the base
    :meth:`perturb` scales it by ``alpha / sqrt(L * d)`` per sequence and zeroes pads. Override
    :meth:`perturb` for anything else.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    def __init__(self, *, alpha: float = 5.0, schedule: str = "constant",
                 noise_prompt: bool = True) -> None:
        who = self.name or type(self).__name__
        self.alpha = _finite_non_negative(alpha, perturber=who, option="alpha")
        self.schedule = _choice(schedule, SCHEDULES, perturber=who, option="schedule")
        self.noise_prompt = _as_bool(noise_prompt, perturber=who, option="noise_prompt")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(alpha={self.alpha}, schedule={self.schedule!r}, "
                f"noise_prompt={self.noise_prompt})")

    def alpha_at(self, step: int, total_steps: int | None) -> float:
        """Alpha at optimizer ``step`` of ``total_steps`` under this perturber's schedule."""
        if self.schedule == "constant":
            return self.alpha
        if not total_steps:
            raise PerturberError(
                f"perturber {self.name!r}: schedule 'linear' needs the number of training "
                f"steps; pass total_steps to install() (the Trainer callback does)"
            )
        return self.alpha * max(0.0, 1.0 - step / total_steps)

    def unit_noise(self, shape: torch.Size, generator: torch.Generator,
                   device: torch.device) -> torch.Tensor:
        """``eps`` of ``shape`` in float32, drawn from ``generator``; subclasses choose the law."""
        raise NotImplementedError(f"{type(self).__name__} must override unit_noise or perturb")

    def noise(self, embeddings: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
        """The float32 noise for ``embeddings``: ``eps * alpha / sqrt(L * d)``, 0 where masked."""
        dim = embeddings.size(-1)
        scale = batch.alpha * torch.rsqrt(batch.lengths.clamp(min=1.0) * dim)
        scale = torch.where(batch.noise_mask, scale, torch.zeros_like(scale))
        eps = self.unit_noise(embeddings.shape, batch.generator, embeddings.device)
        return eps.mul_(scale.unsqueeze(-1))

    def perturb(self, embeddings: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
        """The perturbed embeddings (a new tensor, so gradients flow through to the input)."""
        return embeddings + self.noise(embeddings, batch).to(embeddings.dtype)

    def install(self, model: nn.Module, *, seed: int = 0, rank: int = 0,
                total_steps: int | None = None) -> PerturberHandle:
        """Hook this perturber onto ``model``'s input embeddings until the handle is removed.

        ``model`` is the module the training loop calls (a plain model, a PEFT model, or a
        DDP/FSDP/DeepSpeed wrapper). ``seed`` and ``rank`` seed the noise; ``total_steps`` is
        needed by the linear schedule. Use the handle as a context manager.
        """
        if self.schedule != "constant":
            self.alpha_at(0, total_steps)  # fail now, not at the first training step
        return PerturberHandle(self, model, seed=seed, rank=rank, total_steps=total_steps)


_WRAPPER_ATTRIBUTES = ("_orig_mod", "module")
"""Where wrappers keep the wrapped model: torch.compile, then DDP, DataParallel, FSDP, DeepSpeed."""


def find_input_embeddings(model: nn.Module, *, perturber: str = "perturber") -> nn.Module:
    """The input embedding module of ``model``, looking through PEFT and distributed wrappers.

    PEFT, FSDP and DeepSpeed forward attribute look-ups to the model they wrap, so
    ``get_input_embeddings`` usually answers at the top; DDP and ``torch.compile`` do not, so
    their ``module``/``_orig_mod`` is unwrapped first.
    """
    current: Any = model
    for _ in range(8):  # wrappers nest a few levels at most
        getter = getattr(current, "get_input_embeddings", None)
        if callable(getter):
            try:
                found = getter()
            except (NotImplementedError, AttributeError):
                found = None
            if isinstance(found, nn.Module):
                return found
        inner = next((getattr(current, a) for a in _WRAPPER_ATTRIBUTES
                      if isinstance(getattr(current, a, None), nn.Module)), None)
        if inner is None:
            break
        current = inner
    raise PerturberError(
        f"perturber {perturber!r} cannot find the input embeddings of "
        f"{type(model).__name__}: it accepts a transformers model whose "
        f"get_input_embeddings() returns a module, possibly wrapped by PEFT, DDP, FSDP, "
        f"DeepSpeed or torch.compile. Implement get_input_embeddings() on the model"
    )


def _token_lengths(shape: tuple[int, int], device: torch.device,
                   attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths, real): each token's sequence (or packed segment) length, and the real tokens.

    Real tokens are those with attention mask 1 (all when there is no mask). Without position
    ids a row is one sequence; with them a segment starts wherever ``position_ids`` is 0 (and at
    the row's first column) and its length counts its real tokens.
    """
    rows, columns = shape
    if attention_mask is None:
        real = torch.ones(shape, dtype=torch.bool, device=device)
    else:
        real = attention_mask.to(device=device, dtype=torch.bool)
    if position_ids is None:
        lengths = real.sum(dim=1, keepdim=True, dtype=torch.float32).expand(rows, columns)
    else:
        starts = position_ids.to(device).expand(rows, columns) == 0
        starts[:, 0] = True
        segment = starts.cumsum(dim=1) - 1  # segment index within the row
        segment = segment + torch.arange(rows, device=device).unsqueeze(1) * columns
        counts = torch.zeros(rows * columns, dtype=torch.float32, device=device)
        counts.index_add_(0, segment.flatten(), real.flatten().to(torch.float32))
        lengths = counts[segment]
    return torch.where(real, lengths, torch.zeros_like(lengths)), real


def batch_info(shape: tuple[int, int], device: torch.device, *, step: int, alpha: float,
               generator: torch.Generator, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None,
               prompt_mask: torch.Tensor | None = None) -> BatchInfo:
    """Build the :class:`BatchInfo` of a ``(batch, sequence)`` batch from its model inputs.

    ``prompt_mask`` (bool, optional) marks tokens to keep clean, e.g. ``labels == -100``.
    """
    lengths, real = _token_lengths(shape, device, attention_mask, position_ids)
    if prompt_mask is not None:
        real = real & ~prompt_mask.to(device=device, dtype=torch.bool)
    return BatchInfo(lengths=lengths, noise_mask=real, step=step, alpha=alpha,
                     generator=generator)


def noise_seed(seed: int, rank: int, step: int, call: int) -> int:
    """A 63-bit generator seed that depends only on (seed, rank, step, micro-batch index)."""
    digest = hashlib.blake2b(struct.pack("<4q", seed, rank, step, call), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


_BATCH_KEYS = ("attention_mask", "position_ids", "labels")


class PerturberHandle:
    """A perturber installed on a model: its hooks, the current step and the noise seeds.

    Remove it with :meth:`remove` or by leaving its ``with`` block; removing twice is harmless.
    The training loop calls :meth:`set_step` at the start of each optimizer step.
    """

    def __init__(self, perturber: Perturber, model: nn.Module, *, seed: int, rank: int,
                 total_steps: int | None) -> None:
        self.perturber = perturber
        self.model = model
        self.embeddings = find_input_embeddings(model, perturber=perturber.name)
        self.seed = int(seed)
        self.rank = int(rank)
        self.total_steps = total_steps
        self.step = 0
        self._calls = 0
        self._batch: Mapping[str, Any] | None = None
        self._labels: torch.Tensor | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._capture, with_kwargs=True),
            model.register_forward_hook(self._release, always_call=True),
            self.embeddings.register_forward_hook(self._perturb),
        ]

    @property
    def installed(self) -> bool:
        """Whether the hooks are still attached."""
        return bool(self._handles)

    def set_step(self, step: int) -> None:
        """Start optimizer step ``step``: sets the schedule's position and the noise seeds."""
        self.step = int(step)
        self._calls = 0

    def set_labels(self, labels: torch.Tensor | None) -> None:
        """Labels of the batch about to run, for a training loop that keeps ``labels`` out of the
        model call (it computes the loss itself). Used by ``noise_prompt=False`` when the call
        has no ``labels`` argument; forgotten after the next forward."""
        self._labels = labels

    def remove(self) -> None:
        """Detach every hook (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
        self._batch = None
        self._labels = None

    def __enter__(self) -> PerturberHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.remove()

    def _capture(self, module: nn.Module, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self._batch = {key: kwargs.get(key) for key in _BATCH_KEYS}

    def _release(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._batch = None
        self._labels = None

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        generator.manual_seed(noise_seed(self.seed, self.rank, self.step, self._calls))
        return generator

    def _perturb(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not module.training or not isinstance(output, torch.Tensor) or output.dim() != 3:
            return None
        alpha = self.perturber.alpha_at(self.step, self.total_steps)
        if alpha == 0:
            return None
        batch = self._describe(output, alpha)
        self._calls += 1
        return self.perturber.perturb(output, batch)

    def _describe(self, output: torch.Tensor, alpha: float) -> BatchInfo:
        inputs = dict(self._batch or {})
        if inputs.get("labels") is None:
            inputs["labels"] = self._labels
        shape = (output.size(0), output.size(1))
        name = self.perturber.name
        for key in _BATCH_KEYS:
            value = inputs.get(key)
            if value is not None and tuple(value.shape[-2:]) != shape and not (
                    key == "position_ids" and value.dim() == 2 and value.size(0) == 1
                    and value.size(1) == shape[1]):
                raise PerturberError(
                    f"perturber {name!r}: the batch's {key} has shape {tuple(value.shape)} "
                    f"but the embeddings are {shape}; the perturber cannot tell which tokens "
                    f"are real. Pass {key} with one entry per input token"
                )
        labels = inputs.get("labels")
        prompt_mask = None
        if not self.perturber.noise_prompt:
            if labels is None:
                raise PerturberError(
                    f"perturber {name!r}: option noise_prompt=False needs labels in the batch "
                    f"(prompt tokens are those labelled {IGNORE_INDEX}); pass labels to the "
                    f"model, call handle.set_labels(labels) before it, or set noise_prompt=True"
                )
            prompt_mask = labels == IGNORE_INDEX
        return batch_info(shape, output.device, step=self.step, alpha=alpha,
                          generator=self._generator(output.device),
                          attention_mask=inputs.get("attention_mask"),
                          position_ids=inputs.get("position_ids"), prompt_mask=prompt_mask)


__all__ = [
    "IGNORE_INDEX",
    "SCHEDULES",
    "BatchInfo",
    "Perturber",
    "PerturberHandle",
    "batch_info",
    "find_input_embeddings",
    "noise_seed",
]
