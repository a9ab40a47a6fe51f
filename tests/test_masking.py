"""The masking core: spans + offsets -> labels and weights, truncation, skips, padding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset, load_from_disk
from test_masking_support import EOT, PAD, HandTemplate, llama_tokenizer, trained_text

from sft_plugins.errors import DataError, MaskingError, PluginOptionError
from sft_plugins.masking import (
    IGNORE_INDEX,
    MaskingCollator,
    RenderedExample,
    WeightedSpan,
    Weighting,
    encode_slow,
    token_ranges_fast,
    token_weights,
)
from sft_plugins.masking.alignment import encode_batch, unpadded_backend
from sft_plugins.testing import plugin_manager

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there 👋"},
    {"role": "assistant", "content": "Hello! 🦙 nice"},
    {"role": "user", "content": "more"},
    {"role": "assistant", "content": "ok."},
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return llama_tokenizer()


@pytest.fixture(scope="module")
def collators() -> Any:
    return plugin_manager("sft_plugins_collators").collators


def prepare(collator: MaskingCollator, rows: list[dict[str, Any]], tokenizer: Any,
            **kwargs: Any) -> Any:
    return collator.prepare(Dataset.from_list(rows), tokenizer, HandTemplate(), desc=None,
                            **kwargs)


class Spans(MaskingCollator):
    """Test collator: the spans and background it is given, whatever the example."""

    name = "test-spans"

    def __init__(self, spans: tuple[WeightedSpan, ...] = (), background: float = 0.0,
                 **options: Any) -> None:
        super().__init__(**options)
        self.spans, self.background = spans, background

    @property
    def weighted(self) -> bool:
        return True

    def weigh(self, example: RenderedExample) -> Weighting:
        return Weighting(self.spans, self.background)


# ------------------------------------------------------------------ offsets -> weights -------


def test_a_character_split_over_tokens_is_trained_whole(tokenizer: Any) -> None:
    """Byte-level BPE splits a rare emoji into several tokens that share its offsets; a span
    ending with it must take all of them, not only the first ``char_to_token`` reports."""
    text = "ok 🦙"
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    [(a, b)] = token_ranges_fast(encoding, [WeightedSpan(3, 4)])
    assert b == len(encoding) and b - a >= 2
    assert tokenizer.decode(encoding.ids[a:b]) == "🦙"


def test_a_straddling_token_gets_the_largest_weight_of_the_spans_it_touches() -> None:
    weights = token_weights(6, [(0, 3), (2, 5)], [WeightedSpan(0, 5, 0.2),
                                                  WeightedSpan(5, 9, 0.7)], background=0.05)
    assert weights == [0.2, 0.2, 0.7, 0.7, 0.7, 0.05]


def test_plain_prompt_completion_trains_the_token_that_straddles_the_boundary(
        tokenizer: Any, collators: Any) -> None:
    """``"hello "`` + ``"world"``: the token ``" world"`` produces completion characters, so it
    is trained (our documented rule); the eos text is appended and trained too."""
    prepared = prepare(collators.create("completion-only"),
                       [{"prompt": "hello ", "completion": "world"}], tokenizer)
    row = prepared.dataset[0]
    assert trained_text(tokenizer, row["input_ids"], row["labels"]) == " world" + EOT
    assert row["input_ids"][0] == tokenizer.bos_token_id  # plain text gets the tokenizer's bos


# ---------------------------------------------------------------------- collators ---------


@pytest.mark.parametrize(("name", "expected"), [
    ("assistant-only", f"Hello! 🦙 nice{EOT}ok.{EOT}"),
    ("last-turn", f"ok.{EOT}"),
])
def test_conversation_collators_train_exactly_the_assistant_spans(
        tokenizer: Any, collators: Any, name: str, expected: str) -> None:
    prepared = prepare(collators.create(name), [{"messages": CONVERSATION}], tokenizer)
    row = prepared.dataset[0]
    assert set(prepared.dataset.column_names) == {"input_ids", "labels"}
    assert trained_text(tokenizer, row["input_ids"], row["labels"]) == expected


def test_all_tokens_trains_every_token(tokenizer: Any, collators: Any) -> None:
    row = prepare(collators.create("all-tokens"), [{"messages": CONVERSATION}],
                  tokenizer).dataset[0]
    assert row["labels"] == row["input_ids"]


def test_prompt_weighted_weighs_the_prompt_and_writes_loss_weights(
        tokenizer: Any, collators: Any) -> None:
    collator = collators.create("prompt-weighted", prompt_loss_weight=0.05)
    row = prepare(collator, [{"messages": CONVERSATION}], tokenizer).dataset[0]
    assert row["labels"] == row["input_ids"]
    full = [t for t, w in zip(row["input_ids"], row["loss_weights"], strict=True) if w == 1.0]
    assert tokenizer.decode(full) == f"Hello! 🦙 nice{EOT}ok.{EOT}"
    assert {round(w, 6) for w in row["loss_weights"]} == {0.05, 1.0}
    batch = collator([row, row])
    assert batch["loss_weights"].dtype == torch.float32


def test_prompt_weight_0_or_1_stays_on_the_plain_path(collators: Any) -> None:
    assert not collators.create("prompt-weighted", prompt_loss_weight=0.0).weighted
    assert collators.create("prompt-weighted", prompt_loss_weight=0.5).weighted
    with pytest.raises(PluginOptionError, match="prompt_loss_weight"):
        collators.create("prompt-weighted", prompt_loss_weight=2)


def test_completion_only_on_conversational_prompt_completion(tokenizer: Any,
                                                              collators: Any) -> None:
    rows = [{"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}]
    row = prepare(collators.create("completion-only"), rows, tokenizer).dataset[0]
    assert trained_text(tokenizer, row["input_ids"], row["labels"]) == f"ok.{EOT}"


def test_canonical_rows_of_the_data_module_are_accepted(tokenizer: Any, collators: Any) -> None:
    """``messages`` + ``completion_index`` (with Arrow's ``None`` fields) and ``text`` +
    ``completion_offset``, as ``sft_plugins.data`` stores them."""
    messages = [{**m, "tool_calls": None, "name": None} for m in CONVERSATION]
    conversation = {"messages": messages, "tools": None, "completion_index": 4}
    row = prepare(collators.create("completion-only"), [conversation], tokenizer).dataset[0]
    assert trained_text(tokenizer, row["input_ids"], row["labels"]) == f"ok.{EOT}"
    text = {"text": "Q: 2+2= 4", "completion_offset": 7}
    row = prepare(collators.create("completion-only"), [text], tokenizer).dataset[0]
    assert trained_text(tokenizer, row["input_ids"], row["labels"]) == f" 4{EOT}"


# -------------------------------------------------------------------- truncation ----------


def long_rows() -> list[dict[str, Any]]:
    prompt = [{"role": "user", "content": "word " * 40}]
    return [{"prompt": prompt, "completion": [{"role": "assistant", "content": "yes"}]},
            {"prompt": [{"role": "user", "content": "hi"}],
             "completion": [{"role": "assistant", "content": "short"}]}]


def test_keep_start_that_cuts_the_whole_answer_drops_and_counts_it(tokenizer: Any,
                                                                    collators: Any) -> None:
    prepared = prepare(collators.create("completion-only", max_length=20), long_rows(),
                       tokenizer)
    assert prepared.report.total == 2 and prepared.report.kept == 1
    assert prepared.report.skipped == {"truncated_away": 1}
    assert "example 0" in prepared.report.summary()
    assert len(prepared.dataset[0]["input_ids"]) <= 20


def test_keep_end_keeps_the_answer(tokenizer: Any, collators: Any) -> None:
    prepared = prepare(collators.create("completion-only", max_length=20,
                                        truncation="keep_end"), long_rows(), tokenizer)
    assert prepared.report.kept == 2
    row = prepared.dataset[0]
    assert len(row["input_ids"]) == 20
    assert trained_text(tokenizer, row["input_ids"], row["labels"]) == f"yes{EOT}"


def test_drop_skips_long_examples_and_counts_them(tokenizer: Any, collators: Any) -> None:
    prepared = prepare(collators.create("completion-only", max_length=20, truncation="drop"),
                       long_rows(), tokenizer)
    assert prepared.report.skipped == {"too_long": 1} and prepared.report.kept == 1


def test_strict_mode_raises_instead_of_dropping(tokenizer: Any, collators: Any) -> None:
    with pytest.raises(MaskingError, match=r"example 0: .*strict"):
        prepare(collators.create("completion-only", max_length=20, strict=True), long_rows(),
                tokenizer)


# ---------------------------------------------------------------------- bad input ---------


@pytest.mark.parametrize(("row", "error", "reason"), [
    ({"prompt": "Q:", "completion": ""}, DataError, "invalid"),
    ({"prompt": [{"role": "user", "content": "hi"}],
      "completion": [{"role": "assistant", "content": ""}]}, DataError, "invalid"),
    # the loader's rule (data.formats.check_conversation): blank content, or no assistant turn
    ({"prompt": [{"role": "user", "content": "hi"}],
      "completion": [{"role": "assistant", "content": " \n "}]}, DataError, "invalid"),
    ({"prompt": [{"role": "user", "content": "hi"}],
      "completion": [{"role": "user", "content": "more"}]}, DataError, "invalid"),
])
def test_an_empty_completion_is_an_error_naming_the_example(
        tokenizer: Any, collators: Any, row: dict[str, Any], error: type, reason: str) -> None:
    good = dict(row, completion="fine" if isinstance(row["completion"], str)
                else [{"role": "assistant", "content": "fine"}])
    rows = [good, row]
    with pytest.raises(error, match=r"example 1: .*empty|example 1: .*no message"):
        prepare(collators.create("completion-only"), rows, tokenizer)
    prepared = prepare(collators.create("completion-only", on_bad_example="skip"), rows, tokenizer)
    assert prepared.report.skipped == {reason: 1} and prepared.report.kept == 1


def test_the_report_keeps_as_many_skips_as_the_data_summary_and_prints_a_few(
        tokenizer: Any, collators: Any) -> None:
    from sft_plugins.bad_examples import PRINTED, QUOTED

    rows = [{"prompt": "Q:", "completion": ""}] * (QUOTED + 3) + [{"prompt": "Q:",
                                                                  "completion": " fine"}]
    report = prepare(collators.create("completion-only", on_bad_example="skip"), rows,
                     tokenizer).report
    assert report.skipped == {"invalid": QUOTED + 3} and report.kept == 1
    assert len(report.first_skips) == QUOTED and report.first_skips[0].startswith("example 0:")
    assert sum(skip in report.summary().splitlines()[1:] for skip in
               [f"  {s}" for s in report.first_skips]) == PRINTED


def test_a_conversation_without_assistant_turn_names_file_and_line(tokenizer: Any,
                                                                    collators: Any) -> None:
    rows = [{"messages": CONVERSATION, "source_file": "train.jsonl", "source_line": 1},
            {"messages": CONVERSATION[:2], "source_file": "train.jsonl", "source_line": 2}]
    with pytest.raises(MaskingError, match=r"train.jsonl:2: has no assistant"):
        prepare(collators.create("assistant-only"), rows, tokenizer)
    prepared = prepare(collators.create("assistant-only", on_bad_example="skip"), rows, tokenizer)
    assert prepared.report.skipped == {"no_assistant_turn": 1}
    assert "train.jsonl:2" in prepared.report.summary()


def test_a_span_outside_the_text_is_an_error(tokenizer: Any) -> None:
    with pytest.raises(MaskingError, match=r"example 0: span .*outside the text"):
        prepare(Spans((WeightedSpan(0, 10_000),)), [{"text": "short"}], tokenizer)


# ------------------------------------------------------------------------ padding ---------


def test_padding_uses_the_template_pad_token_right_side_and_multiple(tokenizer: Any,
                                                                     collators: Any) -> None:
    collator = collators.create("assistant-only", pad_to_multiple_of=8)
    rows = prepare(collator, [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}],
                   tokenizer).dataset
    batch = collator([rows[0], rows[1]])
    n0, n1 = len(rows[0]["input_ids"]), len(rows[1]["input_ids"])
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] >= n0
    pad = tokenizer.convert_tokens_to_ids(PAD)
    assert batch["input_ids"][1, n1:].eq(pad).all()
    assert batch["attention_mask"][1].tolist() == [1] * n1 + [0] * (batch["input_ids"].shape[1]
                                                                     - n1)
    assert batch["labels"][1, n1:].eq(IGNORE_INDEX).all()


def test_left_padding_gives_the_same_rows_shifted(tokenizer: Any, collators: Any) -> None:
    right = collators.create("prompt-weighted")
    left = collators.create("prompt-weighted", padding_side="left")
    rows = prepare(right, [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}],
                   tokenizer).dataset
    left.pad_token_id = right.pad_token_id
    a, b = right([rows[0], rows[1]]), left([rows[0], rows[1]])
    for key in a:
        n = int(a["attention_mask"][1].sum())
        assert torch.equal(a[key][1, :n], b[key][1, -n:])
        assert torch.equal(a[key][0], b[key][0])
    assert b["loss_weights"][1, :-n].eq(0).all()


def test_padding_with_eos_is_refused(tokenizer: Any, collators: Any) -> None:
    with pytest.raises(MaskingError, match="end-of-sequence"):
        prepare(collators.create("assistant-only", pad_token=EOT), [{"messages": CONVERSATION}],
                tokenizer)


def test_collating_without_preparation_is_an_error(collators: Any) -> None:
    with pytest.raises(MaskingError, match="prepare"):
        collators.create("assistant-only")([{"input_ids": [1], "labels": [1]}])


# ---------------------------------------------------------- slow tokenizers, datasets -----


class SlowView:
    """The shipped tokenizer seen as a slow one: ``encode`` only, no offsets."""

    is_fast = False

    def __init__(self, fast: Any) -> None:
        self.fast = fast

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.fast.encode(text, add_special_tokens=add_special_tokens)

    def build_inputs_with_special_tokens(self, ids: list[int]) -> list[int]:
        return [self.fast.bos_token_id, *ids]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fast, name)


@pytest.mark.parametrize("name", ["assistant-only", "completion-only", "all-tokens"])
def test_the_slow_tokenizer_fallback_gives_the_same_labels(tokenizer: Any, collators: Any,
                                                           name: str) -> None:
    for row in ({"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:3]},
                {"prompt": "hello ", "completion": "world"}):
        fast = prepare(collators.create(name), [row], tokenizer).dataset
        slow = prepare(collators.create(name), [row], SlowView(tokenizer)).dataset
        assert fast["input_ids"] == slow["input_ids"] and fast["labels"] == slow["labels"]


def test_the_slow_fallback_refuses_a_merge_it_cannot_see(tokenizer: Any) -> None:
    """A span boundary inside a token that does not straddle at the end of the prefix (the
    prefix tokenizes into several tokens that the whole text merges differently)."""
    text = "abcdefghij"
    full = tokenizer.encode(text, add_special_tokens=False)
    boundaries = [b for b in range(1, len(text))
                  if len(tokenizer.encode(text[:b], add_special_tokens=False))
                  - next((i for i, (x, y) in enumerate(zip(
                      tokenizer.encode(text[:b], add_special_tokens=False), full,
                      strict=False)) if x != y), 10**6) > 1]
    assert boundaries, "the shipped vocabulary no longer merges across a prefix of the probe"
    with pytest.raises(MaskingError, match="fast tokenizer"):
        encode_slow(SlowView(tokenizer), text, [WeightedSpan(boundaries[0], len(text))], False)


def test_num_proc_gives_the_same_result(tokenizer: Any, collators: Any) -> None:
    rows = [{"messages": CONVERSATION[: 3 + 2 * (i % 2)]} for i in range(40)]
    one = prepare(collators.create("assistant-only"), rows, tokenizer, batch_size=8)
    two = prepare(collators.create("assistant-only"), rows, tokenizer, batch_size=8,
                  num_proc=2)
    assert one.dataset["labels"] == two.dataset["labels"]


def test_preparation_is_cached_by_datasets(tmp_path: Path, tokenizer: Any,
                                           collators: Any) -> None:
    Dataset.from_list([{"messages": CONVERSATION}] * 4).save_to_disk(tmp_path / "data")
    dataset = load_from_disk(tmp_path / "data")
    first = collators.create("assistant-only").prepare(dataset, tokenizer, HandTemplate(),
                                                       desc=None)
    second = collators.create("assistant-only").prepare(dataset, tokenizer, HandTemplate(),
                                                        desc=None)
    assert first.dataset.cache_files and first.dataset.cache_files == second.dataset.cache_files
    other = collators.create("last-turn").prepare(dataset, tokenizer, HandTemplate(), desc=None)
    assert other.dataset.cache_files != first.dataset.cache_files


def test_a_tokenizer_that_is_not_byte_level_uses_offsets(tokenizer: Any, collators: Any) -> None:
    """A WordLevel tokenizer (with a normalizer) has no byte table; masking still works."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from sft_plugins.masking import ByteLevelSpans

    words = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
             PAD, "[UNK]", "user", "assistant", "hi", "there", "hello"]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(words[:5])
    wordlevel = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    assert ByteLevelSpans.of(wordlevel) is None and ByteLevelSpans.of(tokenizer) is not None
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "hello"}]
    row = prepare(collators.create("assistant-only"), [{"messages": messages}],
                  wordlevel).dataset[0]
    trained = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert wordlevel.convert_ids_to_tokens(trained) == ["hello", EOT]


