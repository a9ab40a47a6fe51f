"""Packing: best-fit decreasing rows, examples carried whole, and no cross-contamination."""

from __future__ import annotations

import itertools

import pytest
import torch
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

import sft_plugins.attention  # noqa: F401  (registers "sdpa_packed")
from sft_plugins.batching import PackedCollator, best_fit_decreasing, pack_dataset
from sft_plugins.errors import DataError
from sft_plugins.loss import shifted_targets
from sft_plugins.perturb import batch_info
from sft_plugins.testing import plugin_manager

VOCAB = 97


def make_rows(lengths: list[int], weighted: bool, seed: int = 0) -> list[dict]:
    """Rows with distinct token ids per example, a prompt part labelled -100, and weights."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        prompt = int(torch.randint(0, length, (1,), generator=g))
        row = {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}
        if weighted:
            row["loss_weights"] = [0.0] * prompt + [0.5 + (i % 3) / 4 for i in
                                                    range(length - prompt)]
        rows.append(row)
    return rows


def segments(row: dict) -> list[slice]:
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [slice(a, b) for a, b in itertools.pairwise(starts)]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30),
       max_length=st.integers(40, 90), weighted=st.booleans())
def test_every_example_is_kept_once_whole_and_carried(lengths, max_length, weighted):
    rows = make_rows(lengths, weighted)
    packed, report = pack_dataset(Dataset.from_list(rows), max_length)
    seen = []
    for row in packed:
        assert len(row["input_ids"]) <= max_length
        assert len(row["labels"]) == len(row["position_ids"]) == len(row["input_ids"])
        for cut in segments(row):
            ids = row["input_ids"][cut]
            assert row["position_ids"][cut] == list(range(len(ids)))
            match = next(i for i, r in enumerate(rows) if r["input_ids"] == ids and i not in seen)
            seen.append(match)
            # the first label would be the target of the previous example's last token
            assert row["labels"][cut] == [-100, *rows[match]["labels"][1:]]
            if weighted:
                assert row["loss_weights"][cut] == pytest.approx(
                    [0.0, *rows[match]["loss_weights"][1:]])
    assert sorted(seen) == list(range(len(rows)))
    assert report.tokens == sum(lengths) and report.rows == len(packed)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), max_size=60), capacity=st.integers(50, 120))
def test_best_fit_decreasing_bins_fit_and_no_two_could_merge(lengths, capacity):
    """Each bin fits; and any two bins together overflow (else the later bin's first item would
    have fitted into the earlier one): so at most one bin is half empty."""
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    sums = [sum(lengths[i] for i in b) for b in bins]
    assert all(0 < s <= capacity for s in sums)
    assert all(a + b > capacity for i, a in enumerate(sums) for b in sums[i + 1:])


def test_an_example_longer_than_max_length_is_rejected_naming_it():
    rows = make_rows([5, 30, 7], weighted=False)
    with pytest.raises(DataError, match=r"example 1 has 30 tokens.*max_length 20"):
        pack_dataset(Dataset.from_list(rows), 20)


def test_collator_pads_with_a_sequence_of_their_own_and_no_attention_mask():
    packed, _ = pack_dataset(Dataset.from_list(make_rows([6, 3, 5, 2], True)), 9)
    batch = PackedCollator(pad_token_id=0)(list(packed))
    assert "attention_mask" not in batch
    width = batch["input_ids"].shape[1]
    for r, row in enumerate(packed):
        n = len(row["input_ids"])
        assert batch["position_ids"][r, n:].tolist() == list(range(width - n))
        assert batch["labels"][r, n:].eq(-100).all() and batch["loss_weights"][r, n:].eq(0).all()
    unpacked = PackedCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}])
    assert unpacked["position_ids"].tolist() == [[0, 1, 2]]


def example_losses(logits: torch.Tensor, labels: torch.Tensor,
                   weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum(w * nll)`` and ``sum(w)`` of one sequence, shifted exactly as the trainer does."""
    targets, w = shifted_targets(labels, weights)
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), targets.clamp_min(0),
                                            reduction="none")
    return (nll * w).sum(), w.sum()


@pytest.mark.parametrize("attn", ["sdpa", "eager", "sdpa_packed"])
def test_packed_loss_of_each_example_equals_its_unpacked_loss(tiny_llama, attn):
    """Float32: each example's weighted loss sum and weight sum in a packed batch equal those of
    the example run alone to rtol 1e-5, atol 1e-5 (summation order only). Run with an
    all-ones attention mask (examples seeing each other), the same check fails."""
    model = tiny_llama(attn).eval()
    rows = make_rows([17, 9, 30, 4, 12, 25, 8], weighted=True, seed=3)
    packed, report = pack_dataset(Dataset.from_list(rows), 40)
    assert report.rows < len(rows)
    batch = PackedCollator(pad_token_id=0)(list(packed))
    with torch.no_grad():
        # use_cache=False (as the trainer passes): with a cache, transformers does not look
        # for packed sequences in position_ids
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits
    checked, contaminated = 0, 0
    for r, row in enumerate(packed):
        for cut in segments(row):
            ids = row["input_ids"][cut]
            original = next(x for x in rows if x["input_ids"] == ids)
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([ids])).logits[0]
            want = example_losses(alone, torch.tensor(original["labels"]),
                                  torch.tensor(original["loss_weights"]))
            got = example_losses(logits[r, cut], batch["labels"][r, cut],
                                 batch["loss_weights"][r, cut])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            bad = example_losses(leaky[r, cut], batch["labels"][r, cut],
                                 batch["loss_weights"][r, cut])
            contaminated += cut.start > 0 and not torch.allclose(bad[0], want[0], rtol=1e-4)
            checked += 1
    assert checked == len(rows) and contaminated > 0


