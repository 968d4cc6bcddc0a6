"""One table on the same records from several evaluation runs (``evaluation.combine``).

Run folders are written by hand (``run.json`` and result lines, no model), so every number in the
table can be checked by hand; one test combines the committed SmolLM2 runs.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from backward_lens.cli import main
from backward_lens.errors import DataError, InputError, OutputPathError
from backward_lens.evaluation import read_results, summarize
from backward_lens.evaluation.combine import combine_runs, write_combined
from tests.paths import REPO

SETTINGS = {
    "fluency_records": 2,
    "ppl_records": 2,
    "generation_length": 100,
    "top_k": 5,
    "ppl_max_tokens": 256,
    "seed": 0,
}
MEAN = "Efficacy acc ↑ mean"


def _line(label: str, index: int, acc: float, status: str = "ok") -> dict[str, Any]:
    """A result line of record ``index`` (key = its position) with one metric."""
    return {
        "key": str(index),
        "label": label,
        "method": label.split(":")[0],
        "case_id": index,
        "index": index,
        "status": status,
        "metrics": {"efficacy_acc": acc} if status == "ok" else {},
        "time_edit": None if label == "unedited" else 1.0,
        "schema_version": 1,
    }


def _run(
    folder: Path,
    lines: list[dict[str, Any]],
    *,
    model: str = "tiny",
    shards: int = 1,
    dtype: str | None = "float32",
    **settings: Any,
) -> Path:
    """Write a run folder: ``run.json`` (no dtype when None) and the lines (over shard files)."""
    folder.mkdir(parents=True)
    meta: dict[str, Any] = {"model": model, "data": "/d/cf.json", "settings": SETTINGS | settings}
    if dtype is not None:
        meta["dtype"] = dtype
    if shards > 1:
        meta["shards"] = shards
    (folder / "run.json").write_text(json.dumps(meta))
    for k in range(shards):
        name = "results.jsonl" if shards == 1 else f"results.shard-{k}-of-{shards}.jsonl"
        part = [r for r in lines if r["index"] % shards == k]
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


def _unedited(n: int) -> list[dict[str, Any]]:
    return [_line("unedited", i, 0.0) for i in range(n)]


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    """Run a: unedited and A on records 0-3; run b (2 shards): unedited and B on records 0-1."""
    a = _run(tmp_path / "a", _unedited(4) + [_line("A", i, v) for i, v in enumerate([1, 1, 0, 0])])
    b = _run(tmp_path / "b", [*_unedited(2), _line("B", 0, 1.0), _line("B", 1, 0.0)], shards=2)
    return a, b


def test_the_table_is_on_the_records_every_method_has(two_runs: tuple[Path, Path]) -> None:
    a, b = two_runs
    rows, report = combine_runs([(a, None), (b, None)])
    df = summarize(rows)
    assert list(df.index) == ["unedited", "A", "B"]
    assert list(df["records"]) == [2, 2, 2]
    # A on records 0 and 1 only: (1 + 1) / 2 = 100 %, not (1 + 1 + 0 + 0) / 4 = 50 %
    assert df.loc["A", MEAN] == pytest.approx(100.0)
    assert df.loc["B", MEAN] == pytest.approx(50.0)
    assert report.records == 2
    assert report.dropped == {"unedited": 2, "A": 2, "B": 0}
    assert report.checked == {"unedited": [str(a), str(b)]}  # equal on 0-1, kept once
    assert sum(r["label"] == "unedited" for r in rows) == 2
    assert report.sources == [(str(a), ["unedited", "A"]), (str(b), ["unedited", "B"])]


def test_records_limit_and_label_selection(two_runs: tuple[Path, Path]) -> None:
    a, _ = two_runs
    rows, report = combine_runs([(a, ["A"])], records=3)
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert summarize(rows).loc["A", MEAN] == pytest.approx(200 / 3)  # (1 + 1 + 0) / 3
    assert report.records == 3 and report.records_limit == 3
    with pytest.raises(InputError, match="has no lines of 'C'; it has: unedited, A"):
        combine_runs([(a, ["C"])])


def test_skipped_and_error_lines_count_as_present(tmp_path: Path) -> None:
    lines = [*_unedited(3), _line("A", 0, 1.0), _line("A", 1, 0.0, "skipped")]
    lines += [_line("A", 2, 0.0, "error")]
    rows, report = combine_runs([(_run(tmp_path / "a", lines), None)])
    df = summarize(rows)
    assert report.records == 3
    assert (df.loc["A", "records"], df.loc["A", "skipped"], df.loc["A", "errors"]) == (1, 1, 1)


def test_a_label_split_over_two_runs_is_merged(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", [*_unedited(4), _line("A", 0, 1.0), _line("A", 1, 1.0)])
    b = _run(tmp_path / "b", [_line("A", 1, 1.0), _line("A", 2, 0.0), _line("A", 3, 0.0)])
    rows, report = combine_runs([(a, None), (b, None)])
    assert [r["index"] for r in rows if r["label"] == "A"] == [0, 1, 2, 3]
    assert summarize(rows).loc["A", MEAN] == pytest.approx(50.0)
    assert report.records == 4 and report.checked == {"A": [str(a), str(b)]}


def test_a_label_measured_differently_is_refused(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", [*_unedited(2), _line("A", 0, 1.0), _line("A", 1, 1.0)])
    b = _run(tmp_path / "b", [*_unedited(2), _line("A", 0, 1.0), _line("A", 1, 0.0)])
    with pytest.raises(DataError, match=rf"'A' differs between {a} and {b} \(record 1\)"):
        combine_runs([(a, None), (b, None)])
    rows, _ = combine_runs([(a, None), (b, ["unedited"])])  # the user picks one A
    assert summarize(rows).loc["A", MEAN] == pytest.approx(100.0)
    c = _run(tmp_path / "c", [_line("unedited", 0, 1.0), _line("unedited", 1, 0.0)])
    with pytest.raises(DataError, match="'unedited' differs"):
        combine_runs([(a, None), (c, None)])


def test_a_label_with_other_hparams_is_refused_without_common_records(tmp_path: Path) -> None:
    one = [_line("A", 0, 1.0) | {"hparams": {"layer": 22}}]
    two = [_line("A", 1, 1.0) | {"hparams": {"layer": 21}}]
    a, b = _run(tmp_path / "a", one), _run(tmp_path / "b", two)
    with pytest.raises(DataError, match=r"'A' was run with other .* \(layer 22 and 21\)"):
        combine_runs([(a, None), (b, None)])


def test_float_rounding_is_tolerated_but_not_more(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", [_line("A", 0, 0.3)])
    b = _run(tmp_path / "b", [_line("A", 0, 0.3 * (1 + 1e-9))])
    c = _run(tmp_path / "c", [_line("A", 0, 0.3 * (1 + 1e-4))])
    assert combine_runs([(a, None), (b, None)])[1].records == 1
    with pytest.raises(DataError, match="differs"):
        combine_runs([(a, None), (c, None)])


def _magnitude(folder: Path, value: float) -> Path:
    line = _line("unedited", 0, 0.0)
    line["metrics"]["neighborhood_magnitude"] = value
    return _run(folder, [line])


def test_batching_noise_of_a_cut_last_group_is_tolerated(tmp_path: Path) -> None:
    """Record 288 of SmolLM2's runs of 300 (a last group of 12) and of 1000 records (16)."""
    at_300 = _magnitude(tmp_path / "a", 0.09850689556571637)
    at_1000 = _magnitude(tmp_path / "b", 0.09850615196622972)  # 7.4e-7 apart: float32 rounding
    assert combine_runs([(at_300, None), (at_1000, None)])[1].records == 1
    # a probability difference near 0 has no relative scale: 2e-5 apart is another measurement
    near_zero = _magnitude(tmp_path / "c", 1e-6)
    with pytest.raises(DataError, match="'unedited' differs"):
        combine_runs([(near_zero, None), (_magnitude(tmp_path / "d", 2.1e-5), None)])


