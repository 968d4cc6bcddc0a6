"""What a click on a grid cell shows: the vector under both lenses and the neurons it dominates.

The gradient of FF1 (or FF2) is sum_i x_i^T delta_i. Its d-sized "neurons" (paper Eqs. 9-10) are
FF1: n_j = sum_i delta_i[j] x_i (one per hidden unit j, in the input space), and
FF2: n_j = sum_i x_i[j] delta_i (one per hidden unit j, in the output space).
Position i contributes a term of norm |delta_i[j]| ||x_i|| (FF1) or |x_i[j]| ||delta_i|| (FF2) to
neuron j; the cell "dominates" neuron j when its term is the largest one. We list the dominated
neurons with the largest norms, read through the lens the same way as the cell (FF1 from the top,
FF2 from the bottom). Everything is computed from the factors (n x d_ff work, no dense gradient).
"""

from __future__ import annotations

import torch.nn.functional as F

from backward_lens.capture import Capture
from backward_lens.errors import InputError
from backward_lens.lens import Projection
from backward_lens.models import LensModel
from backward_lens.schema import CellGradient, CellNeuron, CellReading, CellReply


def _reading(lm: LensModel, proj: Projection, row: int) -> CellReading:
    """Row ``row`` of a projection as top/bottom tokens, their probabilities, the target's rank."""
    return CellReading(
        top=lm.decode(proj.top_ids[row].tolist()),
        top_probs=proj.top_probs[row].tolist(),
        bottom=lm.decode(proj.bottom_ids[row].tolist()),
        bottom_probs=proj.bottom_probs[row].tolist(),
        target_rank=int(proj.target_rank[row]) if proj.target_rank is not None else None,
    )


def cell_details(
    lm: LensModel,
    cap: Capture,
    matrix: str,
    layer: int,
    position: int,
    *,
    k: int = 5,
    n_neurons: int = 10,
    normalized: bool = False,
) -> CellReply:
    """Details of one cell (``matrix`` ``ff1`` or ``ff2``, block ``layer``, token ``position``).

    Returns the reply of ``POST /api/cell`` (``schema.CellReply``): the vector (x_i for FF1,
    delta_i for FF2) under the raw and the normalised lens, this position's share of the layer's
    gradient, and its top dominated neurons.

    Args:
        lm: the model the capture was made with.
        cap: the capture.
        matrix: ``ff1`` (the cell's vector is x_i) or ``ff2`` (delta_i).
        layer: a captured block index.
        position: the token position i.
        k: tokens shown per lens reading.
        n_neurons: most neurons listed (those this position dominates, largest norm first).
        normalized: read the neurons under the normalised lens (the vector is read under both).

    Raises:
        InputError: ``matrix`` is not ``ff1``/``ff2``, ``position`` is outside ``[0, n)``, or
            ``layer`` was not captured.
    """
    if matrix not in ("ff1", "ff2"):
        raise InputError(f"matrix must be ff1 or ff2, not {matrix!r}")
    if not 0 <= position < cap.n:
        raise InputError(f"position must be from 0 to {cap.n - 1} (got {position})")
    g = cap.gradient(layer, matrix)
    x, delta = g.x.float(), g.delta.float()
    vector = x[position] if matrix == "ff1" else delta[position]  # [d]
    target = cap.target_id
    lens = {
        name: _reading(lm, lm.lens.project(vector[None], k=k, target=target, normalized=flag), 0)
        for name, flag in (("raw", False), ("normalized", True))
    }

    if matrix == "ff1":  # neurons in the input space: coefficient delta_i[j] on x_i
        coef, side = delta, x
        neuron_norms = g.input_space_neuron_norms()
    else:  # neurons in the output space: coefficient x_i[j] on delta_i
        coef, side = x, delta
        neuron_norms = g.output_space_neuron_norms()
    terms = coef.abs() * side.norm(dim=1, keepdim=True)  # [n, d_ff]: |coef_i[j]| * ||side_i||
    owner = terms.argmax(dim=0)  # [d_ff]
    dominated = (owner == position).nonzero().flatten()
    order = neuron_norms[dominated].argsort(descending=True)[:n_neurons]
    index = dominated[order]
    neurons: list[CellNeuron] = []
    if index.numel():
        vectors = (
            g.input_space_neurons(index) if matrix == "ff1" else g.output_space_neurons(index)
        ).float()  # [m, d]
        proj = lm.lens.project(vectors, k=k, target=target, normalized=normalized)
        total = terms[:, index].sum(0)
        cosine = F.cosine_similarity(vectors, side[position][None], dim=-1)
        for row, j in enumerate(index.tolist()):
            neurons.append(
                CellNeuron(
                    index=j,
                    norm=float(neuron_norms[j]),
                    share=float(terms[position, j] / total[row]) if total[row] > 0 else 0.0,
                    coefficient=float(coef[position, j]),
                    cosine=float(cosine[row]),
                    **_reading(lm, proj, row).model_dump(),
                )
            )
    term_norms = g.position_norms().float()
    return CellReply(
        matrix="ff1" if matrix == "ff1" else "ff2",
        layer=int(layer),
        position=position,
        token=cap.tokens[position],
        normalized=normalized,
        norm=float(vector.norm()),
        lens=lens,
        gradient=CellGradient(
            rank=g.rank(),
            norm=g.norm(),
            position_term_norm=float(term_norms[position]),
            position_term_share=float(term_norms[position] / term_norms.sum().clamp_min(1e-30)),
            n_neurons=int(neuron_norms.numel()),
            n_dominated=int(dominated.numel()),
        ),
        neurons=neurons,
        reading="top" if matrix == "ff1" else "bottom",
    )
