"""Atomic file writes (a reader never sees a half-written file, a crash never leaves one) and
the one reader of append-only JSON-lines run files (:func:`read_jsonl`)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backward_lens.errors import DataError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: _discard(tmp.write_text(text, encoding="utf-8")))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: _discard(tmp.write_bytes(data)))


def _discard(_: object) -> None:
    """Drop a return value (``write_text`` returns a byte count)."""


def atomic_write_many(files: dict[Path, bytes]) -> list[Path]:
    """Write several files as one step: all are written to temporaries beside their targets
    first, then renamed into place. If any write fails, every temporary is removed and no
    target is touched (neither created nor overwritten).

    Returns:
        The paths written, in the order given.

    Raises:
        OSError: from the first write that failed (after cleaning up).
    """
    temps: dict[Path, Path] = {}
    made: list[Path] = []  # folders this call created, removed again on failure
    done = False
    try:
        for path, data in files.items():
            missing = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
            path.parent.mkdir(parents=True, exist_ok=True)
            made += missing
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps[path] = Path(name)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(name, 0o666 & ~_umask())
        for path, tmp in temps.items():
            os.replace(tmp, path)
        done = True
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        if not done:
            for folder in made:  # deepest first
                with contextlib.suppress(OSError):
                    folder.rmdir()
    return list(files)


def read_jsonl(
    path: str | Path,
    *,
    valid: Callable[[Any], bool] | None = None,
    repair: bool = False,
    hint: str = "move the file aside or repair that line",
) -> list[dict[str, Any]]:
    """The rows of an append-only JSON-lines file (a run's results), oldest first.

    Every finished line is kept: a line that is not a JSON object (or fails ``valid``) is
    tolerated only as the last line, a write torn by a crash, and is left out; anywhere else it is
    an error. With ``repair=True`` that torn tail is also cut off the file (only the bytes after
    the last complete line), so the next append starts on a fresh line; only the process that
    owns the file may repair it (a reader of another process's file must not).

    Args:
        path: the file; a missing file reads as no rows.
        valid: extra check of a decoded row (e.g. it has a ``key``).
        repair: truncate a torn tail in place.
        hint: what the user should do, appended to the error message.

    Raises:
        DataError: a damaged line before the last one.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline (torn or empty)
    keep = len(data) - len(tail)
    rows: list[dict[str, Any]] = []
    for number, raw in enumerate(complete, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            ok = isinstance(row, dict) and (valid is None or valid(row))
        except (UnicodeDecodeError, ValueError):
            ok = False
        if not ok:
            if number == len(complete) and not tail.strip():
                keep -= len(raw) + 1  # a torn last line that happens to end in a newline
                break
            raise DataError(f"{path} line {number} is damaged (not a result line); {hint}")
        rows.append(row)
    if repair and keep != len(data):
        with path.open("r+b") as fh:  # cut the torn tail only; every complete line stays
            fh.truncate(keep)
            os.fsync(fh.fileno())
    return rows
