"""The study on the real default model: the paper's structural facts hold on CounterFact."""

from __future__ import annotations

import pytest

from backward_lens.study import run_study
from tests.paths import COUNTERFACT_EDIT

COUNTERFACT = str(COUNTERFACT_EDIT)


@pytest.mark.slow
def test_rank_and_target_rank_on_smollm2(smollm2, tmp_path) -> None:
    rank = run_study(
        "rank", COUNTERFACT, model=smollm2, n=6, seed=5, out=tmp_path / "r", progress=False
    )
    h = rank.aggregate.headline
    assert rank.n_ok == 6
    # Appendix A: the last layer's MLP gradient has rank 1, whatever the prompt.
    assert h["ff1_last_layer_rank1_pct"] == 100.0 and h["ff2_last_layer_rank1_pct"] == 100.0
    # Lemma 4.1: never above n (the share is the share of prompts at exactly n).
    table = rank.to_dataframe()
    assert (table.mean_deficit >= 0).all()
    target = run_study(
        "target-rank", COUNTERFACT, model=smollm2, n=6, seed=5, out=tmp_path / "t", progress=False
    )
    # Lemma 5.1 at the top of the backward pass: delta_n of the last layer ranks the target on
    # the improbable side (normalised rank > 0.5) on average.
    assert target.aggregate.curves["last token (raw lens)"]["y"][-1] > 0.5
