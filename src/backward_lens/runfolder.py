"""One resumable run folder: a config file checked on resume, and append-only JSON-lines rows.

The evaluation harness (``run.json`` + ``results.jsonl``), the study runner and causal tracing
(``config.json`` + ``raw.jsonl``) and the Ray driver all keep their runs in a
:class:`RunFolder`, so they resume the same way:

- **The config** describes what the rows measure. It is written (atomically) when a run starts
  and compared with the stored one before a run adds to existing rows: a difference is one
  :class:`~backward_lens.errors.InputError` line naming the differing keys
  (:meth:`RunFolder.check_config`); a damaged config file is a
  :class:`~backward_lens.errors.DataError`. Keys added to configs later (:data:`RECORDED_LATER`,
  e.g. the model's ``dtype``) are compared only when the stored config has them, so folders
  written before still resume (and their rewritten config then has them).
- **The rows** are one JSON object a line, appended (``flush`` per line, ``fsync`` per batch or
  per line) by one process only. Reading keeps every finished line; only a torn last line (a
  crash mid-write) is tolerated, and cut off only by the process that owns the file
  (:meth:`RunFolder.read_rows`); another process's file is only read
  (:meth:`RunFolder.read_all_rows`). A damaged line before the last is a ``DataError``.
- **Shards** (``--shard K/N``) each append to their own file, ``<rows>.shard-K-of-N.jsonl``
  (:mod:`backward_lens.distributed.shards`); a folder holding rows of another split is refused
  (:meth:`RunFolder.check_layout`).
- **The done keys**: each row has a key (a record's key, or (method label, record key)); a
  resumed run computes only what is not done (:meth:`RunFolder.done`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from backward_lens.distributed.shards import Shard, layout_problem, shard_files
from backward_lens.errors import DataError, InputError
from backward_lens.io import atomic_write_text, read_jsonl

__all__ = ["RECORDED_LATER", "RowWriter", "RunFolder", "differing_keys"]

RECORDED_LATER = frozenset({"dtype"})
"""Config keys that run folders did not always record: a stored config without one is not
compared on it (:meth:`RunFolder.check_config`)."""


def _row_key(row: Mapping[str, Any]) -> Hashable:
    """The default key of a row: its ``key`` field."""
    return row["key"]


def differing_keys(
    current: Mapping[str, Any], stored: Mapping[str, Any], ignore: Collection[str] = ()
) -> list[str]:
    """The keys of ``current`` whose values differ in ``stored`` (a missing key reads as None).

    Args:
        current: this run's config.
        stored: the config found in the folder.
        ignore: keys not compared (e.g. a record count a resumed run may raise).

    Returns:
        The differing keys, in ``current``'s order.
    """
    return [k for k in current if k not in ignore and current[k] != stored.get(k)]


@dataclass
class RunFolder:
    """A run folder: ``config_name`` (what was run) and this process's rows file.

    Attributes:
        path: the folder.
        rows_name: base name of the rows file (``results.jsonl``, ``raw.jsonl``); a shard's is
            ``<stem>.shard-K-of-N.<suffix>``.
        config_name: name of the config file (``run.json``, ``config.json``).
        shard: the part of the job this process runs (default: the whole job).
        key: a row's key (default: its ``key`` field); rows without one are damaged lines.
        hint: what to do about a damaged line, appended to the error message.
        encode: a row as one line of JSON text, no newline (default: compact ``json.dumps``).
    """

    path: Path
    rows_name: str
    config_name: str
    shard: Shard = field(default_factory=Shard)
    key: Callable[[Mapping[str, Any]], Hashable] = _row_key
    hint: str = "move the file aside or repair that line, then resume"
    encode: Callable[[Any], str] | None = None

    def __post_init__(self) -> None:
        """Accept a string ``path`` (it is stored as a ``Path``)."""
        self.path = Path(self.path)

    # -- files ------------------------------------------------------------------------------

    @property
    def rows_path(self) -> Path:
        """This process's rows file (``results.jsonl`` or ``results.shard-K-of-N.jsonl``)."""
        return self.path / self.shard.file_name(self.rows_name)

    @property
    def config_path(self) -> Path:
        """The config file."""
        return self.path / self.config_name

    def shard_files(self) -> list[tuple[Shard, Path]]:
        """Every rows file in the folder (plain and shards'), ordered by (N, K)."""
        return shard_files(self.path, self.rows_name)

    def others_hold_rows(self) -> bool:
        """Whether another process's (shard's) rows file in the folder holds anything."""
        own = self.rows_path
        return any(p != own and p.stat().st_size for _, p in self.shard_files())

    def holds_rows(self) -> bool:
        """Whether this process's rows file holds anything."""
        return self.rows_path.is_file() and self.rows_path.stat().st_size > 0

    def check_layout(self) -> None:
        """Refuse a folder holding rows of another split than this process's.

        Raises:
            InputError: rows of a run split into another number of shards (or unsplit).
        """
        problem = layout_problem(self.shard_files(), self.shard, self.path)
        if problem:
            raise InputError(problem)

    def discard_rows(self) -> None:
        """Delete this process's rows file (``--fresh``/``--overwrite``); other shards' stay."""
        self.rows_path.unlink(missing_ok=True)

    # -- config -----------------------------------------------------------------------------

    def read_config(self) -> dict[str, Any] | None:
        """The stored config, or None when there is none.

        Raises:
            DataError: the file is not a JSON object.
        """
        path = self.config_path
        if not path.is_file():
            return None
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise ValueError
        except (UnicodeDecodeError, ValueError):
            raise DataError(
                f"{path} is damaged (not a JSON object); move it aside, or start again with --fresh"
            ) from None
        return config

    def check_config(
        self,
        current: Mapping[str, Any],
        stored: Mapping[str, Any] | None,
        *,
        ignore: Collection[str] = (),
        advice: str = "resume with the same settings, or choose another --out",
    ) -> None:
        """Refuse to add rows measured with another config than the stored one.

        A key of :data:`RECORDED_LATER` that ``stored`` lacks (a folder written before it was
        recorded) is not compared.

        Args:
            current: this run's config (or the part of it the rows depend on).
            stored: the same part of the stored config (None: nothing to compare).
            ignore: keys not compared.
            advice: what the user can do, ending the message.

        Raises:
            InputError: one line: ``<folder> holds a different run (different K1, K2: K1 was
                V, now W); <advice>``.
        """
        if stored is None:
            return
        unrecorded = {key for key in RECORDED_LATER if key not in stored}
        diff = differing_keys(current, stored, {*ignore, *unrecorded})
        if diff:
            was, now = _short(stored.get(diff[0])), _short(current.get(diff[0]))
            raise InputError(
                f"{self.path} holds a different run (different {', '.join(diff)}: {diff[0]} was "
                f"{was}, now {now}); {advice}"
            )

    def write_config(self, config: Mapping[str, Any]) -> Path:
        """Write the config file atomically (the folder is created when missing)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(self.config_path, json.dumps(config, indent=2) + "\n")

    # -- rows -------------------------------------------------------------------------------

    def _valid(self, row: Any) -> bool:
        try:
            self.key(row)
        except (KeyError, TypeError):
            return False
        return True

    def read_rows(self) -> list[dict[str, Any]]:
        """This process's rows, oldest first; a torn last line is cut off the file.

        Raises:
            DataError: a damaged line before the last.
        """
        return read_jsonl(self.rows_path, valid=self._valid, repair=True, hint=self.hint)

    def read_all_rows(self) -> list[dict[str, Any]]:
        """Every shard's rows, the plain file first, then by shard.

        A key seen twice keeps its first row. Files are only read: a torn last line (maybe a
        shard still writing) is left out, not cut off.

        Raises:
            DataError: a damaged line before a file's last.
        """
        rows: dict[Hashable, dict[str, Any]] = {}
        for _, path in self.shard_files():
            for row in read_jsonl(path, valid=self._valid, hint=self.hint):
                rows.setdefault(self.key(row), row)
        return list(rows.values())

    def done(self, rows: Iterable[Mapping[str, Any]]) -> set[Hashable]:
        """The keys of ``rows``: what a resumed run does not compute again."""
        return {self.key(row) for row in rows}

    def writer(self) -> RowWriter:
        """An appender to this process's rows file (use it as a context manager)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return RowWriter(self.rows_path, self.encode)

    def append(self, row: Mapping[str, Any]) -> None:
        """Append one row and make it durable (open, write, flush, fsync, close)."""
        with self.writer() as writer:
            writer.write(row)


