"""One grid point of the shift sweep: its mean metrics, and the table of points."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import pandas as pd
from torch import Tensor

from backward_lens.evaluation.sweep.cases import Case


@dataclass(frozen=True)
class SweepPoint:
    """Mean metrics of one (layer, eta) over the sweep's records (eta 0 = unedited).

    ``fluency`` (n-gram entropy, bits, x100 in the tables) and ``perplexity`` are means over the
    first :attr:`FluencySettings.records` records (NaN when not measured).
    """

    layer: int
    eta: float
    efficacy_acc: float
    paraphrase_acc: float
    neighborhood_acc: float
    neighborhood_score: float
    records: int
    fluency: float = math.nan
    perplexity: float = math.nan


POINT_COLUMNS = tuple(f.name for f in fields(SweepPoint))
"""Columns of the shift sweep's table (:class:`SweepPoint`'s fields)."""


def sweep_table(points: Sequence[SweepPoint], index: Sequence[int]) -> pd.DataFrame:
    """One row per point (:class:`SweepPoint` fields), indexed by grid position ``index``."""
    return pd.DataFrame([asdict(p) for p in points], index=list(index), columns=list(POINT_COLUMNS))


def point_of(
    layer: int,
    eta: float,
    cases: Sequence[Case],
    scored: Sequence[tuple[Tensor, Tensor]],
    entropy: float = math.nan,
    ppl: float = math.nan,
) -> SweepPoint:
    """The mean metrics of one point from its scored sequences (in :attr:`Case.seqs` order).

    Args:
        layer: the edited layer (-1 for the unedited point).
        eta: the point's eta (0: unedited).
        cases: the records, in the order their sequences were scored.
        scored: (per-token NLL, argmax hits) of every sequence of every case.
        entropy: the point's mean n-gram entropy (NaN: not measured).
        ppl: the point's mean perplexity (NaN: not measured).

    Returns:
        The point.
    """
    eff, para, nacc, nscore = [], [], [], []
    i = 0
    for c in cases:
        n_new = len(c.prompts.rewrite) + len(c.prompts.paraphrase)
        n_nb = len(c.prompts.neighborhood)
        new = scored[i : i + n_new]
        true = scored[i + n_new : i + n_new + n_nb]
        nb_new = scored[i + n_new + n_nb : i + n_new + 2 * n_nb]
        i += n_new + 2 * n_nb
        eff.append(float(bool(new[0][1].all())))
        if n_new > 1:
            para.append(sum(float(bool(ok.all())) for _, ok in new[1:]) / (n_new - 1))
        if n_nb:
            nacc.append(sum(float(bool(ok.all())) for _, ok in true) / n_nb)
            nscore.append(
                sum(float(t.mean() < n.mean()) for (t, _), (n, _) in zip(true, nb_new, strict=True))
                / n_nb
            )

    def mean(v: list[float]) -> float:
        return sum(v) / len(v) if v else float("nan")

    return SweepPoint(
        layer, eta, mean(eff), mean(para), mean(nacc), mean(nscore), len(cases), entropy, ppl
    )
