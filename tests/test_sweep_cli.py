"""``backward-lens sweep --method NAME --hparam KEY=V1,V2``: an editor's setting from the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from backward_lens.cli import main
from backward_lens.commands import sweep_editor
from backward_lens.data import load_records
from backward_lens.errors import InputError
from backward_lens.evaluation.methods import parse_values
from backward_lens.evaluation.sweep import EDITOR_COLUMNS, FluencySettings, editor_sweep
from tests.test_evaluation_harness import easyedit_file
from tests.tiny import make_tiny

SMALL = {"stats_samples": 4, "stats_length": 8, "context": [[3, 2]], "v_steps": 4}
"""MEMIT settings small enough for the tiny model (as tests/test_evaluation_sweep.py)."""

FIXED = ["--fixed", "stats_samples=4", "--fixed", "stats_length=8"]
FIXED += ["--fixed", "context=[[3,2]]", "--fixed", "v_steps=4"]
LOOSE = ["--min-efficacy", "0", "--max-entropy-drop", "1", "--max-perplexity-rise", "1e9"]


@pytest.fixture
def tiny(tokenizer, monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    """A tiny llama stands in for --model; MEMIT's statistics are cached under tmp_path."""
    monkeypatch.setenv("BACKWARD_LENS_CACHE", str(tmp_path / "cache"))
    lm = make_tiny("llama", tokenizer, seed=1)
    monkeypatch.setattr(sweep_editor, "model_from_args", lambda args: lm)
    return lm


def _argv(data: Path, out: Path, values: str, *extra: str) -> list[str]:
    return [
        "sweep",
        "--method",
        "memit",
        "--hparam",
        f"mom2_update_weight={values}",
        *FIXED,
        "--data",
        str(data),
        "--records",
        "2",
        "--fluency-records",
        "1",
        "--batch-size",
        "8",
        "--out",
        str(out),
        "--quiet",
        *LOOSE,
        *extra,
    ]


def _lines(out: Path) -> list[str]:
    return (out / "results.jsonl").read_text().splitlines()


def test_editor_sweep_cli_equals_the_python_call_and_resumes(  # type: ignore[no-untyped-def]
    tiny, tmp_path: Path, capsys
) -> None:
    data = easyedit_file(tmp_path / "cf.json")
    out = tmp_path / "run"
    # an interrupted sweep: one value done
    assert main(_argv(data, out, "0.01")) == 0
    first = _lines(out)
    assert len(first) == 2 * 2  # 2 records x (unedited, one value)
    capsys.readouterr()
    # an occupied folder is refused in one line, as evaluate does
    assert main(_argv(data, out, "0.01,1e12")) == 2
    err = capsys.readouterr().err
    assert err.startswith("backward-lens: error:") and err.count("\n") == 1
    assert "--resume" in err and "Traceback" not in err
    # --resume computes only the new value: the finished lines are kept as they are
    assert main(_argv(data, out, "0.01,1e12", "--resume")) == 0
    assert "chosen for" in capsys.readouterr().out
    lines = _lines(out)
    assert lines[:4] == first and len(lines) == 6
    got = pd.read_csv(out / "sweep.csv")
    assert list(got.columns) == [*EDITOR_COLUMNS, "rejected", "rejected_because"]
    assert list(got.method) == ["unedited", "memit", "memit"]
    assert math.isnan(got.value.iloc[0]) and list(got.value.iloc[1:]) == [0.01, 1e12]
    # the same numbers as the Python call with the same settings
    records = load_records(data)[:2]
    want = editor_sweep(
        tiny,
        records,
        "memit",
        "mom2_update_weight",
        [0.01, 1e12],
        tmp_path / "direct",
        fixed=SMALL,
        fluency_settings=FluencySettings(records=1),
        batch_size=8,
        progress=False,
    )
    for col in EDITOR_COLUMNS[3:]:
        assert got[col].tolist() == pytest.approx(want[col].tolist(), rel=1e-12, nan_ok=True), col
    assert want.perplexity.iloc[1] != pytest.approx(want.perplexity.iloc[0], rel=1e-4)  # edits
    md = (out / "sweep.md").read_text()
    assert "| memit mom2_update_weight |" in md and md.count("**(chosen)**") == 1
    assert (out / "sweep.png").stat().st_size > 1000
    # --fresh starts again: the same table from new lines
    assert main(_argv(data, out, "0.01,1e12", "--fresh")) == 0
    assert len(_lines(out)) == 6
    pd.testing.assert_frame_equal(pd.read_csv(out / "sweep.csv"), got)


