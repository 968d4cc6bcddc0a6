"""Optional TensorBoard logging of training-lens readings (needs the ``tensorboard`` package)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backward_lens.errors import InputError
from backward_lens.training.reading import UpdateReading


def summary_writer(folder: Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` writing to ``folder``.

    Raises:
        InputError: the ``tensorboard`` package is not installed (one line saying what to do).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError(
            "TensorBoard logging needs the tensorboard package: pip install tensorboard "
            "(or leave out --tensorboard; the run folder has every reading as JSON lines)"
        ) from None
    return SummaryWriter(log_dir=str(folder))


class TensorBoardLogger:
    """Write readings to any writer with ``add_scalar`` and ``add_text`` (a SummaryWriter).

    Per (layer, matrix): scalars ``lens/<matrix>/norm/L<layer>`` (the gradient's norm) and
    ``lens/<matrix>/sigma1/L<layer>``; text ``lens/<matrix>/L<layer>`` (the first direction's
    words). Losses go to ``train/<key>``.

    Args:
        writer: the writer (see :func:`summary_writer`); closed by :meth:`close`.
    """

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def readings(self, readings: list[UpdateReading]) -> None:
        """Write readings: norm and sigma_1 scalars, and the first direction's words as text."""
        for r in readings:
            tag = f"lens/{r.matrix}"
            self.writer.add_scalar(f"{tag}/norm/L{r.layer}", r.norm, r.step)
            if r.directions:
                self.writer.add_scalar(f"{tag}/sigma1/L{r.layer}", r.directions[0].sigma, r.step)
                self.writer.add_text(f"{tag}/L{r.layer}", " | ".join(r.words), r.step)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Write every numeric value of ``values`` as scalar ``train/<key>`` at ``step``."""
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        """Flush and close the writer (if it has those methods)."""
        flush = getattr(self.writer, "flush", None)
        if callable(flush):
            flush()
        close = getattr(self.writer, "close", None)
        if callable(close):
            close()
