"""Turning what the user passed (paths, globs, a directory, a data set, a hub name) into pieces.

A :class:`Piece` is one file (or one in-memory data set) as a memory-mapped Arrow ``Dataset``,
plus what preparation needs to know about it: where it came from and which columns its examples
have. Pieces are prepared one by one so that every row keeps its file and line.

JSON Lines files are split into lines in large blocks and written, as a column of raw bytes with
each line's number, to a memory-mapped Arrow file in the cache; the lines are parsed during
preparation. Against pyarrow's JSON reader this moves the parsing into Python, and buys three
things the reader cannot give: exact line numbers, one bad line reported (or skipped) as
one bad example instead of failing the whole file, and no Arrow schema inference over nested
fields whose keys differ from row to row (tool-call arguments, tool schemas). JSON array files
take the same path with each element as one raw row. CSV and Parquet files, in-memory data sets
and hub data sets keep their typed columns.

Every failure to read a source becomes one :class:`~sft_plugins.errors.DataError` that names the
source and says what to do, never a traceback from inside ``datasets``.

Streamed, the same sources become ``datasets.IterableDataset`` pieces (:func:`stream_pieces`): a
JSON Lines file is read a block at a time while training reads it (its lines keep their numbers),
never copied into the cache; other files are read as above and streamed from their memory-mapped
copy; an ``IterableDataset`` is taken as it is.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import logging
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import datasets.config
import pyarrow as pa
from datasets import Dataset, DatasetDict, Features, IterableDataset, Value, load_dataset
from datasets.fingerprint import Hasher

from sft_plugins.cache_files import is_whole
from sft_plugins.errors import DataError

logger = logging.getLogger(__name__)

RAW = "raw"
"""The column of raw JSON bytes in a piece read from JSON Lines or a JSON array."""

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
SUFFIXES = (*JSON_LINES_SUFFIXES, ".json", ".parquet", ".csv", ".tsv")
"""Data files by suffix; every one but ``.parquet`` may also be gzip-compressed (``.jsonl.gz``)."""
PEEK_LINES = 100
"""How many non-blank lines of a JSON Lines file are read to find the columns of its examples."""

RAW_SCHEMA = pa.schema([(RAW, pa.binary()), ("source_line", pa.int64())])
RAW_FEATURES = Features({RAW: Value("binary"), "source_line": Value("int64")})
"""The same two columns, as the features of a streamed JSON Lines piece."""
RAW_LAYOUT = 1
"""Version of the raw cache files' layout; part of their names."""
READ_BLOCK = 16 << 20
"""Bytes of a JSON Lines file read at a time."""
ARRAY_BLOCK = 10_000
"""Elements of a JSON array file written at a time."""

Source = str | os.PathLike[str] | Dataset | DatasetDict | IterableDataset


@dataclass(frozen=True)
class Piece:
    """One file or data set, loaded (or, streamed, opened), with the columns its examples
    have."""

    dataset: Dataset | IterableDataset
    name: str
    columns: tuple[str, ...]
    first_example: dict[str, Any] | None
    raw: bool
    first_problem: str | None = None
    """Why the first line of a raw JSON Lines file is not an example, when none of the first
    lines is one (``line 1: not valid JSON (...)``)."""


def load_pieces(source: Source | Sequence[str | os.PathLike[str]], *, split: str = "train",
                cache_dir: str | None = None) -> list[Piece]:
    """Every piece of ``source``, in a stable order (sorted paths within a glob or directory)."""
    if isinstance(source, DatasetDict):
        if split not in source:
            raise DataError(f"the DatasetDict has no split {split!r}; it has "
                            f"{', '.join(source) or 'none'}. Pass split=<one of them>.")
        return [_in_memory(source[split], f"<DatasetDict[{split!r}]>")]
    if isinstance(source, Dataset):
        return [_in_memory(source, "<in-memory Dataset>")]
    if isinstance(source, IterableDataset):
        raise DataError("an IterableDataset cannot be validated before training; pass "
                        "streaming=True (--streaming) to validate it while training reads it, or "
                        "load it as a Dataset (datasets.load_dataset(..., streaming=False))")
    return _named_pieces(source, split, cache_dir, _from_hub, _from_file)