def test_values_with_commas_inside_brackets(tiny, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """``layers=[0],[0,1]`` sweeps two lists; the table and figure take list values."""
    data = easyedit_file(tmp_path / "cf.json")
    out = tmp_path / "layers"
    argv = ["sweep", "--method", "memit", "--hparam", "layers=[0],[0,1]", *FIXED]
    argv += ["--data", str(data), "--records", "1", "--fluency-records", "0"]
    argv += ["--out", str(out), "--quiet", *LOOSE]
    assert main(argv) == 0
    assert "memit layers=" in capsys.readouterr().out
    got = pd.read_csv(out / "sweep.csv")
    assert got.value.tolist()[1:] == ["[0]", "[0, 1]"]
    labels = {json.loads(line)["label"] for line in _lines(out)}
    assert labels == {"unedited", "memit:layers=[0]", "memit:layers=[0, 1]"}
    assert "| [0, 1] |" in (out / "sweep.md").read_text()
    assert (out / "sweep.png").exists()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--method", "nosuch", "--hparam", "x=1,2"], "unknown editing method 'nosuch'"),
        (["--method", "memit", "--hparam", "nosuch=1,2"], "it takes:"),
        (["--method", "memit"], "give --hparam KEY=V1,V2"),
        (["--method", "memit", "--hparam", "mom2_update_weight=1,2", "--layers", "1"], "--layers"),
        (["--method", "memit", "--hparam", "mom2_update_weight=1,2", "--workers", "2"], "--work"),
        (["--method", "memit", "--hparam", "mom2_update_weight=1,2", "--shard", "0/2"], "--shard"),
        (["--method", "memit", "--hparam", "mom2_update_weight=1,,2"], "an empty value"),
        (["--method", "memit", "--hparam", "layers=[0,1"], "unbalanced brackets"),
        (["--method", "memit", "--hparam", "mom2_update_weight=abc,1"], "mom2_update_weight"),
        (["--method", "memit", "--hparam", "mom2_update_weight=1,1.0"], "repeat"),
        (["--method", "memit", "--hparam", "mom2_update_weight"], "write key=value"),
        (["--method", "memit", "--hparam", "v_steps=1,2", "--hparam", "lr=1"], "give one --hparam"),
        (["--method", "memit", "--hparam", "v_steps=1,2", "--fixed", "v_steps=3"], "both swept"),
        (["--method", "memit", "--hparam", "v_steps=1,2", "--fixed", "v_steps"], "key=value"),
        (["--method", "unedited", "--hparam", "x=1"], "baseline"),
        (["--hparam", "eta=0.1,0.2"], "--hparam is for an editor sweep"),
        (["--resume"], "--resume is for an editor sweep"),
    ],
)
def test_bad_input_is_one_line(  # type: ignore[no-untyped-def]
    argv: list[str], says: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Each mistake exits 2 with one ``backward-lens: error:`` line, before any model loads."""

    def no_model(args: Any) -> None:
        raise AssertionError("the model must not load for bad input")

    monkeypatch.setattr(sweep_editor, "model_from_args", no_model)
    monkeypatch.setattr("backward_lens.commands.sweep.model_from_args", no_model)
    data = easyedit_file(tmp_path / "cf.json")
    code = main(["sweep", *argv, "--data", str(data), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("backward-lens: error:") and err.count("\n") == 1, err
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_parse_values_splits_at_depth_zero() -> None:
    assert parse_values("layers=[0,1],[2]") == ("layers", [[0, 1], [2]])
    assert parse_values("w=1, 2.5,text") == ("w", [1, 2.5, "text"])
    assert parse_values('m={"a":[1,2]},3') == ("m", [{"a": [1, 2]}, 3])
    for bad in ("w=", "w=1,,2", "w=[1", "=1", "w"):
        with pytest.raises(InputError):
            parse_values(bad)
