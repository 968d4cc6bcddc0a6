"""The backward lens of one prompt: per layer and position, what FF1 imprints and FF2 shifts.

:func:`explain` runs one capture and one batched projection of the whole (layer x position x
matrix) grid, and returns an :class:`Explanation`, the in-memory form of the JSON contract that
the CLI writes (``to_dict``, ``to_json``; its schema is ``backward_lens.schema.ExplainDocument``,
published as ``schemas/explain.v1.json``) and a pandas view (``to_dataframe``); figures: ``plots``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from backward_lens.capture import Capture, capture
from backward_lens.errors import InputError
from backward_lens.io import atomic_write_text, dumps
from backward_lens.models import LensModel
from backward_lens.schema import SCHEMA_VERSION
from backward_lens.tokens import MultiTokenPolicy

READING = {"ff1": ("x", "top"), "ff2": ("delta", "bottom")}
"""The paper's reading conventions: FF1 projects its inputs x_i and is read by its most probable
tokens; FF2 projects its VJPs delta_i and is read by its least probable ones (descent subtracts)."""


@dataclass
class PositionReading:
    """The lens reading of one vector (x_i for FF1, delta_i for FF2) at one position."""

    token: str
    norm: float
    coef_norm: float
    """Norm of the other factor at this position (FF1: ||delta_i^FF1||, FF2: ||x_i^FF2||)."""
    top: list[str]
    top_probs: list[float]
    bottom: list[str]
    bottom_probs: list[float]
    target_rank: int
    """Rank of this position's target token (see ``Capture.position_targets``) in the reading."""
    token_id: int = -1
    top_ids: list[int] = field(default_factory=list)
    bottom_ids: list[int] = field(default_factory=list)
    target_id: int = -1
    """The token ``target_rank`` ranks: the first target token, or under teacher forcing the
    token this position is trained to emit."""


@dataclass
class MatrixReading:
    """One matrix of one layer: the gradient's rank and the reading of each position."""

    rank: int
    positions: list[PositionReading] = field(default_factory=list)


@dataclass
class LayerReading:
    """The readings of one block's MLP matrices (``gate``: gated MLPs only, its rank only)."""

    layer: int
    ff1: MatrixReading
    ff2: MatrixReading
    gate: MatrixReading | None = None


@dataclass(frozen=True)
class TargetToken:
    """The target the gradients are taken towards."""

    text: str
    """The target text as encoded (a space may have been prepended)."""
    token_id: int
    """The token the loss and the ranks use (the first of ``all_token_ids``)."""
    token: str
    """``token_id`` decoded."""
    all_token_ids: list[int]
    """Every token of the target text."""
    trained_token_ids: list[int]
    """The tokens the loss is taken over (the first only, or all under teacher forcing)."""
    all_tokens: list[str]
    """``all_token_ids`` decoded."""


@dataclass(frozen=True)
class PredictedToken:
    """The model's own next token at the last prompt position, and its probability."""

    token: str
    token_id: int
    prob: float


@dataclass
class Explanation:
    """The backward lens of one (prompt, target) pair; ``to_dict`` is the JSON contract."""

    model: str
    vocab_size: int
    prompt: str
    tokens: list[str]
    token_ids: list[int]
    target: TargetToken
    prediction: PredictedToken
    loss: float
    layers: list[LayerReading]
    top_k: int
    normalized: bool
    target_prob: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract as plain data (``schema_version`` first; no ``gate`` if None).

        Matches ``backward_lens.schema.ExplainDocument`` (``schemas/explain.v1.json``).
        """
        data = {"schema_version": SCHEMA_VERSION, **asdict(self)}
        for layer in data["layers"]:
            if layer["gate"] is None:
                del layer["gate"]
        return data

    def to_json(self, path: str | Path | None = None, indent: int | None = 1) -> str:
        """:meth:`to_dict` as JSON text, also written atomically to ``path`` when given.

        NaN and infinities are kept as ``NaN`` / ``Infinity`` (see ``io.dumps``).
        """
        text = dumps(self.to_dict(), indent=indent, finite=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    def to_dataframe(self) -> Any:
        """One row per (layer, matrix, position) with the reading's fields."""
        import pandas as pd

        rows = []
        for layer_reading in self.layers:
            for name in ("ff1", "ff2"):
                mr: MatrixReading = getattr(layer_reading, name)
                for i, p in enumerate(mr.positions):
                    rows.append(
                        {
                            "layer": layer_reading.layer,
                            "matrix": name,
                            "position": i,
                            "token": p.token,
                            "token_id": p.token_id,
                            "rank": mr.rank,
                            "norm": p.norm,
                            "coef_norm": p.coef_norm,
                            "top": p.top[0] if p.top else "",
                            "bottom": p.bottom[0] if p.bottom else "",
                            "target_rank": p.target_rank,
                        }
                    )
        return pd.DataFrame(rows)

    def grid(self, matrix: str, key: str) -> list[list[Any]]:
        """``key`` of every position of ``matrix`` as a [layer][position] list."""
        return [
            [getattr(p, key) for p in getattr(layer_reading, matrix).positions]
            for layer_reading in self.layers
        ]

    def reading(self, matrix: str) -> str:
        """Which side of the projection the paper reads for ``matrix``: ``top`` or ``bottom``."""
        return READING[matrix][1]