def _named_pieces(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                  split: str, cache_dir: str | None,
                  from_hub: Callable[[str, str, str | None], Piece],
                  from_file: Callable[[Path, str | None], Piece]) -> list[Piece]:
    """The pieces of paths, globs, directories and hub names, each file or hub name opened by
    ``from_file`` or ``from_hub`` (read whole, or streamed)."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise DataError("no data source given; expected a file, glob, directory, data set or "
                        "data set name")
    pieces = []
    for item in items:
        paths = _resolve(os.fspath(item))
        if paths is None:
            pieces.append(from_hub(os.fspath(item), split, cache_dir))
        else:
            pieces.extend(from_file(path, cache_dir) for path in paths)
    return pieces


def _resolve(source: str) -> list[Path] | None:
    """The files a path, glob or directory names; ``None`` if it looks like a hub name.

    A directory contributes every data file below it, except in hidden folders (``.cache``).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and data_suffix(p) in SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{source}: the directory holds no data files; expected files "
                            f"ending in {', '.join(SUFFIXES)}")
        return files
    if glob.has_magic(source):
        matched = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True)
                         if Path(p).is_file())
        if not matched:
            raise DataError(f"{source}: the pattern matches no files")
        return matched
    if path.is_file():
        return [path]
    if _looks_local(source, path):
        raise DataError(f"{source}: no such file or directory (working directory "
                        f"{os.getcwd()}). Check the path, or pass a name datasets.load_dataset "
                        "accepts.")
    return None


def _looks_local(source: str, path: Path) -> bool:
    """A data file's name, an explicit path, or a path under an existing directory; hub names
    such as ``org/name`` are none of these."""
    return (data_suffix(path) in SUFFIXES or source.startswith((".", "/", "~"))
            or (path.parent != Path() and path.parent.is_dir()))


def data_suffix(path: Path) -> str:
    """The suffix that says what a file holds: ``.jsonl`` for ``train.jsonl.gz`` too."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] == ".gz":
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice (``json`` would keep the last value in silence)."""


