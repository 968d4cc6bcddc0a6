"""Choosing forward pass shift's layer and eta on a held-out split: the (layer, eta) grid.

For every candidate (layer, eta) the shift of every record is applied at once, one record per
batch row (:class:`~backward_lens.evaluation.sweep.rows.ShiftRows`). One probe pass records x_n
at every candidate layer (:func:`~backward_lens.evaluation.sweep.cases.probe`); each grid point
then costs one batched scoring pass, plus the fluency measurements. As in the official code, a
record whose prompt already predicts the target gets no shift. The point is chosen by
:func:`~backward_lens.evaluation.sweep.rule.choose`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from backward_lens import checks
from backward_lens.batching import Hooks
from backward_lens.data import FactRecord
from backward_lens.distributed.shards import Shard
from backward_lens.errors import InputError
from backward_lens.evaluation.scoring import score_sequences
from backward_lens.evaluation.sweep.cases import prepare_cases, probe
from backward_lens.evaluation.sweep.point import SweepPoint, point_of, sweep_table
from backward_lens.evaluation.sweep.rows import ShiftRows, fluency_of
from backward_lens.evaluation.sweep.rule import FluencySettings
from backward_lens.models import LensModel


def shift_sweep(
    lm: LensModel,
    records: Sequence[FactRecord],
    layers: Sequence[int],
    etas: Sequence[float],
    *,
    batch_size: int = 64,
    progress: bool = True,
    shard: Shard | None = None,
    fluency_settings: FluencySettings | None = None,
) -> pd.DataFrame:
    """Metrics of forward pass shift for every (layer, eta), plus the unedited row (eta 0).

    Args:
        lm: the model (left unchanged: the shift is a forward hook).
        records: the held-out split.
        layers: candidate layers (negative counts from the end).
        etas: candidate etas, each in (0, MAX_ETA].
        batch_size: sequences per forward pass.
        progress: show a progress bar.
        shard: compute only the grid points ``p`` with ``p mod N == K`` (grid order: the unedited
            point, then layer-major, eta-minor). Every point is computed independently from the
            same probe of all records, so the parts concatenated equal the unsplit table exactly.
        fluency_settings: how each point's n-gram entropy and perplexity are measured (default
            :class:`FluencySettings`; ``records=0`` leaves them NaN).

    Returns:
        One row per grid point (:class:`SweepPoint` fields), indexed by grid position.

    Raises:
        InputError: a layer the model lacks, no or bad etas, no usable record.
    """
    shard = shard or Shard()
    sweep = ShiftSweep(
        lm, records, layers, etas, batch_size=batch_size, fluency_settings=fluency_settings
    )
    mine = sweep.points(shard)
    desc = f"sweep {shard}" if shard.sharded else "sweep"
    points = [sweep.point(p) for p in tqdm(mine, desc=desc, unit="pt", disable=not progress)]
    return sweep_table(points, mine)


class ShiftSweep:
    """The sweep's records prepared and probed once; then any grid point is computed on its own.

    Used whole by :func:`shift_sweep`, and by each Ray worker of ``sweep --workers`` (each
    probes the records itself and computes the grid points it is handed), so a point's numbers
    do not depend on which process computes it.

    Args:
        lm: the model (left unchanged: the shift is a forward hook).
        records: the held-out split.
        layers: candidate layers (negative counts from the end).
        etas: candidate etas, each in (0, MAX_ETA].
        batch_size: sequences per forward pass.
        fluency_settings: how each point's n-gram entropy and perplexity are measured.

    Raises:
        InputError: a layer the model lacks, no or bad etas, no usable record.
    """

    def __init__(
        self,
        lm: LensModel,
        records: Sequence[FactRecord],
        layers: Sequence[int],
        etas: Sequence[float],
        *,
        batch_size: int = 64,
        fluency_settings: FluencySettings | None = None,
    ) -> None:
        """Check the grid, prepare the records and probe x_n at every candidate layer."""
        self.lm, self.batch_size = lm, batch_size
        self.fluency_settings = fluency_settings or FluencySettings()
        checks.layers("layers", list(layers))  # a non-empty list of integers
        layers = [lm.arch.layer_index(layer, "layers") for layer in layers]
        if not etas:
            raise InputError("give at least one eta")
        etas = [checks.eta("eta", e) for e in etas]  # finite, in (0, MAX_ETA]: as the CLI
        self.cases = prepare_cases(lm, records)
        self.x_by_layer, self.predicted = probe(lm, self.cases, layers, batch_size)
        unembed = lm.arch.unembedding()[0].detach().float().cpu()
        self.e_t = unembed[torch.tensor([c.target_id for c in self.cases])]
        self.seqs: list[list[int]] = []
        self.n_scored: list[int] = []
        owner: list[int] = []
        for r, c in enumerate(self.cases):
            self.seqs += c.seqs
            self.n_scored += c.n_scored
            owner += [r] * len(c.seqs)
        self.owner = torch.tensor(owner)
        self.grid = [(layers[0], 0.0)] + [(layer, eta) for layer in layers for eta in etas]
        """(layer, eta) of every point: the unedited point, then layer-major, eta-minor."""

    def points(self, shard: Shard | None = None) -> list[int]:
        """Grid positions of ``shard`` (``p mod N == K``; None: every point)."""
        shard = shard or Shard()
        return [p for p in range(len(self.grid)) if shard.owns(p)]

    def point(self, p: int) -> SweepPoint:
        """The mean metrics of grid point ``p`` over the records."""
        layer, eta = self.grid[p]
        lm = self.lm
        rows = ShiftRows(self.x_by_layer[layer], self.e_t, ~self.predicted)
        rows.eta = eta
        module = lm.arch.resolve(layer, "ff2").module

        def on_batch(idx: list[int]) -> None:
            rows.rows = self.owner[idx]

        with Hooks() as hooks:
            hooks.forward(module, rows.hook)
            scored = score_sequences(
                lm, self.seqs, self.n_scored, batch_size=self.batch_size, on_batch=on_batch
            )
            flu, ppl = fluency_of(
                lm, self.cases, self.fluency_settings, self.batch_size, rows, eta > 0
            )
        return point_of(layer if eta else -1, eta, self.cases, scored, flu, ppl)
