"""Atomic file writes: a reader never sees a half-written file, a crash never leaves one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


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
