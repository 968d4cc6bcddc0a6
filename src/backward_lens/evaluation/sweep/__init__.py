"""Choosing an editor's hyper-parameters on a held-out split: sweeps and the rule that picks.

The sweep in parts, dependencies one way (each module imports only those above it):

- :mod:`~backward_lens.evaluation.sweep.rule`: the choice rule (:func:`choose`), the fluency
  bounds (:func:`fluency_rejections`, :func:`with_verdicts`) and :class:`FluencySettings`.
- :mod:`~backward_lens.evaluation.sweep.cases`: the shift sweep's records encoded and probed once.
- :mod:`~backward_lens.evaluation.sweep.point`: one grid point's metrics (:class:`SweepPoint`)
  and the table of points (:func:`sweep_table`).
- :mod:`~backward_lens.evaluation.sweep.rows`: every record's shift at once, one per batch row.
- :mod:`~backward_lens.evaluation.sweep.shift`: forward pass shift's (layer, eta) grid
  (:func:`shift_sweep`, :class:`ShiftSweep`).
- :mod:`~backward_lens.evaluation.sweep.parts`: the shift sweep split over processes
  (:func:`write_part`, :func:`merge_parts`).
- :mod:`~backward_lens.evaluation.sweep.editor`: one hyper-parameter of any registered editor,
  through the evaluation harness (:func:`editor_sweep`).
- :mod:`~backward_lens.evaluation.sweep.plot`: the figures (:func:`plot_sweep`,
  :func:`plot_editor_sweep`).

This package re-exports their public names.
"""

from __future__ import annotations

from backward_lens.evaluation.sweep.editor import EDITOR_COLUMNS, editor_labels, editor_sweep
from backward_lens.evaluation.sweep.parts import PART, check_parts, merge_parts, write_part
from backward_lens.evaluation.sweep.plot import plot_editor_sweep, plot_sweep
from backward_lens.evaluation.sweep.point import SweepPoint, sweep_table
from backward_lens.evaluation.sweep.rule import (
    MAX_ENTROPY_DROP,
    MAX_PERPLEXITY_RISE,
    FluencySettings,
    choose,
    fluency_rejections,
    fluency_seeds,
    with_verdicts,
)
from backward_lens.evaluation.sweep.shift import ShiftSweep, shift_sweep

__all__ = [
    "EDITOR_COLUMNS",
    "MAX_ENTROPY_DROP",
    "MAX_PERPLEXITY_RISE",
    "PART",
    "FluencySettings",
    "ShiftSweep",
    "SweepPoint",
    "check_parts",
    "choose",
    "editor_labels",
    "editor_sweep",
    "fluency_rejections",
    "fluency_seeds",
    "merge_parts",
    "plot_editor_sweep",
    "plot_sweep",
    "shift_sweep",
    "sweep_table",
    "with_verdicts",
    "write_part",
]
