"""Hypothesis invariants of the collators, with generated conversations, the real registered
templates (``llama-3.1``, ``chatml``) and the shipped fast tokenizer.

The oracle is independent of the masking code: the tokenizer's own ``offset_mapping`` and the
template's character spans; a token is trained exactly when it shares a character with a span.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import numpy as np
import pytest
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_masking_support import PAD, llama_tokenizer

from sft_plugins.errors import SkipExample
from sft_plugins.loss import WEIGHTS_KEY
from sft_plugins.masking import (
    IGNORE_INDEX,
    ByteLevelSpans,
    Labelled,
    WeightedSpan,
    Weighting,
    label_examples,
    labeller,
    token_ranges_fast,
)
from sft_plugins.testing import plugin_manager

EXAMPLES = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])

# Text with what breaks naive masking: leading/trailing blanks, newlines, multi-byte and
# rare characters that byte-level BPE splits over several tokens, digits, punctuation.
ALPHABET = [*"ab xyz\n\t.,!?:#-0123456789", "é", "🦙", "👋", "中"]
CONTENT = st.text(alphabet=st.sampled_from(ALPHABET), min_size=1, max_size=24).filter(
    lambda s: s.strip())


@st.composite
def conversations(draw: Any, *, min_turns: int = 1) -> list[dict[str, str]]:
    turns = draw(st.integers(min_turns, 3))
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(CONTENT)})
    for _ in range(turns):
        messages += [{"role": "user", "content": draw(CONTENT)},
                     {"role": "assistant", "content": draw(CONTENT)}]
    return messages


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    manager = plugin_manager("sft_plugins_templates", "sft_plugins_collators")
    llama = llama_tokenizer()
    chatml = llama_tokenizer()
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return {"manager": manager,
            "llama-3.1": (manager.templates.get("llama-3.1"), llama),
            "chatml": (manager.templates.get("chatml"), chatml)}


def prepared_rows(setup: dict[str, Any], template_name: str, collator: str,
                  rows: list[dict[str, Any]], **options: Any) -> list[dict[str, Any]]:
    template, tokenizer = setup[template_name]
    instance = setup["manager"].collators.create(collator, pad_token=PAD, **options)
    prepared = instance.prepare(Dataset.from_list(rows), tokenizer, template, desc=None)
    return list(prepared.dataset)


def oracle(setup: dict[str, Any], template_name: str, messages: list[dict[str, str]],
           pick: str) -> tuple[list[int], list[bool], str]:
    """Token ids, which tokens touch a chosen span (by the tokenizer's offsets), and the
    chosen spans' text."""
    template, tokenizer = setup[template_name]
    rendered = template.render(messages)
    spans = list(rendered.trained_spans)
    spans = spans[-1:] if pick == "last" else spans
    encoded = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    touched = [any(s < b and e > a for a, b in spans) for s, e in encoded["offset_mapping"]]
    return encoded["input_ids"], touched, "".join(rendered.text[a:b] for a, b in spans)


@pytest.mark.parametrize("template_name", ["llama-3.1", "chatml"])
@pytest.mark.parametrize(("collator", "pick"), [("assistant-only", "all"),
                                                ("last-turn", "last")])
@EXAMPLES
@given(messages=conversations())
def test_trained_tokens_are_exactly_those_touching_the_spans(
        setup: dict[str, Any], template_name: str, collator: str, pick: str,
        messages: list[dict[str, str]]) -> None:
    [row] = prepared_rows(setup, template_name, collator, [{"messages": messages}])
    ids, touched, _ = oracle(setup, template_name, messages, pick)
    assert row["input_ids"] == ids
    assert len(row["labels"]) == len(ids)
    assert [label != IGNORE_INDEX for label in row["labels"]] == touched
    assert all(label in (IGNORE_INDEX, t) for label, t in zip(row["labels"], ids, strict=True))


@EXAMPLES
@given(messages=conversations())
def test_llama_31_trains_the_assistant_text_exactly(setup: dict[str, Any],
                                                   messages: list[dict[str, str]]) -> None:
    """With Llama 3.1 (content trimmed, header ends in a newline pair) no token straddles a
    span: the decoded trained tokens are the answers plus ``<|eot_id|>``, nothing else."""
    [row] = prepared_rows(setup, "llama-3.1", "assistant-only", [{"messages": messages}])
    tokenizer = setup["llama-3.1"][1]
    trained = [t for t in row["labels"] if t != IGNORE_INDEX]
    answers = "".join(m["content"].strip() + "<|eot_id|>" for m in messages
                      if m["role"] == "assistant")
    assert tokenizer.decode(trained) == answers


@EXAMPLES
@given(messages=conversations())
def test_completion_only_trains_the_completion_and_its_end_of_turn(
        setup: dict[str, Any], messages: list[dict[str, str]]) -> None:
    prompt, completion = messages[:-1], messages[-1:]
    [row] = prepared_rows(setup, "llama-3.1", "completion-only",
                          [{"prompt": prompt, "completion": completion}])
    ids, touched, text = oracle(setup, "llama-3.1", messages, "last")
    assert row["input_ids"] == ids
    assert [label != IGNORE_INDEX for label in row["labels"]] == touched
    first_trained = touched.index(True)
    assert not any(touched[:first_trained]) and all(touched[first_trained:])
    tokenizer = setup["llama-3.1"][1]
    trained = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == text == completion[0]["content"].strip() + "<|eot_id|>"


@EXAMPLES
@given(messages=conversations(), weight=st.floats(0.01, 0.99))
def test_weights_are_in_range_and_all_tokens_trains_everything(
        setup: dict[str, Any], messages: list[dict[str, str]], weight: float) -> None:
    [everything] = prepared_rows(setup, "llama-3.1", "all-tokens", [{"messages": messages}])
    assert everything["labels"] == everything["input_ids"]
    [weighted] = prepared_rows(setup, "llama-3.1", "prompt-weighted", [{"messages": messages}],
                               prompt_loss_weight=weight)
    _, touched, _ = oracle(setup, "llama-3.1", messages, "all")
    assert len(weighted["loss_weights"]) == len(weighted["input_ids"])
    assert all(0.0 <= w <= 1.0 for w in weighted["loss_weights"])
    assert [w == 1.0 for w in weighted["loss_weights"]] == touched
    assert all(abs(w - weight) < 1e-6 for w, t in zip(weighted["loss_weights"], touched,
                                                      strict=True) if not t)


@settings(max_examples=25, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(batch=st.lists(conversations(), min_size=2, max_size=4), data=st.data())
def test_labels_do_not_depend_on_the_batch_or_the_padding_side(
        setup: dict[str, Any], batch: list[list[dict[str, str]]], data: Any) -> None:
    rows = [{"messages": m} for m in batch]
    together = prepared_rows(setup, "llama-3.1", "prompt-weighted", rows)
    alone = prepared_rows(setup, "llama-3.1", "prompt-weighted", rows[:1])
    assert together[0] == alone[0]
    manager = setup["manager"]
    collated = {}
    for side in ("right", "left"):
        collator = manager.collators.create("prompt-weighted", padding_side=side,
                                            pad_to_multiple_of=data.draw(st.sampled_from(
                                                [None, 8])))
        collator.pad_token_id = setup["llama-3.1"][1].convert_tokens_to_ids(PAD)
        collated[side] = collator(together)
    for side, batch_out in collated.items():
        mask = batch_out["attention_mask"].bool()
        assert batch_out["loss_weights"][~mask].eq(0).all()  # pads weigh 0
        assert batch_out["labels"][~mask].eq(IGNORE_INDEX).all()
        for k, row in enumerate(together):
            assert batch_out["labels"][k][mask[k]].tolist() == row["labels"], side
            assert batch_out["input_ids"][k][mask[k]].tolist() == row["input_ids"], side


@EXAMPLES
@given(messages=conversations(min_turns=2), cut=st.integers(4, 120),
       mode=st.sampled_from(["keep_start", "keep_end"]))
def test_a_truncated_mask_is_the_prefix_or_suffix_of_the_whole(
        setup: dict[str, Any], messages: list[dict[str, str]], cut: int, mode: str) -> None:
    [whole] = prepared_rows(setup, "llama-3.1", "assistant-only", [{"messages": messages}])
    template, tokenizer = setup["llama-3.1"]
    collator = setup["manager"].collators.create("assistant-only", pad_token=PAD,
                                                 max_length=cut, truncation=mode)
    prepared = collator.prepare(Dataset.from_list([{"messages": messages}]), tokenizer, template,
                                desc=None)
    part = slice(None, cut) if mode == "keep_start" else slice(-cut, None)
    expected_labels = whole["labels"][part]
    if all(label == IGNORE_INDEX for label in expected_labels):
        assert prepared.report.skipped == {"truncated_away": 1}
        return
    [row] = list(prepared.dataset)
    assert row["input_ids"] == whole["input_ids"][part]
    assert row["labels"] == expected_labels


SPECIALS = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]


@EXAMPLES
@given(pieces=st.lists(st.one_of(CONTENT, st.sampled_from(SPECIALS)), min_size=1, max_size=8),
       cuts=st.lists(st.integers(0, 400), min_size=2, max_size=6))
def test_byte_level_ranges_equal_the_offsets_ranges(pieces: list[str], cuts: list[int]) -> None:
    """The offset-free path (token byte lengths) finds the same tokens as the offsets."""
    tokenizer = llama_tokenizer()
    text = "".join(pieces)
    bounds = sorted(min(c, len(text)) for c in cuts)
    spans = [WeightedSpan(a, b) for a, b in zip(bounds[::2], bounds[1::2], strict=False)]
    table = ByteLevelSpans.of(tokenizer)
    assert table is not None
    fast = tokenizer.backend_tokenizer.encode_batch_fast([text], add_special_tokens=False)[0]
    with_offsets = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    assert fast.ids == with_offsets.ids
    ours = table.ranges(text, fast.ids, spans)
    assert ours is not None
    expected = token_ranges_fast(with_offsets, spans)
    assert [r for r, s in zip(ours, spans, strict=True) if s.start < s.end] == \
        [r for r, s in zip(expected, spans, strict=True) if s.start < s.end]
    assert all(a == b for (a, b), s in zip(ours, spans, strict=True) if s.start == s.end)


# ------------------------------------------------- the labeller on a plain list of rows -------

COLLATOR_NAMES = plugin_manager("sft_plugins_collators").collators.names()
COLLATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "prompt-weighted": {"prompt_loss_weight": 0.25},
    "response-template": {"response_template": "<|start_header_id|>assistant<|end_header_id|>"},
}
QUOTED = st.sampled_from(["<|eot_id|>", " <|start_header_id|>user<|end_header_id|> "])
"""Special-token text inside the data, which both paths must keep as text."""


