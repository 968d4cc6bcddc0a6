"""The training lens: what a fine-tuning run teaches each layer, step by step, in words.

- :mod:`~backward_lens.training.recorder`: factors of any loss, from the training's own passes.
- :mod:`~backward_lens.training.reading`: a batch's update as top singular directions, in words.
- :mod:`~backward_lens.training.lens`: :class:`TrainingLens` for a plain PyTorch loop.
- :mod:`~backward_lens.training.callback`: :class:`BackwardLensCallback` for the HF Trainer.
- :mod:`~backward_lens.training.finetune`: ``backward-lens finetune``'s fine-tune and report.
"""

from __future__ import annotations

from typing import Any

from backward_lens.training.lens import TrainingLens
from backward_lens.training.reading import DirectionReading, UpdateReading, read_factors
from backward_lens.training.recorder import MatrixFactors, Recording, record
from backward_lens.training.targets import Target, select_targets

__all__ = [
    "BackwardLensCallback",
    "DirectionReading",
    "MatrixFactors",
    "Recording",
    "Target",
    "TrainingLens",
    "UpdateReading",
    "read_factors",
    "record",
    "select_targets",
]


def __getattr__(name: str) -> Any:
    """``BackwardLensCallback`` imports ``transformers.TrainerCallback`` only when used."""
    if name == "BackwardLensCallback":
        from backward_lens.training.callback import BackwardLensCallback

        return BackwardLensCallback
    raise AttributeError(name)
