"""Mean ± std per method over records, from ``results.jsonl``, as a table (markdown and CSV).

Fractions and entropies are multiplied by 100 as in the papers' tables; std is the population std
over records (numpy's default, as MEMIT's ``summarize.py``). The unedited baseline is the first
row. Column names say which definition they use: ``acc`` (the Backward Lens paper's argmax
accuracy) or ``score`` (ROME's P(new) > P(true)).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from backward_lens.errors import DataError
from backward_lens.io import atomic_write_text

METRICS: tuple[tuple[str, str, float], ...] = (
    ("efficacy_acc", "Efficacy acc ↑", 100.0),
    ("paraphrase_acc", "Paraphrase acc ↑", 100.0),
    ("neighborhood_acc", "Neighborhood acc ↑", 100.0),
    ("efficacy_score", "Efficacy score ↑", 100.0),
    ("paraphrase_score", "Paraphrase score ↑", 100.0),
    ("neighborhood_score", "Neighborhood score ↑", 100.0),
    ("efficacy_magnitude", "Efficacy magnitude ↑", 100.0),
    ("paraphrase_magnitude", "Paraphrase magnitude ↑", 100.0),
    ("neighborhood_magnitude", "Neighborhood magnitude ↑", 100.0),
    ("fluency", "N-gram entropy ↑", 100.0),
    ("perplexity", "Perplexity ↓", 1.0),
    ("time_edit", "Time per edit (s) ↓", 1.0),
)
"""(key in a result line, column title, scale)."""


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``results.jsonl``: one dict per (method, record) line.

    ``path`` is the file or its run folder; a folder's shard files ``results.shard-K-of-N.jsonl``
    are merged in (see ``harness.read_run``). A torn last line (a run killed mid-write) is left out;
    a damaged line anywhere else is an error, never silently dropped.

    Raises:
        DataError: no results file, or a damaged line before the last.
    """
    path = Path(path)
    if path.is_dir():  # a run folder: results.jsonl and every shard's file, merged
        from backward_lens.evaluation.harness import read_run

        return read_run(path)
    if not path.is_file():
        raise DataError(f"no results file at {path}; run 'backward-lens evaluate' first")
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # a torn last line of an interrupted run
            raise DataError(
                f"{path}: line {number} is damaged (not JSON); repair or remove that line"
            ) from None
    return rows


def summarize(rows: Iterable[dict[str, Any]], baseline: str = "unedited") -> pd.DataFrame:
    """One row per method label: counts, then ``<metric> mean/std/n`` for each metric."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(str(row["label"]), []).append(row)
    order = sorted(by_label, key=lambda k: (k != baseline, list(by_label).index(k)))
    table = []
    for label in order:
        group = by_label[label]
        ok = [r for r in group if r.get("status") == "ok"]
        entry: dict[str, Any] = {
            "method": label,
            "records": len(ok),
            "skipped": sum(r.get("status") == "skipped" for r in group),
            "errors": sum(r.get("status") == "error" for r in group),
        }
        for key, title, scale in METRICS:
            values = [
                (r["time_edit"] if key == "time_edit" else r.get("metrics", {}).get(key))
                for r in ok
            ]
            series = pd.Series([v for v in values if v is not None], dtype="float64") * scale
            entry[f"{title} mean"] = series.mean() if len(series) else None
            entry[f"{title} std"] = series.std(ddof=0) if len(series) else None
            entry[f"{title} n"] = len(series)
        table.append(entry)
    return pd.DataFrame(table).set_index("method")


def to_markdown(df: pd.DataFrame, digits: int = 2) -> str:
    """A markdown table of :func:`summarize`'s frame, with ``mean ± std`` cells.

    A metric measured on fewer records than the row's total shows its count as ``(n=…)``.
    """
    titles = [t for _, t, _ in METRICS if df[f"{t} n"].sum() > 0]
    head = ["method", "N", *titles]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in df.iterrows():
        cells = [str(label), str(int(row["records"]))]
        for t in titles:
            n = int(row[f"{t} n"])
            if n == 0:
                cells.append("—")
                continue
            cell = f"{_num(row[f'{t} mean'], digits)} ± {_num(row[f'{t} std'], digits)}"
            if n != int(row["records"]):
                cell += f" (n={n})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    skipped = {str(k): int(v) for k, v in df["skipped"].items() if v}
    note = f"\nSkipped records: {skipped}.\n" if skipped else ""
    return "\n".join(lines) + "\n" + note


def _num(value: float, digits: int) -> str:
    """Fixed point, or 3 significant digits for huge values (a broken model's perplexity)."""
    return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.3g}"


def summary_texts(df: pd.DataFrame) -> dict[str, str]:
    """The summary files' names and texts: ``summary.md`` (:func:`to_markdown`), ``summary.csv``.

    Args:
        df: :func:`summarize`'s frame.

    Returns:
        File name -> text.
    """
    return {"summary.md": to_markdown(df), "summary.csv": df.to_csv()}


def write_summary(out_dir: str | Path) -> tuple[Path, Path, pd.DataFrame]:
    """Write ``summary.md`` and ``summary.csv`` beside ``results.jsonl`` (atomically)."""
    out = Path(out_dir)
    df = summarize(read_results(out))
    texts = summary_texts(df)
    md, csv = out / "summary.md", out / "summary.csv"
    atomic_write_text(md, texts[md.name])
    atomic_write_text(csv, texts[csv.name])
    return md, csv, df
