"""A training-lens run folder: ``run.json``, ``lens.jsonl``, ``log.jsonl`` and ``report.html``.

``run.json`` holds the settings, ``lens.jsonl`` one line per step, layer and matrix, ``log.jsonl``
the loss, learning rate and other logged scalars. Lines are appended, flushed and ``fsync``-ed one
at a time, so a run that crashes or is stopped keeps every line written before, and a reader (the
viewer, ``tail -f``) can follow a live run. A reader skips a last line that was cut short. Nothing
already in a folder is overwritten: a run starts only in a new or empty folder.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from backward_lens.errors import OutputPathError
from backward_lens.io import atomic_write_text, dumps

RUN_FILE = "run.json"
LENS_FILE = "lens.jsonl"
LOG_FILE = "log.jsonl"
REPORT_FILE = "report.html"


def check_run_folder(path: str | Path) -> Path:
    """Refuse a run folder that is a file or already holds something (checked before any work).

    Raises:
        OutputPathError: ``path`` is a file, or a folder that is not empty.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path} is a file; give --out a new folder for the run")
    if path.is_dir() and any(path.iterdir()):
        raise OutputPathError(
            f"{path} is not empty; give --out a new (or empty) folder: a run never overwrites files"
        )
    return path


class JsonLines:
    """Append-only JSON lines, each flushed and fsync-ed as it is written.

    Args:
        path: the ``.jsonl`` file; it and its folder are created at the first write.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (NaN and infinities are written as null)."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file (idempotent); a later write reopens it."""
        if self._file is not None:
            self._file.close()
            self._file = None


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """The rows of a JSON-lines file; a missing file has none, and a cut last line is skipped.

    An archived run may keep ``NAME.jsonl.gz`` instead of ``NAME.jsonl``: it is read the same.

    Raises:
        json.JSONDecodeError: a damaged line before the last.
    """
    path = Path(path)
    packed = path.with_name(path.name + ".gz")
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
    elif packed.is_file():
        lines = gzip.decompress(packed.read_bytes()).decode("utf-8").splitlines()
    else:
        return
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if k == len(lines) - 1:
                return  # a line being written (or cut by a crash)
            raise


class RunFolder:
    """The files of one run (see the module docstring).

    Args:
        path: the run folder (check it with :func:`check_run_folder` before a new run).

    Attributes:
        lens: ``lens.jsonl``, one reading per step, layer and matrix.
        log: ``log.jsonl``, the logged scalars.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lens = JsonLines(self.path / LENS_FILE)
        self.log = JsonLines(self.path / LOG_FILE)

    def write_settings(self, settings: dict[str, Any]) -> None:
        """Write ``run.json`` atomically."""
        atomic_write_text(self.path / RUN_FILE, dumps(settings, indent=1, ensure_ascii=True) + "\n")

    def settings(self) -> dict[str, Any]:
        """``run.json`` (empty if missing)."""
        f = self.path / RUN_FILE
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}

    def close(self) -> None:
        """Close both JSON-lines files (idempotent)."""
        self.lens.close()
        self.log.close()
