"""The installed distribution's version, and the code behind a cached result.

Caches record :func:`code_fingerprint`, not the version alone: a source tree, an editable
install or a plugin being written keeps its version number while its code changes, and a
cache keyed by the number would hand back what the old code computed.
"""

from __future__ import annotations

import hashlib
import inspect
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("sft-plugins")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"


def code_fingerprint(*objects: object) -> str:
    """A digest of this package's version and Python source, and of the source files that
    define ``objects``: each function, and each class of an object's type and its bases (a
    plugin's collator, a template's checks). Editing any of them changes it."""
    files = sorted({path for thing in objects for path in _defining_files(thing)})
    digest = hashlib.sha256(f"{__version__}\n{_package_source()}\n".encode())
    for path in files:
        digest.update(f"{path}\n{_file_digest(path)}\n".encode())
    return digest.hexdigest()


def _defining_files(thing: object) -> set[str]:
    """The source files of a function, or of the classes of an object's type (builtins and
    classes without a file, such as those made at run time, have none)."""
    found = set()
    for item in (thing,) if inspect.isroutine(thing) else type(thing).__mro__:
        try:
            path = inspect.getsourcefile(item)  # type: ignore[arg-type]
        except TypeError:  # built in
            continue
        if path is not None and Path(path).is_file():
            found.add(str(Path(path).resolve()))
    return found


def _package_source() -> str:
    """This package's modules."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(f"{path.relative_to(root)}\n{_file_digest(str(path))}\n".encode())
    return digest.hexdigest()


def _file_digest(path: str) -> str:
    """The file's SHA-256, read again only when its size or modification time changed."""
    stat = Path(path).stat()
    return _digest_of(path, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=1024)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
