"""One place that checks user-given values: hyper-parameters, counts, layers, devices, paths.

The CLI, the Python API (``get_editor``, the evaluation harness, ``run_study``) and the viewer's
request parsing all call these functions, so a value refused in one place is refused everywhere,
with the same one-line message. Every check raises :class:`~backward_lens.errors.InputError` (or
a subclass), never a bare ``ValueError``; nothing here loads a model or computes anything.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from backward_lens.errors import InputError, OutputPathError

MAX_ETA = 1000.0
"""Largest forward pass shift step accepted anywhere (defaults are 0.2-0.4; the adaptive search
caps at 8x). Beyond it float32 weights overflow to inf long before 1e39."""

MAX_LR = 1000.0
"""Largest learning rate accepted (Adam in the editors, SGD in ``study imprint-shift``)."""


def number(
    name: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = True,
) -> float:
    """``value`` as a finite float in the range (lo, hi] (``lo_open=False``: [lo, hi]).

    Strings that read as numbers are accepted (``"0.5"``); booleans, NaN and infinities are not.

    Raises:
        InputError: naming ``name``, the value and the accepted range.
    """
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InputError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    low_ok = lo is None or (value > lo if lo_open else value >= lo)
    if not low_ok or (hi is not None and value > hi):
        raise InputError(f"{name} must be {_range(lo, hi, lo_open)}, got {value:g}")
    return value


def _range(lo: float | None, hi: float | None, lo_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"above {lo:g} and at most {hi:g}" if lo_open else f"from {lo:g} to {hi:g}"
    if lo is not None:
        return f"above {lo:g}" if lo_open else f"{lo:g} or more"
    return f"at most {hi:g}"


def integer(name: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in [lo, hi] (strings of digits accepted; floats and booleans not).

    Raises:
        InputError: naming ``name``, the value and the accepted range.
    """
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = (
            f"from {lo} to {hi}"
            if lo is not None and hi is not None
            else f"{lo} or more"
            if lo is not None
            else f"at most {hi}"
        )
        raise InputError(f"{name} must be an integer {span}, got {value}")
    return value


def layer(name: str, value: Any, n_layers: int | None = None) -> int:
    """A block index (negative counts from the end); range-checked when ``n_layers`` is known.

    Returns the index as given (not wrapped), so messages and saved hyper-parameters keep it.

    Raises:
        InputError: not an integer, or outside ``-n_layers .. n_layers-1``.
    """
    index = integer(name, value)
    if n_layers is not None and not -n_layers <= index < n_layers:
        raise InputError(
            f"{name} {index} is out of range; the model has {n_layers} layers "
            f"(0..{n_layers - 1}, or -1 for the last)"
        )
    return index


def layers(name: str, values: Any, n_layers: int | None = None) -> list[int]:
    """A non-empty list of block indices, each checked with :func:`layer`."""
    if isinstance(values, bool) or not isinstance(values, (list, tuple)) or not values:
        raise InputError(f"{name} must be a non-empty list of layer indices, got {values!r}")
    return [layer(name, v, n_layers) for v in values]


def eta(name: str, value: Any, hi: float = MAX_ETA) -> float:
    """A forward pass shift step size: finite, in (0, ``hi``]."""
    return number(name, value, lo=0.0, hi=hi)


# name -> check(name, value, n_layers) for every hyper-parameter the built-in editors take.
# Unknown names are left to the editor factory, which lists what the method takes.
def _positive(hi: float | None = None) -> Any:
    return lambda n, v, _: number(n, v, lo=0.0, hi=hi)


def _nonnegative(n: str, v: Any, _: int | None) -> float:
    return number(n, v, lo=0.0, lo_open=False)


def _count(n: str, v: Any, _: int | None) -> int:
    return integer(n, v, lo=1)


def _optional(check: Any) -> Any:
    return lambda n, v, nl: None if v is None else check(n, v, nl)


def _context(n: str, v: Any, _: int | None) -> Any:
    ok = isinstance(v, (list, tuple)) and all(
        isinstance(p, (list, tuple))
        and len(p) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in p)
        and p[0] >= 1
        and p[1] >= 0
        for p in v
    )
    if not ok:
        raise InputError(f"{n} must be a list of [length, count] pairs such as [[5,10]], got {v!r}")
    return v


def _choice(*options: str) -> Any:
    def check(n: str, v: Any, _: int | None) -> str:
        if v not in options:
            raise InputError(f"{n} must be one of {', '.join(options)}, got {v!r}")
        return str(v)

    return check


HPARAM_CHECKS: dict[str, Any] = {
    "layer": _optional(lambda n, v, nl: layer(n, v, nl)),
    "layers": _optional(lambda n, v, nl: layers(n, v, nl)),
    "eta": _optional(lambda n, v, _: eta(n, v)),
    "eta_max": _optional(lambda n, v, _: eta(n, v)),
    "rtol": lambda n, v, _: number(n, v, lo=0.0, hi=0.999999),
    "margin": _nonnegative,
    "max_runs": _count,
    "lr": _positive(MAX_LR),
    "v_lr": _positive(MAX_LR),
    "steps": _count,
    "v_steps": _count,
    "weight_decay": _nonnegative,
    "v_weight_decay": _nonnegative,
    "clamp_norm_factor": _positive(),
    "kl_factor": _nonnegative,
    "norm_constraint": _optional(_positive()),
    "early_stop_loss": _nonnegative,
    "mom2_update_weight": _nonnegative,
    "stats_samples": _count,
    "stats_length": _count,
    "seed": lambda n, v, _: integer(n, v),
    "context": _context,
    "on_failure": _choice("refuse", "cap"),
}


