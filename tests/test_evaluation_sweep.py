"""The shift sweep: its per-row hook must agree with the real editor, and the choice rule."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from backward_lens.data import load_records
from backward_lens.errors import InputError
from backward_lens.evaluation import EvalSettings, evaluate, read_results
from backward_lens.evaluation.sweep import choose, plot_sweep, shift_sweep
from tests.test_evaluation_harness import easyedit_file
from tests.tiny import make_tiny


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sweep_matches_the_shift_editor(tokenizer, tmp_path: Path, family: str) -> None:  # type: ignore[no-untyped-def]
    lm = make_tiny(family, tokenizer, seed=4)
    records = load_records(easyedit_file(tmp_path / "cf.json"))
    etas = [0.5, 20.0]
    df = shift_sweep(lm, records, [1], etas, batch_size=8, progress=False)
    assert list(df.eta) == [0.0, *etas]
    methods = [f"shift:layer=1,eta={e}" for e in etas]
    settings = EvalSettings(batch_size=1, group_size=1, fluency_records=0, ppl_records=0)
    evaluate(lm, records, methods, tmp_path / "ev", settings=settings, progress=False)
    rows = read_results(tmp_path / "ev")
    for eta, label in zip(etas, methods, strict=True):
        mine = [r["metrics"] for r in rows if r["label"] == label]
        point = df[df.eta == eta].iloc[0]
        for key in ("efficacy_acc", "paraphrase_acc", "neighborhood_acc", "neighborhood_score"):
            assert point[key] == pytest.approx(sum(m[key] for m in mine) / len(mine)), key
    # the large eta must actually edit (efficacy up), else this test could not fail
    assert df.efficacy_acc.iloc[-1] > df.efficacy_acc.iloc[0]
    plot_sweep(df, choose(df), tmp_path / "s.png")
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