def _object_without_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        counts = Counter(key for key, _ in pairs)
        twice = next(key for key, count in counts.items() if count > 1)
        raise DuplicateKeyError(f"the key {twice!r} appears twice in one object")
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def loads_strict(text: str | bytes) -> Any:
    """``json.loads`` that refuses what would break later, each as a ``ValueError``: an object
    with a repeated key, bytes that are not UTF-8 (``json.loads`` on bytes would also take
    UTF-16 and UTF-32), a lone surrogate escape (``"\\ud800"``: no UTF-8 encoding exists for
    it, so the tokenizer would fail on it), and nesting too deep for Python to parse."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        value = json.loads(text, object_pairs_hook=_object_without_duplicate_keys)
    except RecursionError:
        raise ValueError("nested too deeply (past Python's recursion limit)") from None
    if ("\\ud" in text or "\\uD" in text) and _has_surrogate(value):
        raise ValueError("a \\uXXXX escape is a lone UTF-16 surrogate, which is not a "
                         "character")
    return value


_BYTE_ORDER_MARKS = ((b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
                     (b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"),
                     (b"\xfe\xff", "UTF-16 (big-endian)"), (b"\xff\xfe", "UTF-16 (little-endian)"))


def check_text_encoding(path: Path) -> None:
    """Refuse, once for the whole file, text in an encoding other than UTF-8: split into lines
    as bytes, UTF-16 would otherwise be one readable first line and garbage after it."""
    with open_data_file(path) as handle:
        head = handle.read(4096)
    encoding = next((name for mark, name in _BYTE_ORDER_MARKS if head.startswith(mark)), None)
    if encoding is None and b"\x00" in head:
        encoding = "UTF-16 or UTF-32 (NUL bytes, no byte-order mark)"
    if encoding is not None:
        raise DataError(f"{path}: the file is encoded as {encoding}; expected UTF-8. Convert it "
                        f"first, e.g. iconv -f UTF-16 -t UTF-8 {path.name} > "
                        f"{path.stem}.utf8{path.suffix}")


def open_data_file(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when its name ends in ``.gz``."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


def _from_file(path: Path, cache_dir: str | None) -> Piece:
    try:
        return _read_file(path, cache_dir)
    except (OSError, EOFError, zlib.error) as exc:  # unreadable, or a corrupt .gz
        raise DataError(f"{path}: cannot be read ({exc}); check the file's permissions and, "
                        "for .gz files, that it is complete gzip data") from None


def _read_file(path: Path, cache_dir: str | None) -> Piece:
    suffix = data_suffix(path)
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; expected one of "
                        f"{', '.join(SUFFIXES)}")
    if path.stat().st_size == 0 or not _has_content(path):
        raise DataError(f"{path}: the file is empty; expected at least one example")
    if suffix != ".parquet":
        check_text_encoding(path)
    if suffix in JSON_LINES_SUFFIXES:
        return _json_lines(path, cache_dir)
    if suffix == ".json":
        if _is_json_lines(path):
            return _json_lines(path, cache_dir)
        return _json_array(path, cache_dir)
    if suffix == ".parquet":
        dataset = _wrapped(path, "Parquet", lambda: Dataset.from_parquet(str(path),
                                                                         cache_dir=cache_dir))
    else:
        sep = "\t" if suffix == ".tsv" else ","
        # every cell a string ("007" stays "007"); only empty cells are missing ("NA" is text)
        features = Features({name: Value("string") for name in _csv_header(path, sep)})
        dataset = _wrapped(path, "CSV", lambda: Dataset.from_csv(
            str(path), cache_dir=cache_dir, sep=sep, features=features,
            keep_default_na=False, na_values=[""]))
    return Piece(dataset, str(path), tuple(dataset.column_names), dict(dataset[0]), raw=False)


def _csv_header(path: Path, sep: str) -> list[str]:
    """The column names, after checking that at least one row follows them."""
    try:
        with io.TextIOWrapper(open_data_file(path), encoding="utf-8-sig", newline="") as handle:
            rows = (row for row in csv.reader(handle, delimiter=sep) if row)
            header = next(rows)
            if next(rows, None) is None:
                raise DataError(f"{path}: the file has a header but no rows; expected at least "
                                "one example")
            return header
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot be read as CSV ({exc}); expected a first line of "
                        "column names, then one example per row, UTF-8 encoded") from None


def _has_content(path: Path) -> bool:
    with open_data_file(path) as handle:
        while chunk := handle.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _wrapped(path: Path, kind: str, load: Any) -> Dataset:
    """Run a ``datasets`` loader and turn its failure into one line naming the file."""
    try:
        return load()
    except Exception as exc:  # datasets wraps the reader's error several levels deep
        root: BaseException = exc
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__  # type: ignore[assignment]
        reason = str(root).strip().rstrip(".")  # pyarrow's messages end with their own stop
        raise DataError(f"{path}: cannot be read as {kind}: {reason}. Check that the file is "
                        f"valid {kind}.") from exc


def _is_json_lines(path: Path) -> bool:
    """A ``.json`` file is JSON Lines when its first non-blank line is a whole JSON value."""
    with open_data_file(path) as handle:
        for line in handle:
            if line.strip():
                if line.lstrip().startswith(b"["):
                    return False
                try:
                    loads_strict(line)
                except ValueError:  # UnicodeDecodeError and DuplicateKeyError too
                    return False
                return True
    return False


def _line_chunks(path: Path) -> Iterator[tuple[list[bytes], list[int | None]]]:
    """Non-blank lines of a JSON Lines file and their 1-based numbers, a block at a time.

    Lines end at ``\n`` only (a ``\r`` before it is whitespace to the JSON parser), exactly as
    iterating over the file in binary mode would split them; a UTF-8 byte-order mark is dropped.
    """
    leftover = b""
    first_line = 1
    with open_data_file(path) as handle:
        while True:
            block = handle.read(READ_BLOCK)
            lines = (leftover + block).split(b"\n")
            leftover = lines.pop() if block else b""
            if first_line == 1 and lines:
                lines[0] = lines[0].removeprefix(b"\xef\xbb\xbf")
            keep = [i for i, line in enumerate(lines) if line.strip()]
            yield [lines[i] for i in keep], [first_line + i for i in keep]
            first_line += len(lines)
            if not block:
                return


def _element_chunks(elements: list[Any]) -> Iterator[tuple[list[bytes], list[int | None]]]:
    """The elements of a JSON array, each re-encoded as one raw row, a block at a time."""
    for start in range(0, len(elements), ARRAY_BLOCK):
        block = elements[start:start + ARRAY_BLOCK]
        yield ([json.dumps(e, ensure_ascii=False).encode() for e in block], [None] * len(block))


class _ReadError(Exception):
    """A failure to read the data file, told apart from a failure to write the cache."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _read_through(chunks: Iterator[Any]) -> Iterator[Any]:
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except (OSError, EOFError, zlib.error) as exc:
            raise _ReadError(exc) from exc
        yield chunk


