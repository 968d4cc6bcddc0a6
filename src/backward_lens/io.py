"""Atomic file writes, the one JSON serialiser, and the one reader of JSON-lines run files.

A reader never sees a half-written file and a crash never leaves one (:func:`atomic_write`);
:func:`to_jsonable` / :func:`dumps` turn any result (dataclasses, pydantic models, tensors,
numpy values) into JSON; :func:`read_jsonl` reads append-only run files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

from backward_lens.errors import DataError

JsonValue: TypeAlias = "dict[str, JsonValue] | list[JsonValue] | str | int | float | bool | None"
"""A value JSON can hold as it is (what :func:`to_jsonable` returns)."""


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
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: _discard(tmp.write_text(text, encoding="utf-8")))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: _discard(tmp.write_bytes(data)))


def _discard(_: object) -> None:
    """Drop a return value (``write_text`` returns a byte count)."""


def atomic_write_many(files: dict[Path, bytes]) -> list[Path]:
    """Write several files as one step.

    All are written to temporaries beside their targets first, then renamed into place. If any
    write fails, every temporary is removed and no target is touched (neither created nor
    overwritten).

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


def to_jsonable(value: Any, *, finite: bool = True) -> Any:
    """Plain JSON-ready Python data (dicts, lists, str, int, float, bool, None) from ``value``.

    The one conversion every JSON writer of the package uses (the explain JSON, result rows,
    study and training run files, the viewer's replies): dataclasses and pydantic models become
    dicts of their fields, mappings get string keys, tuples and sets become lists, tensors and
    numpy arrays or scalars become (nested lists of) Python numbers, anything else its ``str``.
    A pydantic model writes the fields it was built with (``exclude_unset``), so a document read
    into a model and written again keeps its keys (an absent optional field stays absent).

    Args:
        value: the data to convert.
        finite: NaN and infinities become ``None`` (JSON ``null``); with ``False`` they are
            kept as floats (see :func:`dumps`).

    Returns:
        A new structure; ``value`` is not changed.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if not finite or math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, finite=finite) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v, finite=finite) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_jsonable(getattr(value, f.name), finite=finite)
            for f in dataclasses.fields(value)
        }
    if callable(getattr(value, "model_dump", None)):  # a pydantic model: the fields it was given
        return to_jsonable(value.model_dump(mode="python", exclude_unset=True), finite=finite)
    if callable(getattr(value, "tolist", None)):  # torch.Tensor, numpy arrays and scalars
        return to_jsonable(value.tolist(), finite=finite)
    return str(value)


def dumps(
    value: Any, *, indent: int | None = None, finite: bool = True, ensure_ascii: bool = False
) -> str:
    """``value`` as JSON text, through :func:`to_jsonable`.

    Args:
        value: the data to write.
        indent: as in :func:`json.dumps` (``None``: one line).
        finite: write NaN and infinities as ``null`` (standard JSON). With ``False`` they are
            written as ``NaN`` / ``Infinity`` (Python's extension, read back by
            :func:`json.loads`): the explain JSON and result rows keep them, so a diverged number
            stays visible in a summary instead of being skipped as missing.
        ensure_ascii: escape non-ASCII characters (result rows do, as they always have).

    Returns:
        The JSON text (no trailing newline).
    """
    return json.dumps(
        to_jsonable(value, finite=finite),
        indent=indent,
        ensure_ascii=ensure_ascii,
        allow_nan=not finite,
    )
