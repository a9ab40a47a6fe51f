"""Perturbers on tensors: the noise-scale invariants, masks, packing, parity, seeds, bad options.

Noise is measured by perturbing all-zero embeddings, where ``0 + noise`` is the noise exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.integrations.neftune import neftune_post_forward_hook

from sft_plugins import hookimpl
from sft_plugins.errors import PerturberError, PluginOptionError
from sft_plugins.perturb import BatchInfo, Perturber, batch_info, noise_seed
from sft_plugins.testing import plugin_manager

PERTURBERS = plugin_manager("sft_plugins_perturbers").perturbers
SECOND_MOMENT = {"neftune": 1 / 3, "gaussian": 1.0, "symnoise": 1.0}
"""E[eps^2] of each unit noise: the mean squared norm of a sequence's noise is alpha^2 times it."""
FOURTH_MINUS_SQUARE = {"neftune": 1 / 5 - 1 / 9, "gaussian": 2.0, "symnoise": 0.0}
"""Var(eps^2), from which the statistical tolerance of the mean squared norm follows."""


def right_padded(lengths: list[int], width: int) -> torch.Tensor:
    columns = torch.arange(width)
    return (columns.unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()


def noise_of(perturber: Perturber, shape: tuple[int, int, int], *, seed: int = 0,
             alpha: float | None = None, **inputs: torch.Tensor) -> torch.Tensor:
    zeros = torch.zeros(shape)
    info = batch_info(shape[:2], zeros.device, step=0,
                      alpha=perturber.alpha if alpha is None else alpha,
                      generator=torch.Generator().manual_seed(seed), **inputs)
    return perturber.perturb(zeros, info)


lengths_and_width = st.lists(st.integers(1, 96), min_size=1, max_size=6).flatmap(
    lambda lengths: st.tuples(st.just(lengths), st.integers(max(lengths), max(lengths) + 12)))
alphas = st.floats(0.01, 50.0)
dims = st.sampled_from([4, 16, 64])
noisy = st.sampled_from(["neftune", "gaussian", "symnoise"])
bounded = st.sampled_from(["neftune", "symnoise"])
"""The laws with |eps| <= 1 (gaussian noise has no element-wise bound; its scale is checked by the
mean squared norm)."""


@settings(max_examples=40, deadline=None)
@given(bounded, lengths_and_width, dims, alphas, st.integers(0, 2**31))
def test_noise_is_bounded_by_each_sequences_own_scale_and_pads_stay_clean(
        kind, lengths_width, dim, alpha, seed):
    lengths, width = lengths_width
    mask = right_padded(lengths, width)
    noise = noise_of(PERTURBERS.create(kind, alpha=alpha), (len(lengths), width, dim),
                     seed=seed, attention_mask=mask)
    bound = alpha / torch.sqrt(torch.tensor(lengths, dtype=torch.float64) * dim)
    per_token = noise.abs().amax(dim=-1).double()
    assert (per_token <= bound.unsqueeze(1) * (1 + 1e-6)).all()
    assert (noise[mask == 0] == 0).all()
    assert (noise[mask == 1] != 0).any()


@settings(max_examples=40, deadline=None)
@given(noisy, st.integers(1, 400), st.integers(0, 9), dims, alphas, st.integers(0, 2**31))
def test_mean_squared_norm_of_a_sequences_noise_is_alpha_squared_times_second_moment(
        kind, length, pads, dim, alpha, seed):
    draws = 200  # each row of the batch is an independent draw for one sequence
    width = length + pads
    mask = right_padded([length] * draws, width)
    noise = noise_of(PERTURBERS.create(kind, alpha=alpha), (draws, width, dim), seed=seed,
                     attention_mask=mask)
    squared_norms = noise.double().pow(2).sum(dim=(1, 2))
    expected = alpha**2 * SECOND_MOMENT[kind]
    # ||noise||^2 is alpha^2/(L d) times a sum of L*d iid eps^2, so the mean of `draws` of them
    # has standard deviation alpha^2 sqrt(Var(eps^2) / (L d draws)). Allow 6 of those, plus
    # float32 rounding.
    sigma = alpha**2 * math.sqrt(FOURTH_MINUS_SQUARE[kind] / (length * dim * draws))
    assert abs(squared_norms.mean().item() - expected) <= 6 * sigma + 1e-5 * expected


@settings(max_examples=40, deadline=None)
@given(bounded, st.lists(st.integers(1, 40), min_size=1, max_size=5), st.integers(0, 6), dims,
       alphas, st.integers(0, 2**31))
def test_packed_segments_are_scaled_by_their_own_lengths(kind, segments, pads, dim, alpha, seed):
    position_ids = torch.cat([torch.arange(n) for n in segments] + [torch.zeros(pads).long()])
    mask = torch.cat([torch.ones(sum(segments)), torch.zeros(pads)]).long().unsqueeze(0)
    width = position_ids.numel()
    info = batch_info((1, width), torch.device("cpu"), step=0, alpha=alpha,
                      generator=torch.Generator(), attention_mask=mask,
                      position_ids=position_ids.unsqueeze(0))
    expected = torch.tensor([float(n) for n in segments for _ in range(n)] + [0.0] * pads)
    assert torch.equal(info.lengths[0], expected)
    noise = noise_of(PERTURBERS.create(kind, alpha=alpha), (1, width, dim), seed=seed,
                     attention_mask=mask, position_ids=position_ids.unsqueeze(0))[0]
    start = 0
    for n in segments:
        segment = noise[start:start + n]
        assert segment.abs().max() <= alpha / math.sqrt(n * dim) * (1 + 1e-6)
        if kind == "symnoise":  # eps^2 == 1: every segment's squared norm is alpha^2 exactly
            assert segment.double().pow(2).sum().item() == pytest.approx(alpha**2, rel=1e-5)
        start += n
    assert (noise[start:] == 0).all()


@settings(max_examples=25, deadline=None)
@given(noisy, lengths_and_width, alphas, st.integers(0, 2**31), st.data())
def test_prompt_tokens_get_exactly_zero_noise_when_asked(kind, lengths_width, alpha, seed, data):
    lengths, width = lengths_width
    mask = right_padded(lengths, width)
    prompt = torch.tensor([[data.draw(st.booleans()) for _ in range(width)] for _ in lengths])
    perturber = PERTURBERS.create(kind, alpha=alpha, noise_prompt=False)
    noise = noise_of(perturber, (len(lengths), width, 8), seed=seed, attention_mask=mask,
                     prompt_mask=prompt)
    assert (noise[prompt] == 0).all()
    assert (noise[mask == 0] == 0).all()
    clean = noise_of(PERTURBERS.create(kind, alpha=alpha), (len(lengths), width, 8), seed=seed,
                     attention_mask=mask)
    kept = (~prompt) & (mask == 1)
    assert torch.equal(noise[kept], clean[kept]), "the prompt option only zeroes, never rescales"


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 70), st.integers(1, 48), alphas,
       st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), st.integers(0, 2**31))
