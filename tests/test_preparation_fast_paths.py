"""The shortcuts preparation takes for speed give the answers of the plain ways they replace.

Preparation runs once per example: a template renders with its span markers compiled to direct
calls and with ``message.role`` read straight from the dict, the token ranges of a whole batch
come from one running sum, a row without special-token text is not rebuilt, and the pad token is
looked up without building the tokenizer's whole vocabulary. Each is checked here against the
way it replaces.
"""

from __future__ import annotations

from typing import Any

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment
from test_masking_support import llama_tokenizer

from sft_plugins.literal_text import protect, special_text
from sft_plugins.masking import ByteLevelSpans, WeightedSpan
from sft_plugins.templates import _in_vocabulary, _jinja

EXAMPLES = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
ALPHABET = [*"ab xyz\n\t.,!?:#-0123456789", "é", "🦙", "中", "<|eot_id|>"]
TEXT = st.lists(st.sampled_from(ALPHABET), max_size=30).map("".join)


def recorded(source: str, messages: list[dict[str, Any]]) -> _jinja.Recording:
    return _jinja.render(source, {"messages": messages})


# ------------------------------------------------------------------- span markers ----------


def test_a_generation_block_keeps_its_own_scope() -> None:
    """Compiled inline, a ``{% generation %}`` block still keeps what it sets to itself, as
    the call block it replaces did."""
    source = ("{% set x = 'outer' %}{% for m in messages %}{% message m %}"
              "{% generation %}{% set x = 'inner' %}{{ m.content }}{% endgeneration %}"
              "{{ x }}|{% endfor %}{% endmessages %}")
    recording = recorded(source, [{"role": "assistant", "content": "ab"},
                                  {"role": "assistant", "content": "cde"}])
    assert "".join(recording.blocks) == "abouter|cdeouter|"
    assert recording.generations == [(0, 2), (8, 11)]
    assert recording.starts == [(0, 0), (1, 8)] and recording.end == 17


def test_a_generation_block_inside_a_macro_is_recorded_as_before() -> None:
    """Inside a macro the body is buffered, so the block keeps its call-block form: its span
    starts where the output stood when the macro's result was produced."""
    source = ("{% macro turn(m) %}{% generation %}{{ m.content }}{% endgeneration %}"
              "{% endmacro %}<{% for m in messages %}{% message m %}{{ turn(m) }}{% endfor %}")
    recording = recorded(source, [{"role": "assistant", "content": "hello"}])
    assert "".join(recording.blocks) == "<hello"
    assert recording.generations == [(1, 6)]


def test_marker_filters_cannot_be_named_by_a_template() -> None:
    with pytest.raises(jinja2.TemplateSyntaxError):
        _jinja.compile_template("{{ messages | sft-plugins.message }}")


# --------------------------------------------------------------- sandbox getattr ----------


@pytest.mark.parametrize("expression", [
    "m.role", "m.missing is defined", "m.items is callable", "m.get('role')",
    "m.keys() | list | length", "m.__class__ is defined", "m.content | trim",
])
def test_attribute_reads_on_dicts_match_the_stock_sandbox(expression: str) -> None:
    """``message.x`` on a dict: the key, unless ``x`` is an attribute of ``dict`` (a method),
    and undefined when it is neither, as jinja's own sandbox answers."""
    message = {"role": "user", "content": " hi ", "items": "a key named items"}
    source = "{{ " + expression + " }}"
    stock = ImmutableSandboxedEnvironment().from_string(source).render(m=message)
    assert _jinja.compile_template(source).render(m=message) == stock


# ------------------------------------------------------------ byte-level ranges -----------


@EXAMPLES
@given(batch=st.lists(st.tuples(TEXT, st.lists(st.integers(0, 60), max_size=6)), max_size=6),
       broken=st.integers(0, 5))