@st.composite
def rows(draw: Any) -> dict[str, Any]:
    """A conversation as ``messages``, as message-list ``prompt``/``completion``, or as plain
    ``text``, sometimes quoting special-token text; every row has every field (``None`` where it
    does not apply), as rows of one data set do."""
    messages = draw(conversations())
    if draw(st.booleans()):
        k = draw(st.integers(0, len(messages) - 1))
        messages[k] = {**messages[k], "content": messages[k]["content"] + draw(QUOTED)}
    row: dict[str, Any] = dict.fromkeys(("messages", "prompt", "completion", "text"))
    kind = draw(st.sampled_from(["messages", "prompt-completion", "text"]))
    if kind == "messages":
        row["messages"] = messages
    elif kind == "prompt-completion":
        row["prompt"], row["completion"] = messages[:-1], messages[-1:]
    else:
        row["text"] = " ".join(m["content"] for m in messages)
    return row


@pytest.mark.parametrize("collator", COLLATOR_NAMES)
@EXAMPLES
@given(batch=st.lists(rows(), min_size=1, max_size=4),
       max_length=st.sampled_from([None, 24]), expand=st.sampled_from(["off", "all"]))
def test_label_examples_on_a_list_gives_the_prepared_rows(
        setup: dict[str, Any], collator: str, batch: list[dict[str, Any]],
        max_length: int | None, expand: str) -> None:
    """``label_examples`` on plain Python rows labels them exactly as ``prepare`` does on the
    same rows in a data set (a row the collator expands giving several), and skips the same
    ones for the same reasons."""
    template, tokenizer = setup["llama-3.1"]
    instance = setup["manager"].collators.create(
        collator, pad_token=PAD, on_bad_example="skip", max_length=max_length, expand=expand,
        **COLLATOR_OPTIONS.get(collator, {}))
    prepared = instance.prepare(Dataset.from_list(batch), tokenizer, template, desc=None)
    results = [r for row in label_examples(instance, batch, tokenizer, template) for r in row]
    kept = [r for r in results if isinstance(r, Labelled)]
    expected = list(prepared.dataset)
    assert [r.input_ids for r in kept] == [row["input_ids"] for row in expected]
    assert [r.labels for r in kept] == [row["labels"] for row in expected]
    assert [None if r.loss_weights is None else [float(np.float32(w)) for w in r.loss_weights]
            for r in kept] == [row.get(WEIGHTS_KEY) for row in expected]
    skipped = Counter(r.reason for r in results if isinstance(r, SkipExample))
    assert dict(skipped) == prepared.report.skipped