def test_runs_of_another_model_or_settings_are_refused(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", _unedited(2))
    b = _run(tmp_path / "b", _unedited(2), model="other")
    c = _run(tmp_path / "c", _unedited(2), fluency_records=50)
    d = _run(tmp_path / "d", _unedited(2), shards=2)  # the shard count may differ
    with pytest.raises(DataError, match=r"different model \('tiny' and 'other'\)"):
        combine_runs([(a, None), (b, None)])
    with pytest.raises(DataError, match=r"different settings.fluency_records \(2 and 50\)"):
        combine_runs([(a, None), (c, None)])
    assert combine_runs([(a, None), (d, None)])[1].records == 2
    half = _run(tmp_path / "half", _unedited(2), dtype="bfloat16")
    with pytest.raises(DataError, match=r"different dtype \('float32' and 'bfloat16'\)"):
        combine_runs([(a, None), (half, None)])
    # a run.json written before the dtype was recorded is not compared on it; the table has it
    old = _run(tmp_path / "old", _unedited(2), dtype=None)
    assert combine_runs([(old, None), (a, None)])[1].config["dtype"] == "float32"
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match=r"has no run\.json"):
        combine_runs([(tmp_path / "e", None)])
    with pytest.raises(InputError, match="given twice"):
        combine_runs([(a, None), (tmp_path / "x" / ".." / "a", None)])