def test_padded_length_equals_transformers_builtin_bit_for_bit(rows, width, dim, alpha, dtype,
                                                               seed):
    embeddings = torch.randn(rows, width, dim, generator=torch.Generator().manual_seed(seed))
    embeddings = embeddings.to(dtype)
    module = torch.nn.Embedding(1, dim)
    module.neftune_noise_alpha = alpha
    torch.manual_seed(seed)
    builtin = neftune_post_forward_hook(module, (), embeddings)
    ours = PERTURBERS.create("neftune", alpha=alpha, length="padded").perturb(
        embeddings, batch_info((rows, width), embeddings.device, step=0, alpha=alpha,
                               generator=torch.Generator().manual_seed(seed)))
    assert ours.dtype == builtin.dtype
    assert torch.equal(ours, builtin)


def test_real_length_differs_from_builtin_exactly_where_it_should():
    """Without padding or packing, the real length is the padded length: same scale."""
    neftune = PERTURBERS.create("neftune", alpha=5.0)
    noise = noise_of(neftune, (4, 32, 16))
    assert noise.abs().max() <= 5.0 / math.sqrt(32 * 16) * (1 + 1e-6)
    assert noise.abs().max() > 0.9 * 5.0 / math.sqrt(32 * 16)


def test_none_and_alpha_zero_change_nothing():
    embeddings = torch.randn(2, 5, 8)
    info = batch_info((2, 5), embeddings.device, step=0, alpha=0.0, generator=torch.Generator())
    assert torch.equal(PERTURBERS.create("none").perturb(embeddings, info), embeddings)
    for kind in SECOND_MOMENT:
        assert torch.equal(PERTURBERS.create(kind, alpha=0.0).perturb(embeddings, info),
                           embeddings)