def outcome(result: Labelled | SkipExample) -> tuple[Any, ...]:
    if isinstance(result, SkipExample):
        return ("skipped", result.reason, str(result))
    return (result.input_ids, result.labels, result.loss_weights, result.text)


NOTHING_TO_TRAIN = {"messages": [{"role": "user", "content": "only a question"}]}


@EXAMPLES
@given(batch=st.lists(st.one_of(rows(), st.just(NOTHING_TO_TRAIN)), min_size=1, max_size=9),
       together=st.integers(1, 3), expand=st.sampled_from(["off", "all"]),
       by_bytes=st.booleans())
def test_rows_encoded_group_by_group_are_labelled_as_if_alone(
        setup: dict[str, Any], batch: list[dict[str, Any]], together: int, expand: str,
        by_bytes: bool) -> None:
    """Rows go to the tokenizer a few at a time, on another thread, while the next ones are
    rendered: each gets its own tokens back, skipped rows and expanded rows in between (an
    off-by-one between the groups would hand a row its neighbour's tokens), and the collator
    only ever runs on the calling thread. Without the byte-level table, ranges come from the
    encodings' offsets alone (with it, tokens that do not spell their text are encoded again,
    which would hide a mix-up)."""
    template, tokenizer = setup["llama-3.1"]
    instance = setup["manager"].collators.create("prompt-weighted", pad_token=PAD,
                                                 on_bad_example="skip", expand=expand)
    threads: set[int] = set()
    weigh = instance.weigh

    def weigh_here(rendered: Any) -> Weighting:
        threads.add(threading.get_ident())
        return weigh(rendered)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(labeller, "ENCODED_TOGETHER", together)
        patch.setattr(instance, "weigh", weigh_here)
        if not by_bytes:
            patch.setattr(labeller, "byte_level_spans", lambda tokenizer: None)
        grouped = label_examples(instance, batch, tokenizer, template)
        alone = [label_examples(instance, [row], tokenizer, template)[0] for row in batch]
    assert [[outcome(r) for r in row] for row in grouped] == \
        [[outcome(r) for r in row] for row in alone]
    assert threads == {threading.get_ident()}


