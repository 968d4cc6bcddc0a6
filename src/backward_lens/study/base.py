"""What an experiment is: measure one record, aggregate many, draw and state the finding.

An experiment never touches files or loops over data: :mod:`backward_lens.study.runner` does the
sampling, batching, streaming, resuming and writing, so adding an experiment is one class and one
entry in :data:`backward_lens.study.experiments.EXPERIMENTS`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

from backward_lens.adapters import Architecture
from backward_lens.capture import Capture
from backward_lens.data import FactRecord
from backward_lens.io import to_jsonable
from backward_lens.models import LensModel
from backward_lens.study.segments import SEGMENTS, Segmentation
from backward_lens.tokens import EncodedRequest


@dataclass
class StudyOptions:
    """Experiment knobs (each experiment reads the ones it needs; all are saved with the run).

    Attributes:
        layer: the block studied by ``neurons`` and ``imprint-shift`` (default: see each).
        lr: SGD learning rate of the ``imprint-shift`` step.
        top: tokens compared per vector by ``neurons`` (the paper's top-100 overlap).
        max_neurons: ``neurons`` analyses this many highest-norm neurons per matrix (0 = all).
    """

    # The metadata makes the command-line options (backward_lens.commands.options).
    layer: int | None = field(
        default=None,
        metadata={
            "help": "neurons / imprint-shift: the block to study (negative: from the end)",
            "default_help": "61% / 50% of the depth",
        },
    )
    lr: float = field(default=1.0, metadata={"help": "imprint-shift: SGD learning rate"})
    top: int = field(
        default=100,
        metadata={
            "help": "neurons: top tokens compared",
            "min": 1,
            "flag": "--top-k",
            "aliases": ["--top"],
        },
    )
    max_neurons: int = field(
        default=512,
        metadata={"help": "neurons: analyse this many highest-norm neurons per matrix, 0 = all"},
    )

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-ready dict (saved in the run's ``config.json``)."""
        return asdict(self)

    def resolve_layer(self, arch: Architecture, default: int) -> int:
        """The studied block: ``layer``, else the experiment's default, as 0..n_layers-1.

        Args:
            arch: the model's architecture (``lm.arch``), whose depth bounds the layer.
            default: the experiment's block when ``layer`` is None (negative: from the end).

        Raises:
            InputError: a layer the model does not have (``Architecture.layer_index``).
        """
        layer = self.layer if self.layer is not None else default
        return arch.layer_index(layer, "--layer")


@dataclass
class Item:
    """One sampled record, encoded and segmented, ready to capture."""

    index: int
    key: str
    record: FactRecord
    request: EncodedRequest
    segmentation: Segmentation


@dataclass
class Aggregate:
    """An experiment's aggregated numbers.

    Attributes:
        table: long-format rows (one dict per row) for the CSV and ``to_dataframe``.
        curves: label -> {"x": normalised layer index, "y": values}, what ``compare`` overlays.
        headline: the few numbers the summary and the README quote.
        extra: anything else the figure needs (matrices, per-record detail).
    """

    table: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    headline: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The aggregate as JSON (NaN and infinities as null, numpy values as Python ones)."""
        return clean_json(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Aggregate:
        """Inverse of :meth:`to_dict` (missing parts are empty)."""
        return cls(
            data.get("table", []),
            data.get("curves", {}),
            data.get("headline", {}),
            data.get("extra", {}),
        )

    def to_dataframe(self) -> Any:
        """The long-format ``table`` as a pandas ``DataFrame``."""
        import pandas as pd

        return pd.DataFrame(self.table)


class Experiment:
    """Base class: subclasses set the class attributes and implement the four methods."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    """Where the paper shows this analysis, and its finding (quoted in summaries)."""
    matrices: ClassVar[tuple[str, ...] | None] = ("ff1", "ff2")
    """Matrices to capture (None: the adapter's MLP matrices, gate included)."""
    max_records: ClassVar[int | None] = None

    def measure(
        self, lm: LensModel, item: Item, capture: Capture, options: StudyOptions
    ) -> dict[str, Any]:
        """Raw values of one record (JSON-serialisable; enough to re-aggregate)."""
        raise NotImplementedError

    def aggregate(self, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Aggregate:
        """Reduce every record's :meth:`measure` row to tables, curves and headline numbers.

        Args:
            rows: the rows of all records, in record order.
            meta: the run's metadata (``model``, ``n_layers``, ``vocab_size``, ``options``...).
        """
        raise NotImplementedError

    def figure(self, agg: Aggregate, meta: dict[str, Any]) -> Any:
        """A matplotlib figure of the aggregate."""
        raise NotImplementedError

    def finding(self, agg: Aggregate, meta: dict[str, Any]) -> str:
        """One or two sentences stating the finding with its numbers (markdown)."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------
# helpers shared by experiments


def rounded(values: Any, digits: int = 6) -> Any:
    """Nested lists of floats with ``digits`` significant digits (NaN -> None) for JSONL."""
    arr = np.asarray(values, dtype=float)

    def r(v: float) -> float | None:
        if not math.isfinite(v):
            return None
        return float(f"{v:.{digits}g}")

    if arr.ndim == 0:
        return r(float(arr))
    return np.vectorize(r, otypes=[object])(arr).tolist()


def as_array(values: Any) -> np.ndarray:
    """Inverse of :func:`rounded`: None -> NaN."""
    return np.array(
        [[np.nan if v is None else v for v in row] for row in values]
        if values and isinstance(values[0], list)
        else [np.nan if v is None else v for v in values],
        dtype=float,
    )


def clean_json(obj: Any) -> Any:
    """Plain JSON data: NaN/inf as None, numpy values as Python ones (``io.to_jsonable``)."""
    return to_jsonable(obj)


def layer_axis(n_layers: int) -> list[float]:
    """Normalised layer index l / (L - 1), so models of different depth overlay."""
    return [i / max(1, n_layers - 1) for i in range(n_layers)]


def segment_means(
    rows: Sequence[dict[str, Any]], key: str
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Per segment, the mean over records of each record's mean over the segment's positions.

    ``row[key]`` is a [layers, n] array, ``row["segments"]`` the segment -> positions map.
    Returns segment -> [layers] means (NaN where no record has the segment) and record counts.
    """
    sums: dict[str, list[np.ndarray]] = {s: [] for s in SEGMENTS}
    for row in rows:
        values = as_array(row[key])  # [L, n]
        for seg, pos in row["segments"].items():
            if pos:
                with np.errstate(all="ignore"):
                    sums[seg].append(np.nanmean(values[:, pos], axis=1))
    means: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for seg, parts in sums.items():
        counts[seg] = len(parts)
        if parts:
            with np.errstate(all="ignore"), quiet_warnings():
                means[seg] = np.nanmean(np.stack(parts), axis=0)
    return means, counts


@contextmanager
def quiet_warnings() -> Iterator[None]:
    """Silence numpy's 'mean of empty slice' warnings (all-NaN columns are expected)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def segment_table(
    means: dict[str, np.ndarray], counts: dict[str, int], n_layers: int, value: str
) -> list[dict[str, Any]]:
    """Long-format rows: segment, layer, normalised layer, value, records."""
    axis = layer_axis(n_layers)
    return [
        {
            "segment": seg,
            "layer": layer,
            "layer_norm": axis[layer],
            value: float(means[seg][layer]),
            "records": counts[seg],
        }
        for seg in SEGMENTS
        if seg in means
        for layer in range(n_layers)
    ]


def ordered_segments(means: dict[str, Any]) -> list[str]:
    """The segments present in ``means``, in :data:`SEGMENTS` display order."""
    return [s for s in SEGMENTS if s in means]


def chunked_ranks(
    lm: LensModel, vectors: Any, token: int, normalized: bool, chunk: int = 128
) -> np.ndarray:
    """Rank of ``token`` in the lens projection of each row of ``vectors`` [N, d] -> [N]."""
    import torch

    vectors = vectors.reshape(-1, vectors.shape[-1])
    parts = [
        lm.lens.rank_of(vectors[s : s + chunk], token, normalized=normalized)
        for s in range(0, vectors.shape[0], chunk)
    ]
    return torch.cat(parts).numpy() if parts else np.zeros(0)
