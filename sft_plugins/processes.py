"""Worker processes of ``datasets.map``, the Rust tokenizer's thread pool, and the end of a
distributed run's process group."""

from __future__ import annotations

import gc
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


def end_process_group() -> None:
    """Destroy the distributed process group, if one is up, while the interpreter is whole,
    after freeing what is left of the run. Call it once the trainer and its model are out of
    reach (returned from the function that trained, or deleted).

    PyTorch asks every distributed program to destroy its group before it exits. Left to the
    interpreter's own teardown, gloo's worker threads can still hold finished work whose
    tensors reach back into Python, and the rank aborts (``terminate called without an active
    exception``, SIGABRT) after a run that trained and saved everything: the launcher then
    reports the whole job as failed. The trainer, the DDP- or FSDP-wrapped model and the
    accelerator refer to each other, so only the cycle collector frees them; it runs here,
    before the group goes, rather than during the teardown.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


__all__ = ["PARALLELISM_ENV", "end_process_group", "tokenizers_parallelism_kept"]