# --------------------------------------------------------------- the batch labeller -------


@st.composite
def tokenized_examples(draw: Any) -> tuple[list[int], list[tuple[int, int]], list[WeightedSpan],
                                            float]:
    """Token ids, the token range of each span (sorted; empty ranges, and a token shared by two
    neighbouring spans, as alignment gives them) and the weighted spans and background."""
    n_tokens = draw(st.integers(0, 12))
    ids = draw(st.lists(st.integers(0, 1000), min_size=n_tokens, max_size=n_tokens))
    ranges: list[tuple[int, int]] = []
    end = draw(st.integers(0, n_tokens))
    for _ in range(draw(st.integers(0, 4))):
        # the next span starts after a gap, right after, or on the previous one's last token
        gap = draw(st.sampled_from([-1, -1, 0, 2]))
        a = min(end + gap, n_tokens) if (ranges and end > ranges[-1][0]) or gap >= 0 else end
        ranges.append((a, min(a + draw(st.integers(0, 4)), n_tokens)))
        end = max(end, ranges[-1][1])
    weights = draw(st.lists(st.sampled_from([0.0, 0.25, 1.0]), min_size=len(ranges),
                            max_size=len(ranges)))
    spans = [WeightedSpan(2 * k, 2 * k + 1, w) for k, w in enumerate(weights)]
    background = draw(st.sampled_from([0.0, 0.0, 0.1]))
    return ids, ranges, spans, background


