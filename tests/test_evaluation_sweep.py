"""The shift sweep: its per-row hook must agree with the real editor, and the choice rule."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from backward_lens.data import load_records
from backward_lens.errors import InputError
from backward_lens.evaluation import PERPLEXITY_TEXTS, EvalSettings, evaluate, read_results
from backward_lens.evaluation.sweep import (
    FluencySettings,
    choose,
    editor_sweep,
    fluency_rejections,
    plot_sweep,
    shift_sweep,
    with_verdicts,
)
from tests.test_evaluation_harness import easyedit_file
from tests.tiny import make_tiny


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sweep_matches_the_shift_editor(tokenizer, tmp_path: Path, family: str) -> None:  # type: ignore[no-untyped-def]
    lm = make_tiny(family, tokenizer, seed=4)
    records = load_records(easyedit_file(tmp_path / "cf.json"))
    etas = [0.5, 20.0]
    # fluency on the first 2 records, on every perplexity text, as the harness measures it
    fs = FluencySettings(records=2, ppl_texts=len(PERPLEXITY_TEXTS), generation_length=12)
    df = shift_sweep(lm, records, [1], etas, batch_size=8, progress=False, fluency_settings=fs)
    assert list(df.eta) == [0.0, *etas]
    methods = [f"shift:layer=1,eta={e}" for e in etas]
    settings = EvalSettings(
        batch_size=1, group_size=1, fluency_records=2, ppl_records=2, generation_length=12
    )
    evaluate(
        lm, records, ["unedited", *methods], tmp_path / "ev", settings=settings, progress=False
    )
    rows = read_results(tmp_path / "ev")
    for eta, label in zip([0.0, *etas], ["unedited", *methods], strict=True):
        mine = [r["metrics"] for r in rows if r["label"] == label]
        point = df[df.eta == eta].iloc[0]
        for key in ("efficacy_acc", "paraphrase_acc", "neighborhood_acc", "neighborhood_score"):
            assert point[key] == pytest.approx(sum(m[key] for m in mine) / len(mine)), key
        # the row hook during sampling and perplexity equals the real weight edit
        for key in ("fluency", "perplexity"):
            got = [m[key] for m in mine if m[key] is not None]
            assert len(got) == 2
            assert point[key] == pytest.approx(sum(got) / len(got), rel=1e-4), (eta, key)
    # the large eta must actually edit (efficacy up), else this test could not fail
    assert df.efficacy_acc.iloc[-1] > df.efficacy_acc.iloc[0]
    assert df.perplexity.iloc[-1] != pytest.approx(df.perplexity.iloc[0])
    loose = choose(df, max_entropy_drop=1.0, max_perplexity_rise=math.inf)
    plot_sweep(with_verdicts(df), loose, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_choose_rule() -> None:
    df = pd.DataFrame(
        [
            dict(
                layer=-1,
                eta=0.0,
                efficacy_acc=0.0,
                paraphrase_acc=0,
                neighborhood_acc=0.1,
                neighborhood_score=0.8,
                records=10,
            ),
            dict(
                layer=3,
                eta=0.5,
                efficacy_acc=0.9,
                paraphrase_acc=0.2,
                neighborhood_acc=0,
                neighborhood_score=0.7,
                records=10,
            ),
            dict(
                layer=3,
                eta=1.0,
                efficacy_acc=1.0,
                paraphrase_acc=0.3,
                neighborhood_acc=0,
                neighborhood_score=0.4,
                records=10,
            ),
            dict(
                layer=4,
                eta=1.0,
                efficacy_acc=0.96,
                paraphrase_acc=0.5,
                neighborhood_acc=0,
                neighborhood_score=0.5,
                records=10,
            ),
        ]
    )
    best = choose(df, 0.95)
    assert (best.layer, best.eta) == (4, 1.0)
    best = choose(df, 0.5)
    assert (best.layer, best.eta) == (3, 0.5)
    best = choose(df, 1.01)  # nothing reaches it: the best efficacy
    assert (best.layer, best.eta) == (3, 1.0)


def test_bad_layer_is_refused(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lm = make_tiny("llama", tokenizer)
    records = load_records(easyedit_file(tmp_path / "cf.json"))
    with pytest.raises(InputError, match="out of range"):
        shift_sweep(lm, records, [7], [0.5], progress=False)


def _row(
    layer: int, eta: float, eff: float, nscore: float, flu: float, ppl: float
) -> dict[str, Any]:
    return dict(
        layer=layer,
        eta=eta,
        efficacy_acc=eff,
        paraphrase_acc=0.5,
        neighborhood_acc=0.0,
        neighborhood_score=nscore,
        records=10,
        fluency=flu,
        perplexity=ppl,
    )


def test_fluency_rule_rejects_the_best_point_when_it_wrecks_generation() -> None:
    df = pd.DataFrame(
        [
            _row(-1, 0.0, 0.0, 0.8, 6.00, 20.0),  # unedited: entropy 600, perplexity 20
            _row(5, 0.2, 1.00, 0.60, 0.86, 21.0),  # best efficacy and specificity; entropy 86
            _row(5, 0.3, 1.00, 0.55, 5.95, 30.0),  # fluent samples, perplexity +50 %
            _row(4, 0.1, 0.96, 0.30, 5.71, 21.9),  # within bounds: -4.8 %, +9.5 %
            _row(4, 0.2, 0.97, 0.20, 5.69, 20.0),  # entropy -5.2 %: just outside
        ]
    )
    assert choose(df, 0.95, max_entropy_drop=1.0, max_perplexity_rise=math.inf).eta == 0.2
    best = choose(df, 0.95)
    assert (best.layer, best.eta) == (4, 0.1)
    reasons = fluency_rejections(df)
    assert list(reasons == "") == [True, False, False, True, False]
    assert "entropy 86.0" in reasons[1] and "perplexity 30.00 > 22.00" in reasons[2]
    table = with_verdicts(df)
    assert list(table.rejected) == [False, True, True, False, True]
    # nothing fluent reaches the efficacy bar: the best efficacy among the fluent points
    assert choose(df, 0.99).eta == 0.1
    with pytest.raises(InputError, match="every one of the 2 edited points"):
        choose(df.iloc[:3])
    # no fluency measured (NaN in the unedited row): the rule cannot reject anything
    blind = df.assign(fluency=math.nan, perplexity=math.nan)
    assert not with_verdicts(blind).rejected.any()
    assert choose(blind, 0.95).eta == 0.2


def test_sweep_rejects_an_eta_that_wrecks_generation(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The huge eta edits best but moves the perplexity: chosen only when the bound allows it."""
    lm = make_tiny("gpt2", tokenizer, seed=4)
    records = load_records(easyedit_file(tmp_path / "cf.json"))
    fs = FluencySettings(records=3, ppl_texts=4, generation_length=30)
    df = shift_sweep(
        lm, records, [1], [1e-4, 1000.0], batch_size=8, progress=False, fluency_settings=fs
    )
    base, mild, huge = (df.iloc[i] for i in range(3))
    assert huge.efficacy_acc > mild.efficacy_acc  # the best edit ...
    assert mild.perplexity == pytest.approx(base.perplexity, rel=1e-4)
    assert mild.fluency == pytest.approx(base.fluency, rel=0.02)
    rise = huge.perplexity / base.perplexity - 1
    assert rise > 0.01  # ... raises the perplexity (a random model's: by some percent)
    strict = {"max_entropy_drop": 1.0, "max_perplexity_rise": rise / 2}
    assert with_verdicts(df, **strict).rejected.tolist() == [False, False, True]
    assert "perplexity" in with_verdicts(df, **strict).rejected_because.iloc[2]
    assert choose(df, 0.95, **strict).eta == 1e-4  # never the point that breaks the bound
    loose = {"max_entropy_drop": 1.0, "max_perplexity_rise": rise * 2}
    assert choose(df, 0.95, **loose).eta == 1000.0  # within the bound it is the best