def test_padding_left_switched_on_in_the_tokenizer_backend_does_not_leak() -> None:
    """A batched ``tokenizer(..., padding=True)`` call leaves padding on in the shared Rust
    backend; the batched encoding must still give every example its own length."""
    padded = llama_tokenizer()
    padded.pad_token = PAD
    padded(["a", "a much longer text"], padding=True)
    examples = [RenderedExample(text, (), False, False) for text in ("a", "a b c d e f")]
    for offsets in (True, False):
        encodings = encode_batch(examples, unpadded_backend(padded), offsets=offsets)
        assert [len(e.ids) for e in encodings] == [1, 6]
    assert padded.backend_tokenizer.padding is not None  # the caller's tokenizer is untouched


def test_one_process_preparation_gets_the_tokenizer_threads_back(tokenizer: Any,
                                                                collators: Any,
                                                                monkeypatch: Any) -> None:
    """After a ``map(num_proc=2)`` the C environment says ``TOKENIZERS_PARALLELISM=false``
    while ``os.environ`` does not; one-process preparation re-exports Python's view."""
    import ctypes
    import os

    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    Dataset.from_list([{"a": i} for i in range(4)]).map(lambda row: row, num_proc=2)
    assert libc.getenv(b"TOKENIZERS_PARALLELISM") == b"false"
    assert "TOKENIZERS_PARALLELISM" not in os.environ
    prepare(collators.create("all-tokens"), [{"text": "hi"}], tokenizer)
    assert libc.getenv(b"TOKENIZERS_PARALLELISM") is None
