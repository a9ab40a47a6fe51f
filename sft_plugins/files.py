"""Writing a file so that nobody ever reads half of it: a process killed mid-write, or a disk
that fills up, leaves the previous version (or nothing), never a truncated one."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomically(path: str | os.PathLike[str], text: str, *,
                          fsync: bool = False) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``.

    ``fsync=True`` also puts the file and the rename on disk before returning (for a record
    that says other files are complete, which must not outlive a power cut they did not)."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(text)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    if fsync:
        sync_to_disk(target.parent)
    return target


def sync_to_disk(path: str | os.PathLike[str]) -> None:
    """``fsync`` a file, or a directory (which makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["sync_to_disk", "write_text_atomically"]
