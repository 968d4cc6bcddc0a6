"""The shift defaults shipped in ``editing/defaults.py`` are what the committed sweeps imply."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from backward_lens.editing.defaults import MODEL_DEFAULTS
from backward_lens.evaluation.sweep import choose

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"

SWEEPS = {
    # model -> the committed grids (same records and settings) whose choice is the default
    "smollm2-135m": ["sweep-smollm2/sweep.csv", "sweep-smollm2-more/sweep.csv"],
    # (Gemma-3's earlier grids, sweep-gemma3 and sweep-gemma3-fine, measured fluency on 8
    # records: a different unedited row, so they are history, not part of this choice)
    "gemma3-270m": ["sweep-gemma3-fluency32/sweep.csv"],
}


def _rule(csv: Path) -> dict[str, Any]:
    """The rule's settings the sweep ran with (``settings.json`` beside it; else the defaults)."""
    path = csv.parent / "settings.json"
    return json.loads(path.read_text())["rule"] if path.is_file() else {}


def _union(model: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Every grid of ``model`` in one table: one unedited row, each (layer, eta) once."""
    paths = [RESULTS / p for p in SWEEPS[model]]
    tables = [pd.read_csv(p) for p in paths]
    rules = [_rule(p) for p in paths]
    assert all(r == rules[0] for r in rules), "the grids were chosen with different rules"
    base = [t[t.eta == 0] for t in tables]
    for b in base[1:]:  # the same records and settings: the same unedited row
        pd.testing.assert_frame_equal(b.reset_index(drop=True), base[0].reset_index(drop=True))
    df = pd.concat([base[0], *(t[t.eta > 0] for t in tables)], ignore_index=True)
    assert not df[df.eta > 0].duplicated(["layer", "eta"]).any()
    return df, rules[0]


@pytest.mark.parametrize("model", sorted(SWEEPS))
def test_shift_defaults_are_what_the_committed_sweeps_imply(model: str) -> None:
    """The defaults equal the rule's choice over the committed grids of each model."""
    df, rule = _union(model)
    best = choose(df, **rule)
    assert MODEL_DEFAULTS[model]["shift"] == {"layer": int(best.layer), "eta": float(best.eta)}
    assert MODEL_DEFAULTS[model]["ft-late"] == {"layer": int(best.layer)}


@pytest.mark.parametrize("model", sorted(SWEEPS))
def test_committed_sweeps_measured_fluency_everywhere(model: str) -> None:
    """A grid with fluency columns has them for every point, and its verdicts follow the rule."""
    from backward_lens.evaluation.sweep import with_verdicts

    df, rule = _union(model)
    if "fluency" not in df.columns:
        pytest.skip(f"{model}'s committed grid predates the fluency rule")
    assert df.fluency.notna().all() and df.perplexity.notna().all()
    bounds = {k: v for k, v in rule.items() if k != "min_efficacy"}
    assert list(df.rejected) == list(with_verdicts(df.drop(columns="rejected"), **bounds).rejected)


@pytest.mark.parametrize(
    ("model", "folder"),
    # (SmolLM2's first sweep, memit-lambda-smollm2, ran at the one-sample trace's layers 0-4)
    [("smollm2-135m", "memit-lambda-smollm2-layers15"), ("gemma3-270m", "memit-lambda-gemma3")],
)
def test_memit_weight_default_is_what_the_committed_sweep_implies(model: str, folder: str) -> None:
    """Each model's MEMIT lambda is the rule's choice over its committed lambda sweep.

    The sweep ran with the model's other MEMIT defaults (``settings.json`` records any value it
    fixed, e.g. Gemma-3's z learning rate, which must still be the default).
    """
    csv = RESULTS / folder / "sweep.csv"
    df = pd.read_csv(csv)
    assert df.value.isna().sum() == 1  # the unedited row
    best = choose(df, **_rule(csv))
    memit = MODEL_DEFAULTS[model]["memit"]
    assert memit["mom2_update_weight"] == float(best.value)
    settings = csv.parent / "settings.json"
    fixed = json.loads(settings.read_text()).get("fixed", {}) if settings.is_file() else {}
    for key, value in fixed.items():
        assert memit[key] == value, key
