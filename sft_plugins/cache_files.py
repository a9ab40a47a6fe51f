"""Cached Arrow files are checked before they are trusted.

Preparation (reading the data, validating it, labelling it) is cached by ``datasets``: a second
run with the same data files, template, collator and options, tokenizer and code
(:func:`~sft_plugins._version.code_fingerprint`) loads the prepared rows instead of computing
them. ``datasets`` writes each cache file under a temporary name and renames it when complete,
but a file can still be damaged afterwards (a disk error, a copy cut short). An Arrow stream cut
at a record-batch boundary even reads back without an error, only shorter. So every cache file is
checked before use: it must end with the stream's end-of-stream marker and its record batches
must read; otherwise the step is computed again and the file replaced.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa

logger = logging.getLogger(__name__)

END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"
"""What an Arrow IPC stream writer writes last (continuation marker and a zero length)."""

T = TypeVar("T")


def is_whole(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a complete, readable Arrow IPC stream."""
    try:
        size = os.path.getsize(path)
        if size < len(END_OF_STREAM):
            return False
        with open(path, "rb") as handle:
            handle.seek(size - len(END_OF_STREAM))
            if handle.read() != END_OF_STREAM:
                return False
        with pa.memory_map(os.fspath(path)) as source:
            for _ in pa.ipc.open_stream(source):  # every batch's header and buffers
                pass
    except (OSError, pa.ArrowException):
        return False
    return True


def cached_step(step: Callable[[bool | None], T], load_from_cache_file: bool | None,
                what: str) -> T:
    """Run ``step(load_from_cache_file)`` (a ``Dataset.map`` or ``filter``), trusting a cache
    file it loads only if it is whole; else run it again without the cache, which rewrites it."""
    if load_from_cache_file is False:
        return step(False)
    try:
        result = step(load_from_cache_file)
    except (pa.ArrowException, OSError) as exc:  # a damaged cache file that does not open
        logger.warning("%s: a cached file could not be read (%s); preparing again", what, exc)
        return step(False)
    broken = [f["filename"] for f in _cache_files(result) if not is_whole(f["filename"])]
    if broken:
        logger.warning("%s: cached file %s is incomplete or damaged; preparing again", what,
                       ", ".join(broken))
        return step(False)
    return result


def _cache_files(result: Any) -> list[dict[str, str]]:
    return list(getattr(result, "cache_files", None) or [])


__all__ = ["END_OF_STREAM", "cached_step", "is_whole"]
