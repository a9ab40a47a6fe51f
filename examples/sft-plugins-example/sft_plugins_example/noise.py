"""A noise strategy of our own: Laplace noise with NEFTune's per-sequence scaling."""

from __future__ import annotations

import math

import torch

from sft_plugins.perturb import Perturber


class LaplaceNoise(Perturber):
    """Laplace noise with unit variance, scaled by alpha / sqrt(L * d) like NEFTune.

    Heavier-tailed than uniform noise with the same expected squared norm per sequence
    (``alpha**2``). Only the law of ``eps`` changes, so only :meth:`unit_noise` is overridden;
    the base class handles lengths, pads, packing, schedules and seeding.
    """

    name = "laplace"
    aliases = ("laplacian",)
    description = "Unit-variance Laplace noise, NEFTune's scaling (example plugin)."

    def unit_noise(self, shape: torch.Size, generator: torch.Generator,
                   device: torch.device) -> torch.Tensor:
        # Inverse CDF: u ~ U(-1/2, 1/2), eps = -b * sign(u) * log(1 - 2|u|), b = 1/sqrt(2).
        u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32) - 0.5
        u = u.clamp(-0.5 + 1e-7, 0.5 - 1e-7)
        return -torch.sign(u) * torch.log1p(-2 * u.abs()) / math.sqrt(2)