def reference_labels(collator: Any, ids: list[int], ranges: list[tuple[int, int]],
                     spans: list[WeightedSpan], background: float
                     ) -> tuple[list[int], list[int], list[float]] | str:
    """The labelling rules for one example, written out token by token: each token's weight
    is the largest of the spans it touches, else the background; labels where the weight is
    above 0; ``max_length`` keeps the start or the end, or drops the example; the reason it is
    skipped, if it is."""
    weights = [background] * len(ids)
    touched: set[int] = set()
    for (a, b), span in zip(ranges, spans, strict=True):
        for token in range(a, b):
            weights[token] = max(span.weight, weights[token]) if token in touched \
                else span.weight
            touched.add(token)
    labels = [t if w > 0 else IGNORE_INDEX for t, w in zip(ids, weights, strict=True)]
    if not any(a < b and s.weight > 0 for (a, b), s in zip(ranges, spans, strict=True)):
        return "no_trained_token"  # whatever its length: truncation is not why
    lo, hi = 0, len(ids)
    if collator.max_length is not None and len(ids) > collator.max_length:
        if collator.truncation == "drop":
            return "too_long"
        lo, hi = ((0, collator.max_length) if collator.truncation == "keep_start"
                  else (len(ids) - collator.max_length, len(ids)))
    if not any(a < hi and b > lo for (a, b), s in zip(ranges, spans, strict=True)
               if s.weight > 0 and a < b):
        return "truncated_away"
    return ids[lo:hi], labels[lo:hi], weights[lo:hi]


@EXAMPLES
@given(batch=st.lists(tokenized_examples(), max_size=6), weighted=st.booleans(),
       max_length=st.sampled_from([None, 3, 8]),
       truncation=st.sampled_from(["keep_start", "keep_end", "drop"]))
def test_the_batch_labeller_labels_every_example_as_if_alone(
        batch: list[Any], weighted: bool, max_length: int | None, truncation: str) -> None:
    """One batch of examples with every kind of weighting, truncation and skip at once: each
    example's slice of the flat columns equals the rules applied to it alone, and skipped
    examples take no tokens."""
    from types import SimpleNamespace

    from sft_plugins.masking.labels import label_token_batch

    collator = SimpleNamespace(weighted=weighted, max_length=max_length, truncation=truncation)
    got = label_token_batch(collator, [Weighting(tuple(s), b) for _, _, s, b in batch],
                            [ids for ids, *_ in batch], [r for _, r, _, _ in batch])
    bounds = got.offsets.tolist()
    assert bounds[0] == 0 and bounds[-1] == len(got.input_ids) == len(got.labels)
    for outcome, (ids, ranges, spans, background) in zip(got.outcomes, batch, strict=True):
        expected = reference_labels(collator, ids, ranges, spans, background)
        if isinstance(expected, str):
            assert isinstance(outcome, SkipExample) and outcome.reason == expected
            continue
        assert isinstance(outcome, int)
        a, b = bounds[outcome], bounds[outcome + 1]
        assert got.input_ids[a:b].tolist() == expected[0]
        assert got.labels[a:b].tolist() == expected[1]
        if weighted:
            assert got.loss_weights is not None
            assert got.loss_weights[a:b].tolist() == pytest.approx(expected[2])
        else:
            assert got.loss_weights is None
    assert len(bounds) - 1 == sum(isinstance(o, int) for o in got.outcomes)