def hparams(method: str, values: Mapping[str, Any], n_layers: int | None = None) -> None:
    """Check every known hyper-parameter value of ``method`` (names are the editors' business).

    Args:
        method: the editor's name (used in messages only).
        values: hyper-parameters as given (CLI ``--hparam``, ``NAME:key=value``, API kwargs).
        n_layers: the model's depth, to range-check ``layer``/``layers`` (None: not yet known).

    Raises:
        InputError: ``"<method>: eta must be a finite number, got nan"`` and the like.
    """
    for key, value in values.items():
        check = HPARAM_CHECKS.get(key)
        if check is None:
            continue
        try:
            check(key, value, n_layers)
        except InputError as exc:
            raise InputError(f"{method}: {exc}") from None


def nonblank_texts(name: str, texts: Iterable[str]) -> list[str]:
    """Prompts the user listed explicitly: none may be empty or white space only."""
    out = list(texts)
    for t in out:
        if not t or not t.strip():
            raise InputError(f"an empty {name} was given; remove it or write the prompt")
    return out


def device(text: str | None) -> str | None:
    """A ``--device`` value that exists on this machine (``cpu``, ``cuda``, ``cuda:1``, ``mps``).

    Raises:
        InputError: unknown device name, or a CUDA/MPS device this machine does not have.
    """
    if text is None:
        return None
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown --device {text!r}; use cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"--device {text}: this machine has no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise InputError(
                f"--device {text}: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {text}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {text}: unsupported device type; use cpu, cuda or mps")
    return text


# -- output paths ------------------------------------------------------------------------------


def _writable_folder(folder: Path, what: str) -> None:
    """The nearest existing ancestor of ``folder`` must be a folder we can create files in."""
    probe = folder
    while not probe.exists():
        if probe.is_symlink():  # a dangling link
            raise OutputPathError(f"{what}: {probe} is a broken link; remove it or choose another")
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if not probe.is_dir():
        raise OutputPathError(f"{what}: {probe} is a file, not a folder; choose a path outside it")
    try:  # os.access is no use for root or read-only mounts: try it
        fd, name = tempfile.mkstemp(prefix=".backward-lens-probe-", dir=probe)
    except OSError as exc:
        raise OutputPathError(
            f"{what}: cannot write in {probe} ({exc.strerror or exc}); choose a writable place"
        ) from None
    os.close(fd)
    os.unlink(name)


def output_file(path: str | Path, what: str) -> Path:
    """A file we may (over)write: not a folder, its folder creatable and writable.

    Args:
        path: the file the user named.
        what: the option, for messages (``"--json"``).

    Raises:
        OutputPathError: the path is a folder, or lies under a file, or cannot be written.
    """
    p = Path(path)
    if str(path).strip() == "":
        raise OutputPathError(f"{what}: empty path; give a file name")
    if p.is_dir():
        raise OutputPathError(f"{what}: {p} is a folder; give a file name such as {p / 'out'}")
    if p.exists() and not p.is_file():
        raise OutputPathError(f"{what}: {p} is not a regular file")
    _writable_folder(p.parent, what)
    return p


def output_files(paths: Mapping[str, str | Path | None]) -> dict[str, Path]:
    """Check several output files at once (option -> path; None skipped); they must differ."""
    out = {what: output_file(p, what) for what, p in paths.items() if p is not None}
    seen: dict[Path, str] = {}
    for what, p in out.items():
        key = p.resolve()
        if key in seen:
            raise OutputPathError(f"{seen[key]} and {what} name the same file {p}; give two files")
        seen[key] = what
    return out


def output_folder(path: str | Path, what: str) -> Path:
    """A folder we may create or add to: not a file, under no file, writable.

    Raises:
        OutputPathError: the path is a file, lies under a file, or cannot be written.
    """
    p = Path(path)
    if str(path).strip() == "":
        raise OutputPathError(f"{what}: empty path; give a folder name")
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{what}: {p} is a file, not a folder; choose another {what}")
    _writable_folder(p, what)
    return p


def not_current_folder(path: str | Path, what: str) -> Path:
    """Refuse the current folder (or one of its parents) as something to be replaced."""
    p = Path(path)
    cwd = Path.cwd().resolve()
    target = p.resolve()
    if target == cwd or target in cwd.parents:
        raise OutputPathError(
            f"{what}: {path} is the current folder (or holds it); give a new folder's name"
        )
    return p


def strings(name: str, values: Sequence[Any]) -> list[str]:
    """Each value must be a string (data fields, request lists)."""
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise InputError(f"{name} must be text, got {bad[0]!r}")
    return list(values)
