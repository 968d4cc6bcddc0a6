"""Read a whole batch's update in words: per matrix, the top singular directions of its gradient.

For each recorded matrix the gradient sum_i x_i^T delta_i is split into its top-k singular
directions (:meth:`~backward_lens.lowrank.LowRankGradient.directions`, n x n work). The side of
each direction that lives in the residual stream is projected through the logit lens with the
paper's conventions: an input-side direction (FF1, the gate, Q/K/V) by its most probable tokens,
an output-side direction (FF2, O) by its least probable ones, because descent *subtracts* the
gradient, so the weight's output moves towards minus that direction. Each direction also names
the positions (and tokens) that write it: position i contributes (x_i . u)(delta_i . v) to its
singular value.

What this reads is the *gradient* of the step (summed over micro-batches, before clipping). SGD's
update is that gradient times -lr, so the directions and words are the update's. Adam divides each
weight entry by a running RMS of its past gradients (and uses a momentum average), an entry-wise
rescaling that is not low-rank and mixes in earlier steps: its update points roughly the same way
in the first steps (with bias correction its first step is close to -lr * sign(gradient)), but the
words describe what this step's data asks for, not the exact change Adam makes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from backward_lens.models import LensModel
from backward_lens.training.recorder import MatrixFactors


@dataclass
class Contributor:
    """One position that writes a direction.

    Attributes:
        token: the input token there; ``next_token``: the token after it (what the causal-LM
            loss trains that position to emit; "" at the end of a row).
        micro, row, column: where it is (micro-batch, row of the batch, column).
        weight: its share of the direction's singular value, (x_i . u)(delta_i . v) / sigma
            (the shares of all positions sum to 1; a negative one pulls the other way).
    """

    token: str
    next_token: str
    micro: int
    row: int
    column: int
    weight: float


@dataclass
class DirectionReading:
    """One singular direction of one matrix's gradient, in words.

    Attributes:
        sigma: its singular value (gradient units: loss per weight unit).
        share: sigma^2 / ||gradient||_F^2, the fraction of the gradient's energy it holds.
        words, word_ids, probs: the lens reading of its residual-stream side (top tokens of an
            input-side direction, bottom tokens of an output-side one, see the module docstring),
            with their lens probabilities.
        positions: the positions that write it most.
        sources: the input tokens that write it most, their shares summed over positions.
    """

    sigma: float
    share: float
    words: list[str]
    word_ids: list[int]
    probs: list[float]
    positions: list[Contributor] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class UpdateReading:
    """The reading of one matrix of one layer at one step: one JSON line of a run folder.

    Attributes:
        step: the optimizer step (1-based).
        layer, matrix: which weight.
        side: ``"in"`` or ``"out"``, the side read; ``reading``: ``"top"`` or ``"bottom"``.
        n_positions: positions with a non-zero VJP (outer products in the sum).
        norm: Frobenius norm of the step's gradient of this weight.
        trainable: whether the weight (or its LoRA adapter) trains.
        adapter: ``"lora"`` for a LoRA-adapted layer (the reading is that of the base weight's
            gradient G; LoRA's B and A get s G A^T and s B^T G), else None.
        directions: the top directions.
    """

    step: int
    layer: int
    matrix: str
    side: str
    reading: str
    n_positions: int
    norm: float
    trainable: bool
    adapter: str | None
    directions: list[DirectionReading]

    def to_dict(self) -> dict[str, Any]:
        """The JSON line (plain types only)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UpdateReading:
        """Rebuild a reading from :meth:`to_dict`'s output or a ``lens.jsonl`` line.

        Extra keys of a ``lens.jsonl`` line (such as ``model_losses``) are ignored.
        """
        dirs = []
        for d in data["directions"]:
            d = dict(d)
            d["positions"] = [Contributor(**p) for p in d.get("positions", [])]
            dirs.append(DirectionReading(**d))
        names = {f.name for f in fields(cls)} - {"directions"}
        return cls(**{k: v for k, v in data.items() if k in names}, directions=dirs)

    @property
    def words(self) -> list[str]:
        """The first direction's words (empty if the gradient is zero)."""
        return self.directions[0].words if self.directions else []


def read_factors(
    lm: LensModel,
    factors: list[MatrixFactors],
    *,
    step: int,
    directions: int = 3,
    top_tokens: int = 5,
    contributors: int = 5,
    normalized: bool = False,
) -> list[UpdateReading]:
    """Read every matrix's factors (one batched lens projection for all directions).

    Args:
        lm: the model being trained (its current final norm and unembedding are the lens).
        factors: from :meth:`~backward_lens.training.recorder.Recording.factors`.
        step: the step number written into each reading.
        directions: singular directions per matrix.
        top_tokens: words per direction.
        contributors: positions and source tokens listed per direction.
        normalized: L2-normalise before the lens (a no-op here: directions are unit vectors;
            kept for symmetry with ``explain``).

    Returns:
        One :class:`UpdateReading` per matrix, in the order of ``factors``.
    """
    hidden = int(lm.arch.unembedding()[0].shape[1])
    dirs = [f.gradient.directions(directions) for f in factors]
    vectors, owners = [], []
    for m, (f, d) in enumerate(zip(factors, dirs, strict=True)):
        side = d.left if f.target.side == "in" else d.right
        if d.k and side.shape[1] == hidden:
            vectors.append(side)
            owners += [(m, j) for j in range(d.k)]
    words_of: dict[tuple[int, int], tuple[list[int], list[float]]] = {}
    if vectors:
        proj = lm.lens.project(torch.cat(vectors).float(), k=top_tokens, normalized=normalized)
        for row, (m, j) in enumerate(owners):
            bottom = factors[m].target.side == "out"
            row_ids = proj.bottom_ids[row] if bottom else proj.top_ids[row]
            row_probs = proj.bottom_probs[row] if bottom else proj.top_probs[row]
            words_of[(m, j)] = (row_ids.tolist(), row_probs.tolist())
    wanted = {i for ids, _ in words_of.values() for i in ids}
    for f in factors:
        wanted.update(int(t) for t in f.token_ids.tolist() if t >= 0)
        wanted.update(int(t) for t in f.next_ids.tolist() if t >= 0)
    ordered = sorted(wanted)
    label = dict(zip(ordered, lm.decode(ordered), strict=True)) if ordered else {}

    out = []
    for m, (f, d) in enumerate(zip(factors, dirs, strict=True)):
        readings = []
        for j in range(d.k):
            sigma = float(d.singular_values[j])
            ids, probs = words_of.get((m, j), ([], []))
            share = d.contributions[:, j] / sigma if sigma > 0 else d.contributions[:, j] * 0
            readings.append(
                DirectionReading(
                    sigma=sigma,
                    share=sigma**2 / d.norm**2 if d.norm > 0 else 0.0,
                    words=[label[i] for i in ids],
                    word_ids=ids,
                    probs=probs,
                    positions=_positions(f, share, contributors, label),
                    sources=_sources(f, share, contributors, label),
                )
            )
        t = f.target
        out.append(
            UpdateReading(
                step=step,
                layer=t.layer,
                matrix=t.name,
                side=t.side,
                reading="top" if t.side == "in" else "bottom",
                n_positions=f.gradient.n,
                norm=d.norm,
                trainable=t.trainable,
                adapter=t.adapter,
                directions=readings,
            )
        )
    return out


def _positions(
    f: MatrixFactors, share: torch.Tensor, n: int, label: dict[int, str]
) -> list[Contributor]:
    order = share.argsort(descending=True)[:n].tolist()
    out = []
    for i in order:
        micro, row, col = (int(v) for v in f.positions[i].tolist())
        tok, nxt = int(f.token_ids[i]), int(f.next_ids[i])
        out.append(
            Contributor(
                token=label.get(tok, "?"),
                next_token=label.get(nxt, ""),
                micro=micro,
                row=row,
                column=col,
                weight=float(share[i]),
            )
        )
    return out


def _sources(
    f: MatrixFactors, share: torch.Tensor, n: int, label: dict[int, str]
) -> list[dict[str, Any]]:
    """Shares summed per input token id, the largest first."""
    ids = f.token_ids.to(share.device)
    if ids.numel() == 0:
        return []
    unique, inverse = ids.unique(return_inverse=True)
    sums = torch.zeros(unique.numel(), dtype=share.dtype, device=share.device)
    sums.index_add_(0, inverse, share)
    order = sums.argsort(descending=True)[:n].tolist()
    return [{"token": label.get(int(unique[i]), "?"), "weight": float(sums[i])} for i in order]
