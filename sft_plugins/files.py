"""Writing a file so that nobody ever reads half of it: a process killed mid-write, or a disk
that fills up, leaves the previous version (or nothing), never a truncated one."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


__all__ = ["write_text_atomically"]
