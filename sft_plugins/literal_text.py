"""Special-token text inside the data stays text.

A fast tokenizer turns every occurrence of a special token's string into that token, wherever it
is: an assistant answer quoting ``<|eot_id|>`` would train the model to stop mid-answer, and a
user message holding ``<|start_header_id|>assistant<|end_header_id|>`` forges a turn.
``apply_chat_template`` and TRL behave that way. Here what came from the data is text; only the
template's own markup is special.

How, without slowing the common case:

1. :func:`protect` replaces each special-token string inside the row's strings with a
   placeholder of the same length (a private-use character numbering it, then fill), so the
   template renders the same text at the same positions;
2. :func:`restore` puts the strings back into the rendered text and returns where they are;
3. after the batch is tokenized as usual, :func:`splice` replaces each special token sitting
   exactly on such a place with the tokens of its string as plain text. A fast tokenizer splits
   its input at special tokens before anything else, so the tokens around are unchanged.

Rows without special-token text (nearly all) only pay one regular-expression search.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sft_plugins.errors import DataError

_FIRST = 0xE000
_LAST = 0xF8FE
_FILL = "\uf8ff"
_PRIVATE_USE = re.compile("[\ue000-\uf8ff]")
_PLACEHOLDER = re.compile("[\ue000-\uf8fe]\uf8ff*")


@dataclass(frozen=True)
class SpecialText:
    """The special tokens of one tokenizer: a pattern for their strings, and their ids."""

    pattern: re.Pattern[str]
    ids: frozenset[int]
    prefixes: tuple[str, ...]
    """The distinct first two characters of the strings: a string holding none of them is
    passed over with ``in`` alone (Llama 3's 256 all start with ``<|``)."""


def special_text(tokenizer: Any) -> SpecialText | None:
    """The tokenizer's special tokens (``None`` when it has none to guard against)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special = {i: t.content for i, t in decoder.items()
               if getattr(t, "special", False) and len(t.content) >= 2}
    if not special:
        return None
    # longest match first; ties by text, so every process builds the same (fingerprinted) value
    strings = sorted(set(special.values()), key=lambda s: (-len(s), s))
    return SpecialText(re.compile("|".join(map(re.escape, strings))), frozenset(special),
                       tuple(sorted({s[:2] for s in strings})))


def protect(value: Any, special: SpecialText) -> tuple[Any, list[str]]:
    """``value`` (a row: dicts, lists, strings) with each special-token string in its strings
    replaced by a same-length placeholder, and the replaced strings in placeholder order;
    ``value`` itself when none of its strings holds one (nearly every row)."""
    if not _holds_prefix(value, special.prefixes):
        return value, []
    originals: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        if len(originals) > _LAST - _FIRST:
            raise DataError(f"more than {_LAST - _FIRST} special-token strings in one example")
        originals.append(match.group(0))
        return chr(_FIRST + len(originals) - 1) + _FILL * (len(match.group(0)) - 1)

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            if not any(p in item for p in special.prefixes) or \
                    special.pattern.search(item) is None:
                return item
            if _PRIVATE_USE.search(item):
                raise DataError("the text holds both special-token strings and private-use "
                                "characters (U+E000-U+F8FF), which this check needs; remove "
                                "one of them, or pass the collator literal_special_tokens=False")
            return special.pattern.sub(placeholder, item)
        if isinstance(item, dict):
            return {key: walk(inner) for key, inner in item.items()}
        if isinstance(item, (list, tuple)):
            return [walk(inner) for inner in item]
        return item

    return walk(value), originals


def _holds_prefix(value: Any, prefixes: tuple[str, ...]) -> bool:
    """Whether a string anywhere in ``value`` (through the dicts, lists and tuples
    :func:`protect` walks) may hold a special token: the cheap test that lets a row without
    one through untouched instead of rebuilding it. The strings are searched joined by NUL
    (one search per prefix), so a prefix can only straddle two of them if it holds a NUL
    itself, and then the answer is only a needless "maybe"."""
    strings: list[str] = []
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            strings.append(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    joined = "\0".join(strings)
    return any(p in joined for p in prefixes)


def restore(text: str, originals: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """``text`` with the placeholders of :func:`protect` back to their strings, and the
    character span of each. A placeholder the template changed (escaped, cut) is an error: its
    text cannot be told apart from the template's own."""
    spans: list[tuple[int, int]] = []
    pieces: list[str] = []
    last = 0
    for match in _PLACEHOLDER.finditer(text):
        k = ord(match.group(0)[0]) - _FIRST
        if k >= len(originals) or len(match.group(0)) != len(originals[k]):
            raise DataError("the chat template changed the text of a special-token string in "
                            "the data, so it cannot be kept as text; remove it from the "
                            "data, or pass the collator literal_special_tokens=False")
        pieces += [text[last:match.start()], originals[k]]
        spans.append((match.start(), match.end()))
        last = match.end()
    pieces.append(text[last:])
    restored = "".join(pieces)
    if _PRIVATE_USE.search(restored):
        raise DataError("the chat template changed the text of a special-token string in the "
                        "data, so it cannot be kept as text; remove it from the data, or pass "
                        "the collator literal_special_tokens=False")
    return restored, spans


def plain_encoder(tokenizer: Any) -> Any:
    """A copy of the fast tokenizer's backend that reads special-token strings as text."""
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.encode_special_tokens = True
    backend.no_padding()
    backend.no_truncation()
    return backend


def splice(ids: Sequence[int], offsets: Sequence[tuple[int, int]], text: str,
           literal: Sequence[tuple[int, int]], special: SpecialText,
           encoder: Any) -> tuple[list[int], list[tuple[int, int]]]:
    """``ids`` and ``offsets`` with every special token that covers exactly a ``literal`` span
    replaced by the tokens of that span's text read as plain text."""
    places = set(literal)
    out_ids: list[int] = []
    out_offsets: list[tuple[int, int]] = []
    for token, (start, end) in zip(ids, offsets, strict=True):
        if token in special.ids and (start, end) in places:
            plain = encoder.encode(text[start:end], add_special_tokens=False)
            out_ids += plain.ids
            out_offsets += [(start + a, start + b) for a, b in plain.offsets]
        else:
            out_ids.append(token)
            out_offsets.append((start, end))
    return out_ids, out_offsets


def token_ranges_from_offsets(offsets: Sequence[tuple[int, int]],
                              spans: Sequence[Any]) -> list[tuple[int, int]]:
    """Token index ranges ``[a, b)`` of the tokens touching each span (``.start``, ``.end``),
    as :func:`sft_plugins.masking.token_ranges_fast` finds them from an encoding."""
    n_tokens = len(offsets)
    ranges: list[tuple[int, int]] = []
    for span in spans:
        touching = [i for i, (a, b) in enumerate(offsets)
                    if b > a and a < span.end and b > span.start]
        if not touching:
            ranges.append((n_tokens, n_tokens) if not ranges else (ranges[-1][1],) * 2)
            continue
        ranges.append((touching[0], touching[-1] + 1))
    return ranges


__all__ = ["SpecialText", "plain_encoder", "protect", "restore", "special_text", "splice",
           "token_ranges_from_offsets"]