class RowWriter:
    """Appends rows to one JSON-lines file.

    Each line is flushed when written; :meth:`sync` (called on close too) makes them durable.
    Only one process writes a given file.

    Args:
        path: the rows file (created when missing).
        encode: a row as one line of JSON text (default: compact ``json.dumps``, values JSON
            cannot hold as lists or text).
    """

    def __init__(self, path: Path, encode: Callable[[Any], str] | None = None) -> None:
        self.path = path
        self.encode = encode or _compact
        self._fh: IO[str] = path.open("a", encoding="utf-8")

    def write(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` as one JSON line and flush it."""
        self._fh.write(self.encode(row) + "\n")
        self._fh.flush()

    def sync(self) -> None:
        """Make the lines written so far durable (``fsync``)."""
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Sync and close the file (idempotent)."""
        if not self._fh.closed:
            try:
                self.sync()
            finally:
                self._fh.close()

    def __enter__(self) -> RowWriter:
        """The writer itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close (and sync) the file."""
        self.close()


def _short(value: Any, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters (a message stays one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _compact(row: Mapping[str, Any]) -> str:
    return json.dumps(row, separators=(",", ":"), default=_jsonable)


def _jsonable(value: Any) -> Any:
    """Tensors and numpy values as lists or numbers; anything else JSON cannot hold as text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
