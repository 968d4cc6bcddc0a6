"""The committed CounterFact tables are what the committed, gzipped evaluation runs give.

``docs/results/table-*`` were written by ``evaluate --summary-only --from runs/... ``
(``combined.json`` names the runs and labels); the runs themselves are committed, gzipped, in
``docs/results/evaluation-*``. Rebuilding each table from those files must give its
``summary.csv``, so a table cannot drift from the lines it claims to summarise.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from backward_lens.evaluation.combine import combine_runs
from backward_lens.evaluation.summary import summarize

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"

RUNS = {
    # the run folder a table names -> where its gzipped shards are committed
    "runs/table-gemma3": "evaluation-gemma3-baselines",
    "runs/table-gemma3-shift040": "evaluation-gemma3-shift040",
    "runs/table-gemma3-memit-l15000": "evaluation-gemma3-memit-l15000",
    "runs/table-smollm2-300": "evaluation-smollm2-baselines",
    "runs/evaluation-smollm2-new-defaults": "evaluation-smollm2-new-defaults",
    "runs/evaluation-smollm2": "evaluation-smollm2",
    "runs/table-smollm2-rome3": "evaluation-smollm2-rome3",
    "runs/table-smollm2-memit15": "evaluation-smollm2-memit15",
    "runs/table-smollm2-memit15-l5000": "evaluation-smollm2-memit15-l5000",
}


def _unpack(name: str, into: Path) -> Path:
    """The committed run ``name`` as a run folder under ``into`` (its results files gunzipped)."""
    src, dst = RESULTS / RUNS[name], into / Path(name).name
    dst.mkdir(parents=True)
    shutil.copy(src / "run.json", dst / "run.json")
    for gz in sorted(src.glob("results*.jsonl.gz")):  # one file, or one per shard
        (dst / gz.name[: -len(".gz")]).write_bytes(gzip.decompress(gz.read_bytes()))
    return dst


TABLES = sorted(p.name for p in RESULTS.glob("table-*") if (p / "combined.json").is_file())


def test_the_tables_are_found() -> None:
    """The glob below sees the committed tables (an empty parametrisation would test nothing)."""
    names = ("same-records", "current-defaults")
    assert {f"table-{m}-{n}" for m in ("gemma3", "smollm2") for n in names} <= set(TABLES)


@pytest.mark.parametrize("table", TABLES)
def test_committed_table_is_what_its_runs_give(table: str, tmp_path: Path) -> None:
    """Each table's summary equals the summary rebuilt from the committed shard files."""
    combined = json.loads((RESULTS / table / "combined.json").read_text())
    sources = [(_unpack(s["run"], tmp_path), s["labels"]) for s in combined["sources"]]
    rows, report = combine_runs(sources, records=combined["records_limit"])
    assert report.records == combined["records"]
    got = summarize(rows).reset_index()
    want = pd.read_csv(RESULTS / table / "summary.csv")
    assert list(got["method"]) == list(want["method"])
    pd.testing.assert_frame_equal(
        got[want.columns].reset_index(drop=True), want, check_dtype=False, rtol=1e-9
    )
