"""The one timing rule every benchmark here uses: median wall time after optional warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

COUNTERFACT_EDIT = str(
    Path(__file__).resolve().parents[1].parent
    / "shared/data/counterfact/easyedit_format/counterfact-edit.json"
)
"""Default data of the editing benchmarks: the project's shared CounterFact copy beside the
repository (pass ``--data`` to use another)."""


def median_time(fn: Callable[[], object], repeat: int, warmup: int = 0) -> float:
    """Median wall time of ``fn`` (seconds) over ``repeat`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
