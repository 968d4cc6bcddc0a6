"""One summary table on the same records, built from several evaluation runs.

Runs of different methods are often made at different times, in different folders and over
different numbers of records. :func:`combine_runs` reads several run folders (shard files
merged, as :func:`~backward_lens.evaluation.summary.read_results` does) and returns the rows of a
table in which every method label is measured on exactly the same records:

1. Every run's ``run.json`` must name the same model, dtype, data file and measuring settings
   (the shard count may differ; a ``run.json`` written before the dtype was recorded is not
   compared on it); otherwise the runs measured different things and are refused.
2. With ``records=N`` only the lines of the first N records (``index < N``) are kept.
3. A label taken from several runs must be the same measurement: the same resolved
   hyper-parameters (``hparams`` of its lines), and on the record keys both runs have, the same
   status and metrics (floats to :data:`REL_TOL` / :data:`ABS_TOL`: batching changes float
   rounding only, e.g. in the last group of a run cut at ``--records N``). The
   unedited baseline, present in every run, is checked this way and kept once. Records only one
   of the runs has are merged in (a long run split over folders).
4. Every label is restricted to the record keys *every* label has (a line counts as present
   whatever its status, so ``skipped`` and ``error`` lines stay and the summary counts them).

:class:`CombineReport` says how many records that is and, per label, how many lines were dropped
because another label lacked their record. :func:`write_combined` writes ``summary.md``,
``summary.csv`` (the usual :func:`~backward_lens.evaluation.summary.summarize` table) and
``combined.json`` into a folder that holds no run of its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backward_lens import checks
from backward_lens.errors import DataError, InputError, OutputPathError
from backward_lens.evaluation.plan import (
    distinct_hparams,
    hparams_diff,
    record_position,
    results_folder,
    row_key,
)
from backward_lens.evaluation.summary import read_results, summarize, summary_texts
from backward_lens.io import atomic_write_many, dumps
from backward_lens.runfolder import RECORDED_LATER

COMBINED = "combined.json"
"""The file :func:`write_combined` writes beside the summary: sources, record count, drops."""

COMPARED = ("model", "dtype", "data", "settings")
"""The ``run.json`` keys that must be equal in every combined run."""

REL_TOL = 1e-5
"""Relative tolerance when a label's metrics from two runs are compared."""

ABS_TOL = 1e-5
"""Absolute tolerance for the same comparison (probabilities and their differences).

A run's group ``g`` is records ``[g*G, (g+1)*G)`` cut at its ``--records N``, so a run of 300
records scores records 288–299 in a batch of 12 and a run of 1000 in a batch of 16; another
batch shape changes the float32 reduction order of every layer. On SmolLM2-135M (30 layers) the
unedited lines of those 12 records differed by up to 7.4e-7 in a magnitude (a difference of two
probabilities), by 0 in every accuracy and score. 1e-5 leaves margin for deeper models while
a different measurement (other settings, hyper-parameters or weights) moves these metrics by
far more; half-precision runs have larger batching noise and are best combined from one run.
"""

Source = tuple[str | Path, Sequence[str] | None]
"""A run folder and the labels to take from it (None: every label)."""