def _raw_dataset(path: Path, chunks: Iterator[tuple[list[bytes], list[int | None]]],
                 cache_dir: str | None) -> Dataset:
    """Write raw rows to a memory-mapped Arrow file in the cache, once per version of the file.

    The file name hashes the path, size and modification time, so an edited file is read again
    and an unchanged one is not; it is written under a temporary name and renamed, so parallel
    ranks never see half a file.
    """
    stat = path.stat()
    key = Hasher.hash([str(path.resolve()), stat.st_size, stat.st_mtime_ns, RAW_LAYOUT])
    directory = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "sft_plugins_raw"
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{path.stem[:40]}-{key}.arrow"
    whole = is_whole(target)
    if target.exists() and not whole:
        logger.warning("%s: its cached copy %s is incomplete or damaged; reading it again",
                       path, target)
    if not whole:
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        try:
            with pa.OSFile(str(partial), "wb") as sink, \
                    pa.ipc.new_stream(sink, RAW_SCHEMA) as out:
                for raws, lines in _read_through(chunks):
                    out.write_batch(pa.record_batch(
                        [pa.array(raws, pa.binary()), pa.array(lines, pa.int64())],
                        schema=RAW_SCHEMA))
            os.replace(partial, target)
        except _ReadError as failure:
            raise failure.cause from None  # the data file itself: the caller names it
        except OSError as exc:
            raise DataError(f"{path}: cannot write its copy into the data cache {directory} "
                            f"({exc.strerror or exc}); free space there, or point the cache "
                            "elsewhere (HF_DATASETS_CACHE, or cache_dir=)") from None
        finally:
            partial.unlink(missing_ok=True)
    return Dataset.from_file(str(target))


def _json_lines(path: Path, cache_dir: str | None) -> Piece:
    first, problem = _first_object(path)
    dataset = _raw_dataset(path, _line_chunks(path), cache_dir)
    return Piece(dataset, str(path), tuple(first or ()), first, raw=True, first_problem=problem)


def _first_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The first line that is a JSON object, among the first :data:`PEEK_LINES` non-blank ones;
    without one, what was wrong with the first of them."""
    problem = None
    with open_data_file(path) as handle:
        seen = 0
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                value = loads_strict(line)
            except ValueError as exc:
                value, wrong = None, f"not valid JSON ({exc})"
            else:
                wrong = f"a JSON {_json_kind(value)}"
            if isinstance(value, dict):
                return value, None
            problem = problem or f"line {number}: {wrong}"
            seen += 1
            if seen >= PEEK_LINES:
                break
    return None, problem


def _json_kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _json_array(path: Path, cache_dir: str | None) -> Piece:
    try:
        with open_data_file(path) as handle:
            value = loads_strict(handle.read())
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); expected a JSON array of examples or "
                        "JSON Lines (one example per line)") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: the top-level JSON value is {type(value).__name__}; expected "
                        "a JSON array of examples or JSON Lines (one example per line)")
    if not value:
        raise DataError(f"{path}: the JSON array is empty; expected at least one example")
    first = next((v for v in value if isinstance(v, dict)), None)
    dataset = _raw_dataset(path, _element_chunks(value), cache_dir)
    return Piece(dataset, str(path), tuple(first or ()), first, raw=True)


def _in_memory(dataset: Dataset, name: str) -> Piece:
    if len(dataset) == 0:
        raise DataError(f"{name}: the data set has no rows; expected at least one example")
    return Piece(dataset, name, tuple(dataset.column_names), dict(dataset[0]), raw=False)


def _from_hub(name: str, split: str, cache_dir: str | None) -> Piece:
    return _in_memory(_hub_dataset(name, split, cache_dir, streaming=False), name)


def _hub_dataset(name: str, split: str, cache_dir: str | None, *,
                 streaming: bool) -> Dataset | IterableDataset:
    """``datasets.load_dataset(name)``'s split, any failure one :class:`DataError`."""
    call = f"datasets.load_dataset({name!r}, split={split!r}{', streaming=True' * streaming})"
    try:
        dataset = load_dataset(name, split=split, cache_dir=cache_dir,
                               **({"streaming": True} if streaming else {}))
    except Exception as exc:  # network, auth, unknown name, unknown split: all one message
        raise DataError(f"{name}: not a local file, and {call} failed: {exc}. Check the path "
                        "or the data set name.") from exc
    expected = IterableDataset if streaming else Dataset
    if not isinstance(dataset, expected):
        raise DataError(f"{name}: datasets.load_dataset returned {type(dataset).__name__}; "
                        f"expected {'an' if streaming else 'a'} {expected.__name__}")
    return dataset


