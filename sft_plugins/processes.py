"""Worker processes of ``datasets.map`` and the Rust tokenizer's thread pool."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"


@contextmanager
def tokenizers_parallelism_kept() -> Iterator[None]:
    """Give the Rust tokenizer back, on exit, the thread-pool setting it had on entry.

    ``datasets.map(num_proc>1)`` sets ``TOKENIZERS_PARALLELISM=false`` before it forks and then
    restores ``os.environ`` by reassigning the mapping, which leaves the C environment (the one
    the Rust library reads) at ``false``: every later batched call in the main process would run
    on one thread. Wrap every ``map`` that may start workers in this.
    """
    value = os.environ.get(PARALLELISM_ENV)
    try:
        yield
    finally:
        if value is None:
            os.environ.pop(PARALLELISM_ENV, None)
            os.unsetenv(PARALLELISM_ENV)
        else:
            os.environ[PARALLELISM_ENV] = value  # also calls putenv


__all__ = ["PARALLELISM_ENV", "tokenizers_parallelism_kept"]
