"""``BackwardLensCallback``: the training lens inside a Hugging Face ``Trainer``.

On each step that is read, hooks go on at ``on_step_begin`` (before the first micro-batch) and
come off at ``on_step_end`` (after the optimizer step), so the factors of every micro-batch of a
gradient-accumulation step are recorded; the step is then read and streamed to the run folder. The
reading is of the accumulated gradient *before* clipping (``max_grad_norm`` rescales the whole
gradient by one positive number: the words are the same, the norms larger than the clipped ones).

If ``trainer.train()`` raises in the middle of a read step, the Trainer calls no callback; the
hooks of that step are removed by :meth:`BackwardLensCallback.close`, so use the callback as a
context manager around training::

    with BackwardLensCallback(model, tokenizer, "runs/x", every=10) as lens:
        Trainer(model=model, ..., callbacks=[lens]).train()
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback

from backward_lens.training.lens import TrainingLens
from backward_lens.training.recorder import Recording


class BackwardLensCallback(TrainerCallback):
    """Read every ``every``-th training step (and the first and last) into ``out_dir``.

    Args:
        model: the model given to the Trainer (possibly PEFT-wrapped).
        tokenizer: its tokenizer.
        out_dir: the run folder (see :mod:`backward_lens.training.runlog`), or None to keep the
            readings in memory only (:attr:`history`).
        every: read step 1, every ``every``-th step and the last one (``max_steps``).
        keep_history: keep every reading in :attr:`history` (default: only with no
            ``out_dir``).
        **options: the other :class:`~backward_lens.training.lens.TrainingLens` arguments
            (layers, matrices, include_frozen, directions, top_tokens, contributors,
            tensorboard, settings).

    Attributes:
        lens: the :class:`TrainingLens`.
        history: every reading so far, when ``keep_history`` is True (default: only with
            no ``out_dir``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        out_dir: str | Path | None = None,
        *,
        every: int = 10,
        keep_history: bool | None = None,
        **options: Any,
    ) -> None:
        self.lens = TrainingLens(model, tokenizer, out_dir=out_dir, every=every, **options)
        self.keep_history = out_dir is None if keep_history is None else keep_history
        self.history: list[Any] = []
        self.recording: Recording | None = None
        self._stack: ExitStack | None = None

    # -- hooks on and off -----------------------------------------------------------------------

    def _stop(self) -> Recording | None:
        rec, stack = self.recording, self._stack
        self.recording, self._stack = None, None
        if stack is not None:
            stack.close()
        return rec

    def close(self) -> None:
        """Remove any hooks still registered and close the run folder (idempotent)."""
        self._stop()
        self.lens.close()

    def __enter__(self) -> BackwardLensCallback:
        """Use the callback as a context manager around ``trainer.train()``."""
        return self

    def __exit__(self, *exc: object) -> None:
        """:meth:`close`, also when training raised (the hooks of an open step come off)."""
        self.close()

    # -- TrainerCallback ------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close a step a previous ``train()`` left open; learn the last step from ``max_steps``."""
        self._stop()  # a previous train() that raised may have left a step open
        if state.max_steps and state.max_steps > 0:
            self.lens.last_step = int(state.max_steps)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Put the recording hooks on if step ``global_step + 1`` is due (``TrainingLens.due``)."""
        self._stop()
        if self.lens.due(state.global_step + 1):
            stack = ExitStack()
            self.recording = stack.enter_context(self.lens.record())
            self._stack = stack

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Take the hooks off after the optimizer step and read the step into the run folder."""
        rec = self._stop()
        if rec is not None:
            readings = self.lens.read(rec, state.global_step)
            if self.keep_history:
                self.history.extend(readings)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        """Forward the Trainer's logged scalars (loss, learning rate...) to the run's log."""
        if logs:
            self.lens.log(state.global_step, **logs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Take any hooks off and close the run folder."""
        self._stop()
        if self.lens.run is not None:
            self.lens.run.close()