@dataclass
class CombineReport:
    """What :func:`combine_runs` took and dropped.

    Attributes:
        sources: (run folder, the labels taken from it), in the order given.
        records: how many records every label has (the table's N for labels without errors).
        records_limit: the ``records`` argument (only positions below it were read), or None.
        dropped: per label, its lines dropped because another label lacked their record.
        checked: per label taken from several runs, those runs (their common lines agreed).
        config: the ``run.json`` keys the runs share (model, dtype, data file, settings).
    """

    sources: list[tuple[str, list[str]]]
    records: int
    records_limit: int | None
    dropped: dict[str, int]
    checked: dict[str, list[str]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The report as ``combined.json`` holds it."""
        return {
            "sources": [{"run": run, "labels": labels} for run, labels in self.sources],
            "records": self.records,
            "records_limit": self.records_limit,
            "dropped": self.dropped,
            "checked_equal": self.checked,
            **self.config,
        }

    def note(self) -> str:
        """A markdown paragraph saying where the table's rows come from."""
        runs = "; ".join(f"`{run}` ({', '.join(labels)})" for run, labels in self.sources)
        dropped = {k: v for k, v in self.dropped.items() if v}
        lines = [
            f"Combined from {runs}, on the {self.records} records every method has"
            + (f" (of the first {self.records_limit})" if self.records_limit else "")
            + "."
        ]
        if self.checked:
            lines.append(
                "Equal in every run that has it, kept once: "
                + ", ".join(f"{label} ({len(runs_)} runs)" for label, runs_ in self.checked.items())
                + "."
            )
        if dropped:
            lines.append(f"Lines dropped because another method lacked their record: {dropped}.")
        return "\n" + " ".join(lines) + "\n"


def combine_runs(
    sources: Sequence[Source], records: int | None = None
) -> tuple[list[dict[str, Any]], CombineReport]:
    """The result lines of several runs, restricted to the records every label has.

    Args:
        sources: (run folder, labels to take or None for all), in table order.
        records: keep only the first N records (lines with ``index < records``); None: all.

    Returns:
        The lines (each label's, in record order, ready for
        :func:`~backward_lens.evaluation.summary.summarize`) and the report.

    Raises:
        InputError: no source, a run given twice, a label a run does not have, ``records < 1``.
        DataError: a run without ``run.json`` or results, runs of another model, data file or
            settings, a label whose lines differ between two runs, a line without a record
            position when ``records`` is given, or no record common to every label.
    """
    if not sources:
        raise InputError("give at least one run folder to combine")
    if records is not None and records < 1:
        raise InputError(f"records must be 1 or more, got {records}")
    seen: set[Path] = set()
    config: dict[str, Any] | None = None
    first = ""
    taken: list[tuple[str, list[str]]] = []
    by_label: dict[str, dict[str, dict[str, Any]]] = {}
    origin: dict[str, list[str]] = {}
    for folder, wanted in sources:
        path = Path(folder)
        if path.resolve() in seen:
            raise InputError(f"{path} is given twice; give each run once")
        seen.add(path.resolve())
        meta = _config(path)
        if config is None:
            config, first = meta, str(path)
        else:
            _same_run(config, first, meta, str(path))
            config |= {k: meta[k] for k in RECORDED_LATER if config[k] is None}
        rows = _limited(read_results(path), records, path)
        labels = _labels(rows, wanted, path)
        taken.append((str(path), labels))
        for label in labels:
            lines: dict[str, dict[str, Any]] = {}
            for row in rows:  # a key written twice keeps its first line, as the harness does
                if str(row["label"]) == label:
                    lines.setdefault(row_key(row)[1], row)
            if label in by_label:
                _same_lines(label, by_label[label], origin[label][0], lines, str(path))
                for key, row in lines.items():
                    by_label[label].setdefault(key, row)
                origin[label].append(str(path))
            else:
                by_label[label], origin[label] = lines, [str(path)]
    common = set.intersection(*(set(lines) for lines in by_label.values()))
    if not common:
        counts = {label: len(lines) for label, lines in by_label.items()}
        raise DataError(f"no record is common to every method (lines per method: {counts})")
    out: list[dict[str, Any]] = []
    dropped: dict[str, int] = {}
    for label, lines in by_label.items():
        kept = [row for key, row in lines.items() if key in common]
        dropped[label] = len(lines) - len(kept)
        out.extend(sorted(kept, key=record_position))
    report = CombineReport(
        sources=taken,
        records=len(common),
        records_limit=records,
        dropped=dropped,
        checked={label: runs for label, runs in origin.items() if len(runs) > 1},
        config=dict(config or {}),
    )
    return out, report


def write_combined(
    out_dir: str | Path, sources: Sequence[Source], records: int | None = None
) -> tuple[list[Path], CombineReport]:
    """Combine the runs (:func:`combine_runs`) and write the table into ``out_dir``.

    Writes ``summary.md`` (the table, then where its rows come from), ``summary.csv`` and
    ``combined.json`` (:meth:`CombineReport.to_json`) as one atomic step. ``out_dir`` must be
    new, empty, or an earlier output of this function: never a run's own folder.

    Returns:
        The files written and the report.

    Raises:
        OutputPathError: ``out_dir`` holds results, or other files without ``combined.json``.
        InputError, DataError: see :func:`combine_runs`.
    """
    out = Path(out_dir)
    check_output(out)
    rows, report = combine_runs(sources, records)
    texts = summary_texts(summarize(rows))
    texts["summary.md"] += report.note()
    texts[COMBINED] = dumps(report.to_json(), indent=2) + "\n"
    files = {out / name: text.encode("utf-8") for name, text in texts.items()}
    return atomic_write_many(files), report


def check_output(out: Path) -> None:
    """Refuse an output folder holding a run's results or files this module did not write.

    Raises:
        OutputPathError: one line saying why (also a file, or a folder that cannot be written).
    """
    checks.output_folder(out, "--out")  # not a file, under no file, writable
    if not out.is_dir():
        return
    if results_folder(out).shard_files():
        raise OutputPathError(
            f"--out: {out} holds a run's results; write the combined table to another folder"
        )
    if any(out.iterdir()) and not (out / COMBINED).is_file():
        raise OutputPathError(
            f"--out: {out} holds other files; give a new or empty folder (or an earlier "
            "combined table's)"
        )


def _config(path: Path) -> dict[str, Any]:
    """The compared part of a run's ``run.json``.

    Raises:
        DataError: no folder, no ``run.json`` or a damaged one.
    """
    if not path.is_dir():
        raise DataError(f"{path} is not a run folder (no such folder)")
    stored = results_folder(path).read_config()
    if stored is None:
        raise DataError(
            f"{path} has no run.json, so what it measured is unknown; only runs of "
            "'backward-lens evaluate' can be combined"
        )
    return {key: stored.get(key) for key in COMPARED}


def _same_run(a: Mapping[str, Any], a_path: str, b: Mapping[str, Any], b_path: str) -> None:
    """Refuse two runs of another model, dtype, data file or measuring settings.

    A key of :data:`~backward_lens.runfolder.RECORDED_LATER` that one run does not record is not
    compared.

    Raises:
        DataError: one line naming the first difference.
    """
    for key in COMPARED:
        if a.get(key) == b.get(key):
            continue
        if key in RECORDED_LATER and (a.get(key) is None or b.get(key) is None):
            continue
        what, was, now = key, a.get(key), b.get(key)
        if isinstance(was, dict) and isinstance(now, dict):
            sub = next(k for k in [*was, *now] if was.get(k) != now.get(k))
            what, was, now = f"settings.{sub}", was.get(sub), now.get(sub)
        raise DataError(
            f"{a_path} and {b_path} are runs of different {what} ({was!r} and {now!r}); "
            "combine only runs of one model, dtype, data file and settings"
        )


def _limited(rows: list[dict[str, Any]], records: int | None, path: Path) -> list[dict[str, Any]]:
    """The lines of the first ``records`` records (all lines when None).

    Raises:
        DataError: a line without a record position.
    """
    if records is None:
        return rows
    for row in rows:
        if not isinstance(row.get("index"), int):
            raise DataError(
                f"{path}: a line of {row.get('label')!r} has no record position ('index'), so "
                "--records cannot select the first records; leave --records out"
            )
    return [row for row in rows if row["index"] < records]


def _labels(rows: list[dict[str, Any]], wanted: Sequence[str] | None, path: Path) -> list[str]:
    """The labels to take from a run: ``wanted``, each checked to be there, or all of them.

    Raises:
        InputError: a wanted label the run does not have (or a label asked for twice).
    """
    present = list(dict.fromkeys(str(r["label"]) for r in rows))
    if wanted is None:
        return present
    labels = list(wanted)
    if len(set(labels)) != len(labels):
        raise InputError(f"a label is asked twice from {path}: {labels}")
    for label in labels:
        if label not in present:
            raise InputError(f"{path} has no lines of {label!r}; it has: {', '.join(present)}")
    return labels


def _same_lines(
    label: str,
    a: Mapping[str, dict[str, Any]],
    a_path: str,
    b: Mapping[str, dict[str, Any]],
    b_path: str,
) -> None:
    """Refuse a label run with other hyper-parameters, or whose lines differ, in two runs.

    The hyper-parameters are compared even when the runs share no record (a label's name does
    not pin its defaults: ``ft-late`` is layer 22 in one run and 21 in a later one).

    Raises:
        DataError: one line naming the label, the two folders (and the first differing record).
    """
    hp_a, hp_b = distinct_hparams(a.values()), distinct_hparams(b.values())
    if hp_a and hp_b and hp_a != hp_b:
        raise DataError(
            f"{label!r} was run with other hyper-parameters in {a_path} and {b_path} "
            f"({hparams_diff(hp_a, hp_b)}); select that label from one of the runs only"
        )
    for key in (k for k in a if k in b):  # in record order: the first differing record
        x, y = a[key], b[key]
        if x.get("status") != y.get("status") or not _equal(x.get("metrics"), y.get("metrics")):
            raise DataError(
                f"{label!r} differs between {a_path} and {b_path} (record {key}): they are "
                "different measurements; select that label from one of the runs only"
            )


def _equal(a: Any, b: Any) -> bool:
    """Metric values equal (floats to :data:`REL_TOL` or :data:`ABS_TOL`, NaN equal to NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if _number(a) and _number(b):
        both_nan = math.isnan(a) and math.isnan(b)
        return both_nan or math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    return bool(a == b)


def _number(value: Any) -> bool:
    """An int or float metric value (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
