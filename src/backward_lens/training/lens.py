"""The training lens for any loop: record a step's factors, read them, stream them to a folder.

Plain PyTorch::

    lens = TrainingLens(model, tokenizer, out_dir="runs/eiffel", every=10)
    for step in range(1, steps + 1):
        with lens.step(step):              # records only on steps that are read
            for batch in micro_batches:    # gradient accumulation: factors add up
                model(**batch).loss.backward()
        optimizer.step(); optimizer.zero_grad()
        lens.log(step, loss=...)
    lens.close()

Hugging Face ``Trainer``: :class:`~backward_lens.training.callback.BackwardLensCallback`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from backward_lens.errors import InputError
from backward_lens.models import LensModel
from backward_lens.training.reading import UpdateReading, read_factors
from backward_lens.training.recorder import Recording, record
from backward_lens.training.runlog import RunFolder, check_run_folder
from backward_lens.training.targets import base_model, select_targets
from backward_lens.training.tensorboard import TensorBoardLogger, summary_writer


class TrainingLens:
    """Reads what each training step teaches the selected matrices (see the module docstring).

    Args:
        model: the model the loop calls (a Hugging Face causal LM, possibly PEFT-wrapped).
        tokenizer: its tokenizer (labels tokens in the readings).
        out_dir: a new or empty run folder to stream readings to (``lens.jsonl``,
            ``log.jsonl``, ``run.json``), or None to keep only :attr:`last`.
        every: read step 1, every ``every``-th step, and the step given as ``last_step``.
        last_step: the final step, also read (None: unknown).
        layers, matrices, include_frozen: what to read (see
            :func:`~backward_lens.training.targets.select_targets`).
        directions, top_tokens, contributors: size of each reading (see :func:`read_factors`).
        tensorboard: also log to TensorBoard in ``out_dir/tensorboard`` (needs the package).
        settings: extra entries for ``run.json``.

    Raises:
        OutputPathError: ``out_dir`` is a file or a folder that is not empty.
        InputError: bad sizes, no trainable matrix selected, gradient checkpointing on (its
            recomputed forward pass would record every input twice), TensorBoard requested
            without the package or without ``out_dir``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        out_dir: str | Path | None = None,
        every: int = 10,
        last_step: int | None = None,
        layers: Sequence[int] | None = None,
        matrices: Sequence[str] | None = None,
        include_frozen: bool = False,
        directions: int = 3,
        top_tokens: int = 5,
        contributors: int = 5,
        tensorboard: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> None:
        for name, value in (
            ("every", every),
            ("directions", directions),
            ("top_tokens", top_tokens),
            ("contributors", contributors),
        ):
            if value < 1:
                raise InputError(f"{name} must be at least 1 (got {value})")
        inner = base_model(model)
        checkpointing = getattr(inner, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(inner, "is_gradient_checkpointing", False)
        if checkpointing:
            raise InputError(
                "the training lens cannot read a model with gradient checkpointing on (the "
                "recomputed forward pass would record every input twice); turn it off"
            )
        if tensorboard and out_dir is None:
            raise InputError("TensorBoard logging needs a run folder (out_dir)")
        self.model = model
        self.lm = LensModel(inner, tokenizer, getattr(inner.config, "name_or_path", "model"))
        self.targets = select_targets(
            model, layers=layers, matrices=matrices, include_frozen=include_frozen
        )
        self.every = every
        self.last_step = last_step
        self.directions = directions
        self.top_tokens = top_tokens
        self.contributors = contributors
        self.last: list[UpdateReading] = []
        self.last_recording: Recording | None = None
        self.run: RunFolder | None = None
        self.board: TensorBoardLogger | None = None
        if out_dir is not None:
            self.run = RunFolder(check_run_folder(out_dir))
            if tensorboard:
                self.board = TensorBoardLogger(summary_writer(self.run.path / "tensorboard"))
            self.run.write_settings(
                {
                    "model": self.lm.name,
                    "model_type": getattr(inner.config, "model_type", ""),
                    "n_layers": self.lm.n_layers,
                    "layers": sorted({t.layer for t in self.targets}),
                    "matrices": list(dict.fromkeys(t.name for t in self.targets)),
                    "frozen_read": sorted(
                        {f"{t.name}@{t.layer}" for t in self.targets if not t.trainable}
                    ),
                    "lora": any(t.adapter == "lora" for t in self.targets),
                    "every": every,
                    "last_step": last_step,
                    "directions": directions,
                    "top_tokens": top_tokens,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    **(settings or {}),
                }
            )

    def due(self, step: int) -> bool:
        """Whether ``step`` (1-based) is read: the first, every ``every``-th, and the last."""
        return step == 1 or step % self.every == 0 or step == self.last_step

    @contextmanager
    def record(self) -> Iterator[Recording]:
        """Record every forward (and backward) pass in the context; hooks removed on exit."""
        with record(self.model, self.targets) as rec:
            yield rec

    def read(self, rec: Recording, step: int) -> list[UpdateReading]:
        """Read a finished recording, stream it to the run folder, keep it in :attr:`last`."""
        factors = rec.factors()
        readings = read_factors(
            self.lm,
            factors,
            step=step,
            directions=self.directions,
            top_tokens=self.top_tokens,
            contributors=self.contributors,
        )
        if self.run is not None:
            for r in readings:
                # The loss each forward call of the step returned (one per micro-batch), as the
                # model computed it (mean or sum over tokens, whatever the loop asked for).
                self.run.lens.write({**r.to_dict(), "model_losses": rec.losses})
        if self.board is not None:
            self.board.readings(readings)
        self.last = readings
        return readings

    @contextmanager
    def step(self, step: int) -> Iterator[Recording | None]:
        """Around one optimizer step's forward and backward passes (all micro-batches).

        On a step that is read (:meth:`due`), records and, when the block ends normally, reads
        it (:meth:`read`); otherwise yields None and does nothing. If the block raises, the
        hooks are removed and nothing is read or written.
        """
        if not self.due(step):
            yield None
            return
        with self.record() as rec:
            yield rec
        self.last_recording = rec
        self.read(rec, step)

    def log(self, step: int, **values: Any) -> None:
        """Append ``{"step": step, **values}`` to ``log.jsonl`` (and TensorBoard)."""
        if self.run is not None:
            self.run.log.write({"step": step, **values})
        if self.board is not None:
            self.board.log(step, values)

    def close(self) -> None:
        """Close the run folder's files and the TensorBoard writer (idempotent)."""
        if self.run is not None:
            self.run.close()
        if self.board is not None:
            self.board.close()
            self.board = None
