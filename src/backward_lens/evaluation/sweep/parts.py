"""A shift sweep split over processes: each shard's part, and the parts merged into the table.

Split over processes (``--shard K/N``), shard K computes the grid points ``p mod N == K`` (each
point is independent of the others) and writes ``sweep.shard-K-of-N.json``
(:func:`write_part`); :func:`merge_parts` joins the parts into the same table an unsplit sweep
gives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from backward_lens.distributed.shards import Shard, layout_problem, shard_files
from backward_lens.errors import DataError, InputError
from backward_lens.evaluation.sweep.point import POINT_COLUMNS
from backward_lens.io import atomic_write_text

PART = "sweep.json"
"""Base name of a shard's part: ``sweep.shard-K-of-N.json`` (settings and its grid points)."""


def write_part(out: Path, shard: Shard, settings: dict[str, Any], df: pd.DataFrame) -> Path:
    """Write one shard's grid points (atomically) with the settings they were computed with.

    Raises:
        InputError: the folder holds parts of another split or with other settings.
    """
    check_parts(out, shard, settings)
    rows = [
        {"point": int(i), **row} for i, row in zip(df.index, df.to_dict("records"), strict=True)
    ]
    body = {"shard": str(shard), "settings": settings, "points": rows}
    return atomic_write_text(out / shard.file_name(PART), json.dumps(body, indent=1) + "\n")


def _read_part(path: Path) -> dict[str, Any]:
    try:
        part = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(part, dict) or "points" not in part or "settings" not in part:
            raise ValueError
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{path} is damaged; run that shard again") from None
    return part


def check_parts(out: Path, shard: Shard, settings: dict[str, Any]) -> None:
    """Refuse to add a part to a folder holding parts of another split or other settings.

    Raises:
        InputError: a different N, or different settings (model, data, records, grid).
    """
    files = shard_files(out, PART)
    problem = layout_problem(files, shard, out)
    if problem:
        raise InputError(problem)
    for other, path in files:
        if other == shard:
            continue
        old = _read_part(path)["settings"]
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise InputError(
                f"{path.name} in {out} was computed with different {', '.join(diff)} "
                f"({old.get(diff[0])!r}); run every shard with the same settings or use "
                "another --out"
            )


def merge_parts(out: Path) -> tuple[pd.DataFrame | None, dict[str, Any], list[int], int]:
    """The shards' parts in ``out`` merged into the full table (grid order), when all are there.

    Returns:
        (the table, or None while a part is missing; the settings; the shards present; N).

    Raises:
        DataError: no part in ``out``, or a damaged one.
        InputError: parts of different splits or settings.
    """
    files = [(s, p) for s, p in shard_files(out, PART) if s.sharded]
    if not files:
        raise DataError(f"no sweep part (sweep.shard-K-of-N.json) in {out}; run the shards first")
    counts = {s.count for s, _ in files}
    if len(counts) > 1:
        raise InputError(
            f"{out} holds sweep parts of splits into {sorted(counts)} shards; keep one split "
            "(move the others aside) and try again"
        )
    count = counts.pop()
    parts = [(s, _read_part(p)) for s, p in files]
    settings = parts[0][1]["settings"]
    for s, part in parts[1:]:
        if part["settings"] != settings:
            raise InputError(
                f"sweep part {s} in {out} was computed with other settings than part "
                f"{parts[0][0]}; run every shard with the same settings"
            )
    present = [s.index for s, _ in parts]
    if len(present) < count:
        return None, settings, present, count
    rows = sorted((r for _, part in parts for r in part["points"]), key=lambda r: r["point"])
    index = [r.pop("point") for r in rows]
    return pd.DataFrame(rows, index=index, columns=list(POINT_COLUMNS)), settings, present, count
