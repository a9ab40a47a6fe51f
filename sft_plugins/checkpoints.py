"""Checkpoints that are either complete or never resumed from.

The Trainer writes ``checkpoint-N`` file by file; a process killed while saving (a scheduler's
SIGKILL, an out-of-memory kill) leaves a directory with some files, a 0-byte
``trainer_state.json`` or weights only, and ``transformers.trainer_utils.get_last_checkpoint``
picks it because its name is the newest. Here a checkpoint counts as complete only once every
rank has written its part: then the main process syncs each file to disk and writes
:data:`COMPLETE_FILE` (the step and every file's size) under a temporary name, renamed into
place. Resuming picks the newest directory whose marker is there and whose files still have
those sizes, and says which ones it passed over and why.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path

from sft_plugins.errors import SFTPluginsError
from sft_plugins.files import sync_to_disk, write_text_atomically

logger = logging.getLogger(__name__)

COMPLETE_FILE = "sft_plugins_complete.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE = ("trainer_state.json", "scheduler.pt")
"""Files without which a resumed run is not the run it continues, beside the optimizer's state
and ``rng_state*.pth``."""
OPTIMIZER_STATE = ("optimizer.pt", "optimizer.bin", "optimizer_0", "global_step*")
"""Where the optimizer's state is: one file, FSDP's sharded directory, DeepSpeed's step folder."""


class CheckpointError(SFTPluginsError):
    """A checkpoint cannot be resumed from, or cannot be written."""


def mark_complete(directory: str | os.PathLike[str], step: int) -> None:
    """Sync every file of ``directory`` to disk, then record it as complete."""
    root = Path(directory)
    sizes: dict[str, int] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != COMPLETE_FILE:
            sync_to_disk(path)
            sizes[path.relative_to(root).as_posix()] = path.stat().st_size
    write_text_atomically(root / COMPLETE_FILE,
                          json.dumps({"global_step": step, "files": sizes}, indent=1),
                          fsync=True)


def incomplete_reason(directory: str | os.PathLike[str]) -> str | None:
    """Why ``directory`` is not a complete checkpoint, or ``None`` when it is."""
    root = Path(directory)
    try:
        record = json.loads((root / COMPLETE_FILE).read_text())
        files = dict(record["files"])
    except FileNotFoundError:
        return "never finished (the process stopped while saving it)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {COMPLETE_FILE} is unreadable"
    for name, size in files.items():
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def missing_training_state(directory: str | os.PathLike[str]) -> list[str]:
    """The files of a resumable training state that ``directory`` lacks."""
    root = Path(directory)
    missing = [name for name in TRAINING_STATE if not (root / name).is_file()]
    if not any(any(root.glob(pattern)) for pattern in OPTIMIZER_STATE):
        missing.insert(0, "optimizer.pt")
    if not any(root.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    return missing


def newest_complete(output_dir: str | os.PathLike[str]) -> tuple[Path | None,
                                                                 list[tuple[Path, str]]]:
    """The newest complete ``checkpoint-N`` in ``output_dir``, and the newer ones passed over
    with the reason for each."""
    root = Path(output_dir)
    found = sorted(((int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else [])
                    if p.is_dir() and (m := CHECKPOINT_NAME.match(p.name))), reverse=True)
    passed_over: list[tuple[Path, str]] = []
    for _, path in found:
        reason = incomplete_reason(path)
        if reason is None:
            return path, passed_over
        passed_over.append((path, reason))
    return None, passed_over


_DISK_FULL_TEXT = ("No space left on device", "StorageFull", "Disk quota exceeded")


NEARLY_FULL = 16 << 20
"""Free bytes below which a failed save is put down to a full disk: torch's zip writer reports
ENOSPC as ``unexpected pos N vs M``, with no error number."""


def is_disk_full(exc: BaseException, directory: str | os.PathLike[str]) -> bool:
    """Whether ``exc``, raised while writing into ``directory``, is a write that failed for
    lack of space: an ``OSError`` with ENOSPC/EDQUOT (or what caused it), the text safetensors'
    writer puts in its error, or any error with the disk all but full."""
    try:
        if shutil.disk_usage(directory).free < NEARLY_FULL:
            return True
    except OSError:
        pass
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(seen) for text in _DISK_FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def checkpoint_bytes(directory: str | os.PathLike[str]) -> int:
    """What ``directory`` holds on disk, in bytes."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def disk_full_error(run_dir: str, step: int, exc: BaseException) -> CheckpointError:
    """The error for a checkpoint that did not fit, after its partial directory was removed."""
    previous, _ = newest_complete(run_dir)
    needed = f"about {checkpoint_bytes(previous):,} bytes" if previous else "more space"
    kept = (f"{previous.name} is intact" if previous is not None
            else "no earlier checkpoint exists")
    return CheckpointError(
        f"no space left on the device of {run_dir} while saving checkpoint-{step}: it needs "
        f"{needed}, {shutil.disk_usage(run_dir).free:,} bytes are free ({exc.__class__.__name__})."
        f" The partial checkpoint-{step} was removed and {kept}. Free space or choose an "
        "--output_dir on a larger disk, then resume with --resume_from_checkpoint true")


def resolve_checkpoint(resume: str | bool | None, output_dir: str | os.PathLike[str], *,
                       accept_incomplete: bool = False) -> str | None:
    """The checkpoint ``resume_from_checkpoint`` means, or ``None`` for a fresh start.

    ``True``/``"true"``: the newest complete checkpoint of ``output_dir`` (the newer ones it
    passes over are logged with their reasons). A path: it must exist, hold the optimizer,
    scheduler and RNG state and be marked complete; with ``accept_incomplete`` a checkpoint that
    is not is resumed with a warning. Everything else is a :class:`CheckpointError`.
    """
    if resume in (None, False) or (isinstance(resume, str)
                                   and resume.lower() in ("", "false", "no")):
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() in ("true", "yes")):
        newest, passed_over = newest_complete(output_dir)
        for path, reason in passed_over:
            logger.warning("not resuming from %s: %s", path, reason)
        if newest is None:
            raise CheckpointError(
                f"--resume_from_checkpoint true: {output_dir} holds no complete checkpoint-N "
                "to resume from" + (f" ({len(passed_over)} incomplete)" if passed_over else "")
                + "; start without --resume_from_checkpoint, or name a checkpoint")
        logger.warning("resuming from %s, the newest complete checkpoint", newest)
        return str(newest)
    path = Path(str(resume))
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {resume}: no such checkpoint directory; "
                              "name a checkpoint-N directory, or pass true for the newest "
                              "complete one in --output_dir")
    problems = [f"missing {', '.join(missing)}"
                for missing in [missing_training_state(path)] if missing]
    reason = incomplete_reason(path)
    if reason is not None:
        problems.append(f"not marked complete: {reason}")
    if problems:
        message = (f"--resume_from_checkpoint {resume}: {'; '.join(problems)}. Resuming would "
                   "silently restart the optimizer, learning-rate schedule or noise")
        if not accept_incomplete:
            raise CheckpointError(message + "; resume from a complete checkpoint, or pass "
                                  "--resume_incomplete true (resume_incomplete=True) to "
                                  "accept it")
        logger.warning("%s; resuming anyway (resume_incomplete)", message)
    return str(path)


__all__ = ["COMPLETE_FILE", "CheckpointError", "checkpoint_bytes", "disk_full_error",
           "incomplete_reason", "is_disk_full", "mark_complete", "missing_training_state",
           "newest_complete", "resolve_checkpoint"]