def test_linear_schedule_decays_to_zero():
    neftune = PERTURBERS.create("neftune", alpha=8.0, schedule="linear")
    assert [neftune.alpha_at(s, 4) for s in range(5)] == [8.0, 6.0, 4.0, 2.0, 0.0]
    assert PERTURBERS.create("neftune", alpha=8.0).alpha_at(3, 4) == 8.0
    with pytest.raises(PerturberError, match="total_steps"):
        neftune.alpha_at(1, None)


@settings(max_examples=50, deadline=None)
@given(st.integers(-(2**40), 2**40), st.integers(0, 64), st.integers(0, 10**6),
       st.integers(0, 16))
def test_noise_seed_depends_only_on_seed_rank_step_and_micro_batch(seed, rank, step, call):
    value = noise_seed(seed, rank, step, call)
    assert value == noise_seed(seed, rank, step, call)
    assert 0 <= value < 2**63
    assert value != noise_seed(seed, rank, step + 1, call)
    assert value != noise_seed(seed, rank + 1, step, call)
    assert value != noise_seed(seed, rank, step, call + 1)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "loud", True])
@pytest.mark.parametrize("kind", ["neftune", "gaussian", "symnoise"])
def test_bad_alpha_names_the_perturber_option_and_what_is_accepted(kind, bad):
    with pytest.raises(PerturberError, match=rf"perturber '{kind}'.*'alpha'.*finite number >= 0"):
        PERTURBERS.create(kind, alpha=bad)


def test_bad_options_name_the_perturber_and_what_is_accepted():
    with pytest.raises(PluginOptionError, match=r"perturber 'neftune'.*'loudness'.*Accepted: "
                                                r"alpha, schedule, noise_prompt, length"):
        PERTURBERS.create("neftune", loudness=3)
    with pytest.raises(PerturberError, match=r"'neftune'.*'length'.*real, padded"):
        PERTURBERS.create("neftune", length="longest")
    with pytest.raises(PerturberError, match=r"'gaussian'.*'schedule'.*constant, linear"):
        PERTURBERS.create("gaussian", schedule="cosine")
    with pytest.raises(PerturberError, match=r"'symnoise'.*'noise_prompt'.*true or false"):
        PERTURBERS.create("symnoise", noise_prompt="maybe")
    with pytest.raises(PerturberError, match="noise_prompt=False"):
        PERTURBERS.create("neftune", length="padded", noise_prompt=False)
    with pytest.raises(PluginOptionError, match=r"perturber 'none'.*'alpha'.*Accepted: none"):
        PERTURBERS.create("none", alpha=5.0)


def test_options_from_a_command_line_arrive_as_strings():
    perturber = PERTURBERS.create("NEFTune", alpha="10", noise_prompt="false", schedule="Linear")
    assert (perturber.alpha, perturber.noise_prompt, perturber.schedule) == (10.0, False, "linear")
    assert PERTURBERS.create("uniform").alpha == 5.0


class Dropout:
    """A third-party perturber that overrides perturb(): zero whole tokens at random."""

    @staticmethod
    @hookimpl
    def register_perturbers(register):
        register(TokenDropout)


class TokenDropout(Perturber):
    name = "token-dropout"
    description = "Zeroes each real token's embedding with probability alpha."

    def perturb(self, embeddings: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
        keep = torch.rand(batch.noise_mask.shape, generator=batch.generator) >= batch.alpha
        return embeddings * (keep | ~batch.noise_mask).unsqueeze(-1)


def test_a_third_party_perturber_registers_and_gets_the_batch_info():
    registry = plugin_manager(Dropout, with_first_party=True).perturbers
    assert {"neftune", "token-dropout"} <= set(registry.names())
    dropout = registry.create("token-dropout", alpha=0.5)
    embeddings = torch.ones(3, 10, 4)
    mask = right_padded([10, 6, 2], 10)
    out = dropout.perturb(embeddings, batch_info((3, 10), embeddings.device, step=0, alpha=0.5,
                                                 generator=torch.Generator(),
                                                 attention_mask=mask))
    assert (out[mask == 0] == 1).all()
    assert (out[mask == 1] == 0).any()
