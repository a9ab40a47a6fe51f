"""First-party perturbers, registered through the public hooks like any third-party plugin.

``neftune`` (uniform noise, Jain et al. 2023, arXiv 2310.05914), ``gaussian`` (normal noise, an
ablation in the same paper), ``symnoise`` (symmetric Bernoulli noise, Yadav et al. 2023, arXiv
2312.01523) and ``none``. All scale the unit noise by ``alpha / sqrt(L * d)`` with ``L`` each
sequence's real length; see ``docs/perturbers.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sft_plugins import hookimpl
from sft_plugins.errors import PerturberError
from sft_plugins.perturb import BatchInfo, Perturber

LENGTHS = ("real", "padded")


class NEFTune(Perturber):
    """Uniform noise in [-1, 1] scaled by alpha / sqrt(L * d), L each sequence's real length.

    ``length="real"`` (default) is the NEFTune authors' experiment: each sequence (or packed
    segment) scaled by its own length, pads left clean. ``length="padded"`` reproduces
    transformers' built-in ``neftune_noise_alpha`` value for value from the same generator state:
    L is the padded row length, pads and packed neighbours included, every position noised.
    """

    name = "neftune"
    aliases = ("uniform",)
    description = "NEFTune: uniform noise scaled by alpha / sqrt(real length * d)."

    def __init__(self, *, alpha: float = 5.0, schedule: str = "constant",
                 noise_prompt: bool = True, length: str = "real") -> None:
        super().__init__(alpha=alpha, schedule=schedule, noise_prompt=noise_prompt)
        self.length = str(length).strip().lower()
        if self.length not in LENGTHS:
            raise PerturberError(f"perturber 'neftune': option 'length' must be one of "
                                 f"{', '.join(LENGTHS)}, got {length!r}")
        if self.length == "padded" and not self.noise_prompt:
            raise PerturberError("perturber 'neftune': length='padded' reproduces "
                                 "transformers' built-in, which noises every token; it cannot "
                                 "be combined with noise_prompt=False. Use length='real'")

    def unit_noise(self, shape: torch.Size, generator: torch.Generator,
                   device: torch.device) -> torch.Tensor:
        return torch.empty(shape, device=device).uniform_(-1.0, 1.0, generator=generator)

    def perturb(self, embeddings: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
        if self.length == "real":
            return super().perturb(embeddings, batch)
        # transformers' arithmetic, step for step: a float32 square root of the padded size,
        # alpha divided by it, and noise drawn in the embeddings' own dtype.
        size = torch.tensor(embeddings.size(1) * embeddings.size(2))
        bound = batch.alpha / torch.sqrt(size)
        draw = torch.zeros_like(embeddings).uniform_(-bound, bound, generator=batch.generator)
        return embeddings + draw


class Gaussian(Perturber):
    """Standard normal noise scaled by alpha / sqrt(L * d), L each sequence's real length."""

    name = "gaussian"
    aliases = ("normal",)
    description = "Gaussian noise N(0, 1) scaled by alpha / sqrt(real length * d)."

    def unit_noise(self, shape: torch.Size, generator: torch.Generator,
                   device: torch.device) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device)


class SymNoise(Perturber):
    """Symmetric Bernoulli noise, -1 or +1 with equal odds, scaled by alpha / sqrt(L * d)."""

    name = "symnoise"
    aliases = ("bernoulli",)
    description = "SymNoise: +-1 Bernoulli noise scaled by alpha / sqrt(real length * d)."

    def unit_noise(self, shape: torch.Size, generator: torch.Generator,
                   device: torch.device) -> torch.Tensor:
        # randint, not bernoulli_: the same law, about three times faster on CPU
        coin = torch.randint(0, 2, shape, generator=generator, device=device,
                             dtype=torch.float32)
        return coin.mul_(2.0).sub_(1.0)


class NoNoise(Perturber):
    """No perturbation: the embeddings pass through untouched. Takes no options."""

    name = "none"
    aliases = ("off",)
    description = "No noise: embeddings are left unchanged."

    def __init__(self) -> None:
        super().__init__(alpha=0.0)

    def perturb(self, embeddings: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
        return embeddings


@hookimpl
def register_perturbers(register: Callable[[type[Perturber]], None]) -> None:
    """Register the first-party perturbers."""
    for cls in (NEFTune, Gaussian, SymNoise, NoNoise):
        register(cls)
