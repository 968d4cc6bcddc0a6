"""One hyper-parameter of any registered editor, swept through the evaluation harness.

:func:`editor_sweep` applies the shift sweep's rule (:mod:`~backward_lens.evaluation.sweep.rule`)
to one hyper-parameter of any registered editor (MEMIT's covariance weight
``mom2_update_weight``, ROME's layer...): one method of an evaluation run per value, on the same
records, with the same fluency measurements, so the run is resumable like ``evaluate``'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from backward_lens.data import FactRecord
from backward_lens.errors import InputError
from backward_lens.evaluation.harness import UNEDITED, EvalSettings, MethodSpec, evaluate
from backward_lens.evaluation.summary import read_results
from backward_lens.evaluation.sweep.rule import FluencySettings
from backward_lens.models import LensModel

EDITOR_COLUMNS = (
    "method",
    "param",
    "value",
    "efficacy_acc",
    "paraphrase_acc",
    "neighborhood_acc",
    "neighborhood_score",
    "fluency",
    "perplexity",
    "records",
)
"""Columns of :func:`editor_sweep`'s table (the unedited row has no value)."""


def editor_labels(method: str, param: str, values: Sequence[Any]) -> list[str]:
    """The run's method label of each value: ``METHOD:PARAM=VALUE`` (the value as JSON).

    Raises:
        InputError: no values, or a repeated value (also one written twice, as 1 and 1.0).
    """
    if not values:
        raise InputError(f"give at least one value of {param}")
    if any(a == b for i, a in enumerate(values) for b in values[i + 1 :]):
        raise InputError(f"the values of {param} repeat: {list(values)}")
    return [f"{method}:{param}={json.dumps(v)}" for v in values]


def editor_sweep(
    lm: LensModel,
    records: Sequence[FactRecord],
    method: str,
    param: str,
    values: Sequence[Any],
    out_dir: str | Path,
    *,
    fixed: dict[str, Any] | None = None,
    fluency_settings: FluencySettings | None = None,
    batch_size: int = 32,
    data: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Metrics of one editor for every value of one hyper-parameter, plus the unedited row.

    Each value is one method of an evaluation run in ``out_dir`` (``METHOD:PARAM=VALUE``; single
    edits, exactly as ``backward-lens evaluate`` measures them), so the run is resumable and its
    ``results.jsonl`` keeps every record's numbers. Fluency is measured on the first
    ``fluency_settings.records`` records (n-gram entropy of the harness's samples, perplexity on
    all of ``PERPLEXITY_TEXTS``); choose a value with :func:`choose`, which applies the same
    fluency rule as to the shift sweep. MEMIT's covariance weight: ``method="memit",
    param="mom2_update_weight"``.

    Args:
        lm: the model (left unchanged).
        records: the held-out split.
        method: a registered editor (``memit``, ``rome``, ``ft``...).
        param: one of its hyper-parameters.
        values: the candidate values (JSON-representable; each distinct).
        out_dir: the evaluation run's folder.
        fixed: the editor's other hyper-parameters, the same at every value (default: its own
            defaults, per model for layers).
        fluency_settings: records, sampling and perplexity cut (``ppl_texts`` is not used here).
        batch_size: sequences per forward pass.
        data: the data file's name, recorded in the run (a resumed run must match it).
        resume: continue the run in ``out_dir``.
        overwrite: discard earlier results in ``out_dir`` (as ``evaluate --fresh``).
        progress: show a progress bar.

    Returns:
        One row per value (:data:`EDITOR_COLUMNS`), the unedited row first (``value`` NaN);
        metrics are means over the records whose edit succeeded.

    Raises:
        InputError: no values, a repeated value, an unknown editor or parameter, bad values, an
            occupied ``out_dir`` without ``resume``.
    """
    fs = fluency_settings or FluencySettings()
    labels = editor_labels(method, param, values)
    specs = [
        MethodSpec(method, {**(fixed or {}), param: v}, label)
        for v, label in zip(values, labels, strict=True)
    ]
    settings = EvalSettings(
        batch_size=batch_size,
        fluency_records=fs.records,
        ppl_records=fs.records,
        generation_length=fs.generation_length,
        top_k=fs.top_k,
        ppl_max_tokens=fs.ppl_max_tokens,
        seed=fs.seed,
    )
    evaluate(
        lm,
        records,
        [MethodSpec(UNEDITED, {}, UNEDITED), *specs],
        out_dir,
        settings=settings,
        data=data,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
    )
    rows = read_results(out_dir)
    table = [_editor_row(rows, UNEDITED, UNEDITED, param, math.nan)]
    table += [
        _editor_row(rows, label, method, param, v) for v, label in zip(values, labels, strict=True)
    ]
    return pd.DataFrame(table, columns=list(EDITOR_COLUMNS))


def _editor_row(
    rows: Sequence[dict[str, Any]], label: str, method: str, param: str, value: Any
) -> dict[str, Any]:
    ok = [r["metrics"] for r in rows if r["label"] == label and r.get("status") == "ok"]

    def mean(key: str) -> float:
        got = [float(m[key]) for m in ok if m.get(key) is not None]
        return sum(got) / len(got) if got else math.nan

    metrics = EDITOR_COLUMNS[3:-1]
    return {
        "method": method,
        "param": param,
        "value": value,
        **{k: mean(k) for k in metrics},
        "records": len(ok),
    }