def test_neftune_scales_each_packed_example_by_its_own_length(tiny_llama):
    """The perturber hooked on a model, fed a packed batch: the noise on each example is bounded
    by alpha / sqrt(L * d) with L that example's length, and reaches close to that bound."""
    model = tiny_llama("sdpa").train()
    packed, _ = pack_dataset(Dataset.from_list(make_rows([40, 3, 12, 25], False)), 45)
    batch = PackedCollator(pad_token_id=0)(list(packed))
    embeddings = model.get_input_embeddings()
    clean = embeddings(batch["input_ids"]).detach()
    seen: list[torch.Tensor] = []
    perturber = plugin_manager("sft_plugins_perturbers").perturbers.create("neftune", alpha=5.0)
    with perturber.install(model, seed=1):
        embeddings.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    noise = seen[0] - clean
    info = batch_info(tuple(batch["input_ids"].shape), clean.device, step=0, alpha=5.0,
                      generator=torch.Generator(), position_ids=batch["position_ids"])
    d = clean.shape[-1]
    for r, row in enumerate(packed):
        for cut in segments(row):
            length = cut.stop - cut.start
            assert info.lengths[r, cut].eq(length).all()
            ratio = noise[r, cut].abs().max() / (5.0 / (length * d) ** 0.5)
            assert 0.9 < ratio <= 1.0 + 1e-4, (length, ratio)


def test_trainer_with_packing_gives_the_unpacked_step_loss(tmp_path):
    """SFTPluginTrainer(packing=True) packs the prepared training set and batches it with the
    packed collator; the training loss over all examples (the trainer's sum(w * nll) / sum(w),
    its lm_head-on-trained-positions path) equals the unpacked trainer's to rtol 1e-5."""
    from transformers import AutoTokenizer, TrainingArguments

    from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
    from sft_plugins.trainer import SFTPluginTrainer

    words = ["sort", "these", "letters", "please", "explain", "why", "it", "works", "in"]
    conversations = Dataset.from_list([
        {"prompt": [{"role": "user", "content": " ".join(words[: 2 + i % 9])}],
         "completion": [{"role": "assistant", "content": " ".join(words[i % 5:])}]}
        for i in range(10)])
    manager = plugin_manager("sft_plugins_templates", "sft_plugins_collators",
                             "sft_plugins_perturbers")
    losses = {}
    for packing in (False, True):
        tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        args = TrainingArguments(str(tmp_path / str(packing)), report_to=[], use_cpu=True)
        trainer = SFTPluginTrainer(
            model=LlamaForCausalLM(config).train(), args=args, processing_class=tokenizer,
            train_dataset=conversations, template="llama-3.1", collator="completion-only",
            plugin_manager=manager, packing=packing, packing_max_length=256)
        rows = list(trainer.train_dataset)
        assert ("position_ids" in trainer.train_dataset.column_names) is packing
        assert trainer.model.config._attn_implementation == (
            "sdpa_packed" if packing else "sdpa")
        batch = trainer.data_collator(rows)
        assert ("attention_mask" in batch) is not packing
        with torch.no_grad():
            losses[packing] = trainer.compute_loss(
                trainer.model, batch, num_items_in_batch=trainer.loss_weight_total(batch))
        if packing:
            assert len(rows) < len(conversations)
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=20), data=st.data())
def test_views_pack_exactly_their_own_rows(lengths, data):
    """filter/select/shuffle/train_test_split leave the whole table under an indices mapping;
    packing must read the rows the view holds, never the table's."""
    rows = make_rows(lengths, weighted=True)
    for index, row in enumerate(rows):
        row["input_ids"][0] = 3 + index  # tells the examples apart
    full = Dataset.from_list(rows)
    keep = data.draw(st.lists(st.sampled_from(range(len(rows))), unique=True))
    views = {"select": full.select(keep),
             "filter": full.filter(lambda r: r["input_ids"][0] - 3 in set(keep)),
             "shuffle": full.shuffle(seed=data.draw(st.integers(0, 99)))}
    if len(rows) >= 2:
        views["split"] = full.train_test_split(test_size=1, seed=0)["train"]
    for name, view in views.items():
        packed, report = pack_dataset(view, 40)
        firsts = sorted(row["input_ids"][cut][0] for row in packed for cut in segments(row))
        assert firsts == sorted(r["input_ids"][0] for r in view), name
        assert report.tokens == sum(len(r["input_ids"]) for r in view), name


def test_a_filtered_out_row_is_never_packed():
    full = Dataset.from_dict({"input_ids": [[1, 2, 3], [9, 9, 9], [4, 5]],
                              "labels": [[1, 2, 3], [9, 9, 9], [4, 5]]})
    packed, _ = pack_dataset(full.filter(lambda r: r["input_ids"][0] != 9), 10)
    assert packed["input_ids"] == [[1, 2, 3, 4, 5]]
