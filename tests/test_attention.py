"""``sdpa_packed``: per-example SDPA on packed rows equals transformers' masked SDPA."""

from __future__ import annotations

import itertools

import pytest
import torch
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.masking_utils import find_packed_sequence_indices

import sft_plugins.attention as attention
from sft_plugins.attention import SDPA_PACKED, attend_packed_rows_by_example, packed_segments
from sft_plugins.batching import PackedCollator, pack_dataset

VOCAB = 97


@settings(max_examples=200, deadline=None)
@given(data=st.data(), width=st.integers(1, 30), batch=st.integers(1, 4))
def test_segments_are_transformers_packed_sequences(data, width, batch):
    """The pieces are exactly the sequences transformers' block-diagonal mask separates."""
    rows = []
    for _ in range(batch):
        cuts = sorted(data.draw(st.sets(st.integers(1, width - 1), max_size=6))
                      if width > 1 else [])
        bounds = [0, *cuts, width]
        rows.append([b - a for a, b in itertools.pairwise(bounds)])
    position_ids = torch.tensor([[p for n in row for p in range(n)] for row in rows])
    segments = packed_segments(position_ids)
    if all(len(row) == 1 for row in rows):
        assert segments is None
        return
    assert segments == rows
    indices = find_packed_sequence_indices(position_ids)
    for row, lengths in zip(indices.tolist(), segments, strict=True):
        assert [row.count(i) for i in range(max(row) + 1)] == lengths


@pytest.fixture
def kernel_calls(monkeypatch):
    """Query lengths that reach transformers' SDPA through ``sdpa_packed``."""
    calls: list[int] = []
    original = attention.sdpa_attention_forward

    def recording(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return original(module, query, *args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", recording)
    return calls


def forward_backward(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(**batch, use_cache=False).logits
    (logits.float().square().mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_rows_give_sdpas_logits_and_gradients_one_example_at_a_time(tiny_llama,
                                                                          kernel_calls):
    """Float32, rtol 1e-5 / atol 1e-5 on logits and every parameter's gradient, with grouped
    query attention (4 heads, 2 key/value heads) and a padded last row; SDPA is called once per
    example (and once for the pads' own sequence), never on a whole row."""
    lengths = [17, 9, 30, 4, 12, 25, 8, 3]
    ids = torch.randint(3, VOCAB, (sum(lengths),), generator=torch.Generator().manual_seed(1))
    rows = [{"input_ids": piece.tolist(), "labels": piece.tolist()}
            for piece in ids.split(lengths)]
    packed, report = pack_dataset(Dataset.from_list(rows), 40)
    batch = PackedCollator(pad_token_id=0)(list(packed))
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    want = forward_backward(tiny_llama("sdpa").train(), inputs)
    assert kernel_calls == []
    got = forward_backward(tiny_llama(SDPA_PACKED).train(), inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    width = batch["input_ids"].shape[1]
    pads = [width - len(row["input_ids"]) for row in packed if len(row["input_ids"]) < width]
    per_layer = len(kernel_calls) // 2
    assert sorted(kernel_calls[:per_layer]) == sorted(lengths + pads)
    assert report.rows < len(lengths)


def test_sequences_are_found_once_per_forward_and_anew_for_the_next(tiny_llama, monkeypatch):
    """Every layer of a forward sees the same position ids and mask: the rows are split once
    per forward, not per layer, and a new batch (here one position row for both rows, split
    differently) is split anew and still equals ``sdpa``."""
    found: list[torch.Tensor] = []
    original = attention.packed_segments
    monkeypatch.setattr(attention, "packed_segments",
                        lambda position_ids: (found.append(position_ids),
                                              original(position_ids))[1])
    packed, sdpa = tiny_llama(SDPA_PACKED).train(), tiny_llama("sdpa").train()
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    for round, cut in enumerate((7, 12), start=1):
        inputs = {"input_ids": ids, "position_ids": torch.tensor([[*range(cut),
                                                                   *range(20 - cut)]])}
        torch.testing.assert_close(forward_backward(packed, inputs),
                                   forward_backward(sdpa, inputs), rtol=1e-5, atol=1e-5)
        assert len(found) == round  # two layers, forward and backward: split once
        assert found[-1].tolist() == [[*range(cut), *range(20 - cut)]] * 2


@pytest.mark.parametrize("restart", [False, True])
def test_rows_that_are_not_packed_go_to_sdpa_whole(tiny_llama, kernel_calls, restart):
    """A padded batch with an attention mask, and generation with a cache, run as ``sdpa``.
    So do rows whose positions restart but whose mask (an ``attention_mask`` was given, so
    transformers built no block-diagonal mask) lets the sequences see each other."""
    ids = torch.randint(3, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if restart:
        inputs["position_ids"] = torch.tensor([[*range(5), *range(6)]] * 3)
    want = forward_backward(tiny_llama("sdpa").train(), inputs)
    got = forward_backward(tiny_llama(SDPA_PACKED).train(), inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert set(kernel_calls) == {11}
    prompt = ids[:1, :5]
    generated = tiny_llama(SDPA_PACKED).eval().generate(prompt, max_new_tokens=6,
                                                       do_sample=False)
    reference = tiny_llama("sdpa").eval().generate(prompt, max_new_tokens=6, do_sample=False)
    assert generated.tolist() == reference.tolist()


@pytest.mark.parametrize("attn, switched", [("sdpa", True), ("eager", False)])
def test_only_sdpa_is_switched(tiny_llama, attn, switched):
    model = tiny_llama(attn)
    assert attend_packed_rows_by_example(model) is switched
    assert model.config._attn_implementation == (SDPA_PACKED if switched else attn)
