"""Run folders record the model's dtype: a resume in another precision is refused, untouched.

Evaluation (``run.json``), the study and causal tracing (``config.json``) each: a run started in
float32 and resumed in float64 is one ``InputError`` line naming the dtype, before anything in the
folder changes; a config written before the dtype was recorded still resumes, and the config
written then records it. The CLI gives the same refusal as exit code 2 and one error line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from backward_lens.cli import main
from backward_lens.data import load_records
from backward_lens.errors import InputError
from backward_lens.evaluation import EvalSettings, evaluate, read_results
from backward_lens.models import LensModel
from backward_lens.runfolder import RECORDED_LATER, RunFolder
from backward_lens.study import run_study
from backward_lens.tracing import TraceConfig, run_trace
from tests.test_evaluation_harness import easyedit_file
from tests.tiny import make_tiny
from tests.tiny_folder import save_tiny_llama

SETTINGS = EvalSettings(batch_size=8, group_size=2, fluency_records=0, ppl_records=0)
METHODS = ["unedited"]
STUDY = [
    {"prompt": f"{s} is located in the city of", "subject": s, "target": " Paris", "id": i}
    for i, s in enumerate(["The Eiffel Tower", "Big Ben", "The Colosseum", "Notre Dame"])
]
TRACE = TraceConfig(samples=1, window=2)


@pytest.fixture(scope="module")
def f32(tokenizer: Any) -> LensModel:
    return make_tiny("llama", tokenizer, seed=4)


@pytest.fixture(scope="module")
def f64(tokenizer: Any) -> LensModel:
    lm = make_tiny("llama", tokenizer, seed=4)
    lm.model.to(torch.float64)
    return lm


@pytest.fixture
def facts(tmp_path: Path) -> Path:
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in STUDY))
    return path


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _keep_first_line(path: Path) -> None:
    """Cut a rows file to its first line (a run interrupted after one row)."""
    path.write_text(path.read_text().splitlines()[0] + "\n")


def _forget_dtype(config: Path, part: str | None) -> None:
    """Remove ``dtype`` from a config (``part``: the sub-object holding it), as older runs wrote."""
    data = json.loads(config.read_text())
    held = data[part] if part else data
    del held["dtype"]
    config.write_text(json.dumps(data, indent=2) + "\n")


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI, expecting exit code 2 and one error line; return that line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("backward-lens: error: ") and err.count("\n") == 1, err
    return err


def test_model_reports_its_dtype(f32: LensModel, f64: LensModel) -> None:
    assert (f32.dtype_name, f64.dtype_name) == ("float32", "float64")


def test_a_stored_config_without_dtype_is_not_compared_on_it(tmp_path: Path) -> None:
    assert "dtype" in RECORDED_LATER
    folder = RunFolder(tmp_path, "raw.jsonl", "config.json")
    folder.check_config({"model": "m", "dtype": "bfloat16"}, {"model": "m"})
    with pytest.raises(InputError, match="different dtype: dtype was 'float32', now 'bfloat16'"):
        folder.check_config({"model": "m", "dtype": "bfloat16"}, {"model": "m", "dtype": "float32"})


def test_evaluation_refuses_another_dtype(f32: LensModel, f64: LensModel, tmp_path: Path) -> None:
    records = load_records(easyedit_file(tmp_path / "cf.json"))
    out = tmp_path / "run"
    evaluate(f32, records, METHODS, out, settings=SETTINGS, progress=False)
    assert json.loads((out / "run.json").read_text())["dtype"] == "float32"
    _keep_first_line(out / "results.jsonl")
    before = _files(out)
    with pytest.raises(InputError, match="different dtype") as err:
        evaluate(f64, records, METHODS, out, settings=SETTINGS, resume=True, progress=False)
    assert "\n" not in str(err.value) and "'float32', now 'float64'" in str(err.value)
    assert _files(out) == before
    # a run.json written before the dtype was recorded resumes, and then records it
    _forget_dtype(out / "run.json", None)
    result = evaluate(f32, records, METHODS, out, settings=SETTINGS, resume=True, progress=False)
    assert result.reused == 1 and len(read_results(out)) == len(records)
    assert json.loads((out / "run.json").read_text())["dtype"] == "float32"


def test_study_refuses_another_dtype(
    f32: LensModel, f64: LensModel, facts: Path, tmp_path: Path
) -> None:
    out = tmp_path / "study"
    run_study("norms", facts, model=f32, out=out, progress=False)
    assert json.loads((out / "config.json").read_text())["facts"]["dtype"] == "float32"
    _keep_first_line(out / "raw.jsonl")
    before = _files(out)
    with pytest.raises(InputError, match="different dtype") as err:
        run_study("norms", facts, model=f64, out=out, progress=False)
    assert "\n" not in str(err.value) and "'float32', now 'float64'" in str(err.value)
    assert _files(out) == before
    _forget_dtype(out / "config.json", "facts")
    result = run_study("norms", facts, model=f32, out=out, progress=False)
    assert result.n_ok == len(STUDY)
    assert json.loads((out / "config.json").read_text())["facts"]["dtype"] == "float32"


def test_tracing_refuses_another_dtype(
    f32: LensModel, f64: LensModel, facts: Path, tmp_path: Path
) -> None:
    out = tmp_path / "trace"
    kw: dict[str, Any] = dict(n=3, out=out, config=TRACE, known_only=False, progress=False)
    kw["record_figures"] = False
    run_trace(facts, model=f32, **kw)
    assert json.loads((out / "config.json").read_text())["facts"]["dtype"] == "float32"
    _keep_first_line(out / "raw.jsonl")
    before = _files(out)
    with pytest.raises(InputError, match="different dtype") as err:
        run_trace(facts, model=f64, **kw)
    assert "\n" not in str(err.value) and "'float32', now 'float64'" in str(err.value)
    assert _files(out) == before
    _forget_dtype(out / "config.json", "facts")
    assert run_trace(facts, model=f32, **kw).n_traced == 3
    assert json.loads((out / "config.json").read_text())["facts"]["dtype"] == "float32"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_cli_refuses_another_dtype_in_one_line(
    model_dir: Path, facts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = ["--model", str(model_dir)]
    cf = easyedit_file(tmp_path / "cf.json")
    evaluation = ["evaluate", *model, "--data", str(cf), "--out", str(tmp_path / "ev")]
    evaluation += ["--method", "unedited", "--fluency-records", "0", "--ppl-records", "0"]
    evaluation += ["--group-size", "1", "--quiet"]
    study = ["study", "norms", *model, "--data", str(facts), "--out", str(tmp_path / "st")]
    study += ["--batch-size", "1", "--quiet"]
    trace = ["trace", *model, "--data", str(facts), "--out", str(tmp_path / "tr"), "--quiet"]
    trace += ["--records", "3", "--samples", "1", "--window", "2", "--all-facts"]
    trace += ["--no-record-figures"]
    for argv, rows in [
        (evaluation, tmp_path / "ev" / "results.jsonl"),
        (study, tmp_path / "st" / "raw.jsonl"),
        (trace, tmp_path / "tr" / "raw.jsonl"),
    ]:
        assert main(argv) == 0
        _keep_first_line(rows)
        before = _files(rows.parent)
        resume = ["--resume"] if argv is evaluation else []
        err = _refused(capsys, [*argv, *resume, "--dtype", "float64"])
        assert "different dtype: dtype was 'float32', now 'float64'" in err, err
        assert _files(rows.parent) == before