def explain(
    lm: LensModel,
    prompt: str,
    target: str,
    *,
    top_k: int = 3,
    normalized: bool = False,
    layers: Sequence[int] | None = None,
    multi_token: MultiTokenPolicy = "error",
    add_space: bool = True,
    matrices: Sequence[str] | None = None,
) -> Explanation:
    """Capture the gradients of ``prompt`` -> ``target`` and read them through the lens.

    Args:
        lm: the model.
        prompt: the prompt, e.g. "The Eiffel Tower is located in the city of".
        target: the new target, e.g. " Rome".
        top_k: tokens kept per vector on each side (most and least probable).
        normalized: use the normalised logit lens (L2-normalise before projecting, App. H).
        layers: which layers to read (default all).
        multi_token: what to do with a multi-token target (see ``encode_request``).
        add_space: prepend a space to a target without one.
        matrices: which matrices to capture (default all; the reading needs ``ff1`` and
            ``ff2``, so ``["ff1", "ff2"]`` leaves out the gate's rank and its memory). With
            ``layers`` it bounds what a big model's capture holds.

    Raises:
        InputError: ``matrices`` lacks ``ff1`` or ``ff2``.
    """
    if matrices is not None and not {"ff1", "ff2"} <= set(matrices):
        raise InputError(
            f"explain reads ff1 and ff2; --matrices {','.join(matrices)} leaves one out "
            "(give ff1,ff2, or ff1,gate,ff2)"
        )
    cap = capture(
        lm,
        prompt,
        target,
        layers=layers,
        matrices=matrices,
        multi_token=multi_token,
        add_space=add_space,
    )
    assert isinstance(cap, Capture)
    return explain_capture(lm, cap, top_k=top_k, normalized=normalized)


def explain_capture(
    lm: LensModel, cap: Capture, *, top_k: int = 3, normalized: bool = False
) -> Explanation:
    """Read an existing capture (one batched projection for both matrices and all layers)."""
    n_layers, n = len(cap.layers), cap.n
    ff1_x = cap.stack("ff1", "x")  # [L, n, d]
    ff2_d = cap.stack("ff2", "delta")  # [L, n, d]
    vectors = torch.cat([ff1_x.reshape(-1, ff1_x.shape[-1]), ff2_d.reshape(-1, ff2_d.shape[-1])])
    targets = cap.position_targets()  # [n]: each position's own target token
    proj = lm.lens.project(
        vectors, k=top_k, target=targets.repeat(2 * n_layers), normalized=normalized
    )
    proj = proj.reshape(2, n_layers, n)
    target_ranks = proj.target_rank
    assert target_ranks is not None
    ids = torch.cat([proj.top_ids.reshape(-1), proj.bottom_ids.reshape(-1)]).unique().tolist()
    words = dict(zip(ids, lm.decode(ids), strict=True))
    coef = {
        "ff1": cap.stack("ff1", "delta").float().norm(dim=-1),
        "ff2": cap.stack("ff2", "x").float().norm(dim=-1),
    }

    def reading(m: int, name: str, k: int) -> MatrixReading:
        g = cap.gradients[name][k]
        positions = [
            PositionReading(
                token=cap.tokens[i],
                norm=float(proj.norm[m, k, i]),
                coef_norm=float(coef[name][k, i]),
                top=[words[t] for t in proj.top_ids[m, k, i].tolist()],
                top_probs=proj.top_probs[m, k, i].tolist(),
                bottom=[words[t] for t in proj.bottom_ids[m, k, i].tolist()],
                bottom_probs=proj.bottom_probs[m, k, i].tolist(),
                target_rank=int(target_ranks[m, k, i]),
                token_id=cap.token_ids[i],
                top_ids=proj.top_ids[m, k, i].tolist(),
                bottom_ids=proj.bottom_ids[m, k, i].tolist(),
                target_id=int(targets[i]),
            )
            for i in range(n)
        ]
        return MatrixReading(rank=g.rank(), positions=positions)

    layer_readings = []
    for k, layer in enumerate(cap.layers):
        gate = (
            MatrixReading(rank=cap.gradients["gate"][k].rank()) if "gate" in cap.gradients else None
        )
        layer_readings.append(LayerReading(layer, reading(0, "ff1", k), reading(1, "ff2", k), gate))

    probs = cap.logits[0].softmax(-1)
    pred = cap.prediction_id
    return Explanation(
        model=lm.name,
        vocab_size=lm.vocab_size,
        prompt=cap.request.prompt,
        tokens=cap.tokens,
        token_ids=cap.token_ids,
        target=TargetToken(
            text=cap.request.target_text,
            token_id=cap.target_id,
            token=lm.decode([cap.target_id])[0],
            all_token_ids=list(cap.request.all_target_ids),
            trained_token_ids=list(cap.request.target_ids),
            all_tokens=lm.decode(list(cap.request.all_target_ids)),
        ),
        prediction=PredictedToken(
            token=lm.decode([pred])[0], token_id=pred, prob=float(probs[pred])
        ),
        loss=cap.loss,
        layers=layer_readings,
        top_k=top_k,
        normalized=normalized,
        target_prob=float(probs[cap.target_id]),
    )