@pytest.mark.parametrize("bad", [{"records": -1}, {"ppl_texts": 10**6}, {"top_k": 0}])
def test_fluency_settings_refuse_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(InputError):
        FluencySettings(**bad)


def test_editor_sweep_over_memit_weight(tokenizer, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("BACKWARD_LENS_CACHE", str(tmp_path / "cache"))
    lm = make_tiny("llama", tokenizer, seed=1)
    records = load_records(easyedit_file(tmp_path / "cf.json"))[:2]
    small = {"stats_samples": 4, "stats_length": 8, "context": [[3, 2]], "v_steps": 4}
    values = [0.01, 1e12]
    fs = FluencySettings(records=1, generation_length=10)
    df = editor_sweep(
        lm,
        records,
        "memit",
        "mom2_update_weight",
        values,
        tmp_path / "run",
        fixed=small,
        fluency_settings=fs,
        batch_size=8,
        progress=False,
    )
    assert list(df.method) == ["unedited", "memit", "memit"]
    assert math.isnan(df.value.iloc[0]) and list(df.value.iloc[1:]) == values
    assert list(df.records) == [2, 2, 2]
    rows = read_results(tmp_path / "run")
    for label, (_, point) in zip(
        ["unedited", *(f"memit:mom2_update_weight={v!r}" for v in values)],
        df.iterrows(),
        strict=True,
    ):
        mine = [r["metrics"] for r in rows if r["label"] == label]
        assert point.efficacy_acc == pytest.approx(sum(m["efficacy_acc"] for m in mine) / 2)
        assert point.fluency == pytest.approx(mine[0]["fluency"])
    # the weight matters: a huge prior all but cancels the update, a tiny one moves the model
    moved = (df.perplexity - df.perplexity.iloc[0]).abs() / df.perplexity.iloc[0]
    assert moved.iloc[2] < 1e-4 < 1e-3 < moved.iloc[1]
    assert choose(df, 0.0, max_entropy_drop=1.0, max_perplexity_rise=math.inf) is not None
    # resumable: the same call again recomputes nothing and gives the same table
    again = editor_sweep(
        lm,
        records,
        "memit",
        "mom2_update_weight",
        values,
        tmp_path / "run",
        fixed=small,
        fluency_settings=fs,
        batch_size=8,
        progress=False,
        resume=True,
    )
    pd.testing.assert_frame_equal(again, df)
    with pytest.raises(InputError, match="repeat"):
        editor_sweep(lm, records, "memit", "mom2_update_weight", [1.0, 1.0], tmp_path / "x")


def test_sweep_cli_reports_fluency_and_verdicts(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """``backward-lens sweep`` writes each point's fluency and the rule's verdict."""
    from backward_lens.cli import main
    from tests.tiny_folder import save_tiny_llama

    model = save_tiny_llama(tmp_path / "model")
    data = easyedit_file(tmp_path / "cf.json")
    args = ["sweep", "--model", str(model), "--data", str(data), "--layers", "1"]
    args += ["--etas", "0.5,4", "--fluency-records", "2", "--ppl-texts", "3", "--quiet"]
    loose = ["--max-entropy-drop", "1", "--max-perplexity-rise", "1e9"]
    assert main([*args, *loose, "--out", str(tmp_path / "out")]) == 0
    df = pd.read_csv(tmp_path / "out" / "sweep.csv")
    assert {"fluency", "perplexity", "rejected", "rejected_because"} <= set(df.columns)
    assert df.fluency.notna().all() and df.perplexity.notna().all()
    assert not df.rejected.any()
    assert "n-gram entropy" in capsys.readouterr().out
    assert "rejected because" in (tmp_path / "out" / "sweep.md").read_text()