def stream_pieces(source: Source | Sequence[str | os.PathLike[str]], *, split: str = "train",
                  cache_dir: str | None = None) -> list[Piece]:
    """Every piece of ``source`` as a ``datasets.IterableDataset`` of one shard, in the order
    :func:`load_pieces` gives (one shard per file, so ranks can be given whole files)."""
    if isinstance(source, IterableDataset):
        return [_iterable_piece(source, "<IterableDataset>")]
    if isinstance(source, (Dataset, DatasetDict)):
        return [_streamed(piece) for piece in load_pieces(source, split=split,
                                                           cache_dir=cache_dir)]
    return _named_pieces(source, split, cache_dir, _stream_from_hub, _stream_file)


def _streamed(piece: Piece) -> Piece:
    """A loaded piece streamed from its memory-mapped Arrow rows."""
    return Piece(piece.dataset.to_iterable_dataset(num_shards=1),  # type: ignore[union-attr]
                 piece.name, piece.columns, piece.first_example, piece.raw)


def _stream_file(path: Path, cache_dir: str | None) -> Piece:
    """A JSON Lines file read while it is iterated; any other file read as :func:`_from_file`
    reads it (a JSON array is parsed whole anyway) and streamed from that copy."""
    try:
        if data_suffix(path) in JSON_LINES_SUFFIXES or (
                data_suffix(path) == ".json" and path.stat().st_size and _is_json_lines(path)):
            if path.stat().st_size == 0 or not _has_content(path):
                raise DataError(f"{path}: the file is empty; expected at least one example")
            check_text_encoding(path)
            first, problem = _first_object(path)
            dataset = IterableDataset.from_generator(
                _raw_line_rows, features=RAW_FEATURES, gen_kwargs={"path": str(path)})
            return Piece(dataset, str(path), tuple(first or ()), first, raw=True,
                         first_problem=problem)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot be read ({exc}); check the file's permissions and, "
                        "for .gz files, that it is complete gzip data") from None
    return _streamed(_from_file(path, cache_dir))


def _raw_line_rows(path: str) -> Iterator[dict[str, Any]]:
    """The generator of a streamed JSON Lines piece: each non-blank line, as raw bytes with
    its number, read 16 MiB at a time (so memory stays flat however large the file)."""
    try:
        for raws, lines in _line_chunks(Path(path)):
            for raw, line in zip(raws, lines, strict=True):
                yield {RAW: raw, "source_line": line}
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot be read while streaming it ({exc}); check that the "
                        "file is still there and, for .gz files, that it is complete gzip "
                        "data") from None


def _iterable_piece(dataset: IterableDataset, name: str) -> Piece:
    """An ``IterableDataset`` as it is; its columns are its features', else its first row's."""
    first = next(iter(dataset.take(1)), None)
    if first is None:
        raise DataError(f"{name}: the stream has no rows; expected at least one example")
    columns = tuple(dataset.column_names or first)
    return Piece(dataset, name, columns, dict(first), raw=False)


def _stream_from_hub(name: str, split: str, cache_dir: str | None) -> Piece:
    stream = _hub_dataset(name, split, cache_dir, streaming=True)
    return _iterable_piece(stream, name)  # type: ignore[arg-type]


def rename(columns: Sequence[str], column_map: Mapping[str, str] | None) -> tuple[str, ...]:
    """Column names after ``column_map`` (source name -> canonical name) is applied."""
    mapping = column_map or {}
    return tuple(mapping.get(c, c) for c in columns)