def test_no_common_record_is_an_error(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", [_line("A", 0, 1.0)])
    b = _run(tmp_path / "b", [_line("B", 1, 1.0)])
    with pytest.raises(DataError, match="no record is common"):
        combine_runs([(a, None), (b, None)])


def test_write_combined_never_writes_into_a_run(
    two_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = two_runs
    before = {p.name: p.read_bytes() for p in a.iterdir()}
    with pytest.raises(OutputPathError, match="holds a run's results"):
        write_combined(a, [(a, None), (b, None)])
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="holds other files"):
        write_combined(other, [(a, None)])
    out = tmp_path / "out"
    write_combined(out, [(a, None), (b, None)])
    files, _ = write_combined(out, [(a, None)])  # an earlier combined table is rewritten
    assert sorted(p.name for p in files) == ["combined.json", "summary.csv", "summary.md"]
    assert json.loads((out / "combined.json").read_text())["records"] == 4


def test_cli_combines_runs(
    two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = two_runs
    out = tmp_path / "table"
    argv = ["evaluate", "--summary-only", "--out", str(out), "--quiet"]
    assert main([*argv, "--from", str(a), "--from", str(b), "--label", "B"]) == 0
    md = (out / "summary.md").read_text()
    assert "| A | 2 | 100.00 ± 0.00 |" in md and "| B | 2 | 50.00 ± 50.00 |" in md
    assert "on the 2 records every method has" in md
    combined = json.loads((out / "combined.json").read_text())
    assert combined["sources"] == [
        {"run": str(a), "labels": ["unedited", "A"]},
        {"run": str(b), "labels": ["B"]},
    ]
    assert combined["records"] == 2 and combined["dropped"] == {"unedited": 2, "A": 2, "B": 0}
    assert combined["model"] == "tiny" and combined["settings"] == SETTINGS
    csv = (out / "summary.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in csv] == ["method", "unedited", "A", "B"]
    # --records: the first record only
    assert main([*argv, "--from", str(a), "--records", "1"]) == 0
    assert json.loads((out / "combined.json").read_text())["records"] == 1
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "extra",
    [
        ["--from", "{a}", "--label", "nosuch"],
        ["--label", "A", "--from", "{a}"],
        ["--from", "{tmp}/missing"],
        ["--from", "{a}", "--from", "{c}"],
    ],
    ids=["unknown-label", "label-first", "missing-run", "other-settings"],
)
def test_cli_bad_input_is_one_line(
    extra: list[str],
    two_runs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, _ = two_runs
    c = _run(tmp_path / "c", _unedited(2), fluency_records=50)
    argv = ["evaluate", "--summary-only", "--out", str(tmp_path / "t")]
    argv += [x.format(a=a, c=c, tmp=tmp_path) for x in extra]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("backward-lens: error:"), err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("target", ["run", "from-without-summary-only"])
def test_cli_refuses_to_write_into_a_run(
    target: str, two_runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = two_runs
    before = {p.name: p.read_bytes() for p in a.iterdir()}
    flags = ["--summary-only"] if target == "run" else []
    code = main(["evaluate", *flags, "--out", str(a), "--from", str(a), "--from", str(b)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("backward-lens: error:")
    assert ("holds a run's results" if target == "run" else "add --summary-only") in err
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before


def _gunzipped(src: Path, dest: Path) -> Path:
    """A copy of a committed run folder with its result files gunzipped."""
    dest.mkdir()
    shutil.copy(src / "run.json", dest / "run.json")
    for path in src.glob("results*.jsonl.gz"):
        (dest / path.name.removesuffix(".gz")).write_bytes(gzip.decompress(path.read_bytes()))
    return dest


def test_committed_smollm2_runs(tmp_path: Path) -> None:
    """ft-early and ROME (old run, 1000 and 160 records) with the new defaults' run (1000)."""
    results = REPO / "docs" / "results"
    old = _gunzipped(results / "evaluation-smollm2", tmp_path / "old")
    new = _gunzipped(results / "evaluation-smollm2-new-defaults", tmp_path / "new")
    rows, report = combine_runs([(old, ["unedited", "ft-early", "rome"]), (new, None)])
    df = summarize(rows)
    assert list(df.index) == [
        "unedited",
        "ft-early",
        "rome",
        "shift",
        "shift-adaptive",
        "ft-late",
    ]
    assert set(df["records"]) == {160}
    assert report.records == 160
    assert report.checked == {"unedited": [str(old), str(new)]}  # 1000 equal lines, kept once
    assert report.dropped == {
        "unedited": 840,
        "ft-early": 840,
        "rome": 0,
        "shift": 840,
        "shift-adaptive": 840,
        "ft-late": 840,
    }
    # the combined rows are the runs' own: ROME's mean equals the old run's (all 160 records)
    rome = summarize(r for r in read_results(old) if r["label"] == "rome")
    assert df.loc["rome", MEAN] == pytest.approx(rome.loc["rome", MEAN])
    # ft-early and rome from the old run, ft-late from the new; unedited from both, kept once
    rows, report = combine_runs(
        [(old, ["unedited", "ft-early", "rome"]), (new, ["unedited", "ft-late"])]
    )
    df = summarize(rows)
    assert list(df.index) == ["unedited", "ft-early", "rome", "ft-late"]
    assert set(df["records"]) == {160} and report.records == 160
    assert report.checked == {"unedited": [str(old), str(new)]}
    assert sum(r["label"] == "unedited" for r in rows) == 160
    # ft-late at the old default (layer 22) and the new one (21): refused, however selected
    with pytest.raises(DataError, match=r"'ft-late' was run .* \(layer 22 and 21\)"):
        combine_runs([(old, ["unedited", "ft-late"]), (new, None)])
