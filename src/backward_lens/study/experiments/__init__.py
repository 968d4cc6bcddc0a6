"""The experiment table: adding an experiment is one class and one entry here."""

from __future__ import annotations

from backward_lens.study.base import Experiment
from backward_lens.study.experiments.imprint_shift import ImprintShiftExperiment
from backward_lens.study.experiments.neurons import NeuronsExperiment
from backward_lens.study.experiments.norms import NormsExperiment
from backward_lens.study.experiments.original_rank import OriginalRankExperiment
from backward_lens.study.experiments.rank import RankExperiment
from backward_lens.study.experiments.similarity import SimilarityExperiment
from backward_lens.study.experiments.target_rank import TargetRankExperiment

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        RankExperiment(),
        NormsExperiment(),
        TargetRankExperiment(),
        OriginalRankExperiment(),
        SimilarityExperiment(),
        NeuronsExperiment(),
        ImprintShiftExperiment(),
    )
}
"""Experiment name -> instance, in the order of the issue (``compare`` is separate)."""

__all__ = ["EXPERIMENTS"]