def test_batched_ranges_equal_the_ranges_of_each_example(batch: list[tuple[str, list[int]]],
                                                         broken: int) -> None:
    """One running sum over the batch gives each example's ranges (empty texts, empty spans,
    multi-byte characters, and an example whose ids do not spell its text among them)."""
    tokenizer = llama_tokenizer()
    table = ByteLevelSpans.of(tokenizer)
    assert table is not None
    texts = [text for text, _ in batch]
    ids = [encoding.ids for encoding in tokenizer.backend_tokenizer.encode_batch_fast(
        texts, add_special_tokens=False)]
    if broken < len(ids) and ids[broken]:
        ids[broken] = ids[broken][:-1]  # no longer spells its text: None, as alone
    spans = []
    for text, cuts in batch:
        bounds = sorted(min(c, len(text)) for c in cuts)
        spans.append([WeightedSpan(a, b) for a, b in zip(bounds[::2], bounds[1::2],
                                                         strict=False)])
    assert table.ranges_batch(texts, ids, spans) == [
        table.ranges(text, example_ids, example_spans)
        for text, example_ids, example_spans in zip(texts, ids, spans, strict=True)]


# --------------------------------------------------------------- literal text -------------


def test_a_row_without_special_text_comes_back_as_it_is() -> None:
    special = special_text(llama_tokenizer())
    assert special is not None
    row = {"messages": [{"role": "user", "content": "plain"}], "tools": None, "n": 3}
    assert protect(row, special) == (row, []) and protect(row, special)[0] is row


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": "quote <|eot_id|> here"}]},
    {"messages": ({"role": "user", "content": ["nested", ("<|eot_id|>",)]},)},
    "<|start_header_id|>",
])
def test_special_text_anywhere_in_a_row_is_found(row: Any) -> None:
    special = special_text(llama_tokenizer())
    assert special is not None
    protected, originals = protect(row, special)
    assert originals and "<|" not in str(protected)


# -------------------------------------------------------------------- vocabulary ----------


def test_vocabulary_lookups_answer_as_get_vocab() -> None:
    tokenizer = llama_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|added_later|>"]})
    vocabulary = tokenizer.get_vocab()
    in_vocabulary = _in_vocabulary(tokenizer)
    for token in [*list(vocabulary)[:500], "<|added_later|>", "<|eot_id|>", "nope", "", "Ġ"]:
        assert in_vocabulary(token) == (token in vocabulary), token


def test_a_tokenizer_with_its_own_get_vocab_is_asked_through_it() -> None:
    class Own:
        backend_tokenizer = None

        def get_vocab(self) -> dict[str, int]:
            return {"<pad>": 0}

    assert _in_vocabulary(Own())("<pad>") and not _in_vocabulary(Own())("<eos>")


# -------------------------------------------------------------------- cache key -----------


def test_only_data_that_datasets_caches_pays_for_hashing_the_tokenizer(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache key serialises the whole tokenizer: in-memory rows (no cache file to write)
    are labelled without it, rows read from a cache file get the same key run after run."""
    from datasets import Dataset, load_from_disk
    from datasets.fingerprint import Hasher

    from sft_plugins.masking import preparation
    from sft_plugins.testing import plugin_manager

    manager = plugin_manager(with_first_party=True)
    template = manager.templates.get("llama-3.1")
    tokenizer = template.configure_tokenizer(llama_tokenizer())
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"},
                          {"role": "assistant", "content": f"hello {i}"}]} for i in range(4)]
    hashed: list[Any] = []
    monkeypatch.setattr(preparation, "Hasher", type("Counting", (), {"hash": staticmethod(
        lambda value: hashed.append(value) or Hasher.hash(value))}))

    def prepared(dataset: Dataset) -> Any:
        collator = manager.collators.create("assistant-only")
        return collator.prepare(dataset, tokenizer, template, desc=None).dataset

    in_memory = prepared(Dataset.from_list(rows))
    assert hashed == [] and in_memory["input_ids"]
    Dataset.from_list(rows).save_to_disk(tmp_path / "rows")
    on_disk = [prepared(load_from_disk(tmp_path / "rows")) for _ in range(2)]
    assert len(hashed) == 2 and on_disk[0]._fingerprint == on_disk[1]._fingerprint
    assert on_disk[0]["input_ids"] == in_memory["input_ids"]
