"""The weighted token loss: chunked trained-positions path vs full logits vs a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sft_plugins.loss import (
    FAST_PATH_MODEL_TYPES,
    capture_last_hidden_state,
    loss_from_hidden_states,
    loss_from_logits,
    softcap_of,
)


def batch(seed: int, b: int, t: int, d: int, v: int, weighted: bool):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.4] = -100
    weights = torch.rand(b, t, generator=g) if weighted else None
    return hidden, labels, weights


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 3), t=st.integers(2, 9),
       chunk=st.integers(1, 8), weighted=st.booleans(), softcap=st.sampled_from([None, 3.0]))
def test_chunked_path_equals_full_logits_in_value_and_gradient(seed, b, t, chunk, weighted,
                                                              softcap):
    d, v = 6, 11
    head = nn.Linear(d, v, bias=True)
    hidden, labels, weights = batch(seed, b, t, d, v, weighted)
    fast = loss_from_hidden_states(hidden, head, labels, weights, chunk_size=chunk,
                                   softcap=softcap)
    (g_fast_h, g_fast_w) = torch.autograd.grad(fast.weighted_sum, (hidden, head.weight))
    logits = head(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    full = loss_from_logits(logits, labels, weights)
    (g_full_h, g_full_w) = torch.autograd.grad(full.weighted_sum, (hidden, head.weight))
    torch.testing.assert_close(fast.weighted_sum, full.weighted_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.weight_sum, full.weight_sum)
    torch.testing.assert_close(g_fast_h, g_full_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fast_w, g_full_w, rtol=1e-5, atol=1e-6)


def test_loss_matches_a_hand_computed_weighted_cross_entropy():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]])
    labels = torch.tensor([[-100, 1, 2, 0]])
    weights = torch.tensor([[0.0, 0.5, 1.0, 0.25]])
    # position i predicts label i+1: (pos0 -> 1, w .5), (pos1 -> 2, w 1), (pos2 -> 0, w .25)
    def nll(row, target):
        return math.log(sum(math.exp(x) for x in row)) - row[target]
    expected = (0.5 * nll([2, 0, 0], 1) + 1.0 * nll([0, 1, 0], 2) + 0.25 * nll([0, 0, 3], 0))
    got = loss_from_logits(logits, labels, weights)
    assert got.weighted_sum.item() == pytest.approx(expected, rel=1e-6)
    assert got.weight_sum.item() == pytest.approx(1.75)


def test_ignored_label_weighs_nothing_whatever_the_weight():
    logits = torch.randn(1, 3, 5)
    labels = torch.tensor([[1, -100, 2]])
    got = loss_from_logits(logits, labels, torch.ones(1, 3))
    assert got.weight_sum.item() == 1.0


def test_no_trained_position_gives_zero_loss_with_a_gradient_path():
    hidden = torch.randn(2, 4, 3, requires_grad=True)
    labels = torch.full((2, 4), -100)
    got = loss_from_hidden_states(hidden, nn.Linear(3, 7), labels, None)
    assert got.weighted_sum.item() == 0.0 and got.weight_sum.item() == 0.0
    got.weighted_sum.backward()
    assert hidden.grad is not None


def tiny_config(model_type: str):
    from transformers import AutoConfig

    extra = {"final_logit_softcapping": 5.0} if model_type in ("gemma2", "gemma3_text") else {}
    if model_type == "gemma3_text":
        extra["sliding_window"] = 4
    return AutoConfig.for_model(
        model_type, vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        **extra)


@pytest.mark.parametrize("model_type", sorted(FAST_PATH_MODEL_TYPES))
def test_lm_head_on_captured_hidden_state_reproduces_the_models_logits(model_type):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad(), capture_last_hidden_state(model.get_decoder()) as captured:
        logits = model(input_ids=ids).logits
    head = model.get_output_embeddings()
    ours = head(captured[0]).float()
    cap = softcap_of(model.config)
    if cap:
        ours = torch.tanh(ours / cap) * cap
    torch.testing.assert_close(ours, logits.float(), rtol=1e-5, atol=1e-5)
