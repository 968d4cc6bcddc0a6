"""Every record's shift at once: a forward hook with one shift per batch row.

FF2_l <- FF2_l + eta * x_n^T e_t changes FF2's output at any position with input x by
eta * (x . x_n) * e_t, so a forward hook adds exactly that with each row's own x_n and e_t
(:class:`ShiftRows`): all records of a grid point share batched forward passes, for scoring and
for the fluency measurements (:func:`fluency_of`) alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from backward_lens.evaluation.metrics import fluency, generate_texts, perplexities
from backward_lens.evaluation.sweep.cases import Case
from backward_lens.evaluation.sweep.rule import FluencySettings, fluency_seeds
from backward_lens.evaluation.texts import PERPLEXITY_TEXTS
from backward_lens.models import LensModel


class ShiftRows:
    """Forward hook on one FF2 adding eta * (x . x_n[r]) * e_t[r] for each row's record r.

    Args:
        x_n: each record's FF2 input at its last prompt token [R, d_ff].
        e_t: each record's target unembedding [R, d].
        active: which records are shifted [R] bool (not those already predicting the target).
    """

    def __init__(self, x_n: Tensor, e_t: Tensor, active: Tensor) -> None:
        self.x_n, self.e_t, self.active = x_n, e_t, active  # [R, d_ff], [R, d], [R] bool
        self.eta = 0.0
        self.rows = torch.zeros(0, dtype=torch.long)

    def hook(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        """FF2's output [B, T, d] plus each row's shift (unchanged while ``eta`` is 0)."""
        if self.eta == 0.0:
            return output
        x = args[0]
        batch = len(self.rows)
        xs = x.reshape(batch, -1, x.shape[-1])
        coef = torch.einsum("btm,bm->bt", xs, self.x_n[self.rows].to(xs.dtype))
        scale = (self.eta * self.active[self.rows].to(xs.dtype))[:, None]
        extra = (coef * scale)[..., None] * self.e_t[self.rows].to(xs.dtype)[:, None, :]
        return output + extra.reshape(output.shape)


def fluency_of(
    lm: LensModel,
    cases: Sequence[Case],
    settings: FluencySettings,
    batch_size: int,
    rows: ShiftRows,
    edited: bool,
) -> tuple[float, float]:
    """Mean n-gram entropy and mean perplexity over the first ``settings.records`` cases.

    Each case is measured with its own record's shift (``rows``, already hooked in); NaN when not
    measured. The unedited model's perplexity is the same for every record: scored once.

    Returns:
        (mean n-gram entropy, mean perplexity).
    """
    mine = list(cases[: settings.records])
    if not mine:
        return math.nan, math.nan
    prompts: list[str] = []
    seeds: list[int] = []
    owner: list[int] = []
    for r, c in enumerate(mine):
        prompts += c.prompts.generation
        seeds += fluency_seeds(settings.seed, c.case_id, len(c.prompts.generation))
        owner += [r] * len(c.prompts.generation)
    owner_t = torch.tensor(owner)

    def set_rows(idx: list[int]) -> None:
        rows.rows = owner_t[idx]

    texts = generate_texts(
        lm,
        prompts,
        seeds,
        max_length=settings.generation_length,
        top_k=settings.top_k,
        batch_size=batch_size,
        on_batch=set_rows,
    )
    per_record = [
        fluency([t for t, o in zip(texts, owner, strict=True) if o == r]) for r in range(len(mine))
    ]
    values = [e for e in per_record if e is not None]
    entropy = sum(values) / len(values) if values else math.nan
    ppl_texts = list(PERPLEXITY_TEXTS[: settings.ppl_texts])
    if not ppl_texts:
        return entropy, math.nan
    # the unedited model gives every record the same perplexity: score the texts once
    n_rec = len(mine) if edited else 1
    ppl_owner = torch.tensor([r for r in range(n_rec) for _ in ppl_texts])

    def set_ppl_rows(idx: list[int]) -> None:
        rows.rows = ppl_owner[idx]

    ppls = perplexities(
        lm,
        ppl_texts * n_rec,
        max_tokens=settings.ppl_max_tokens,
        batch_size=batch_size,
        on_batch=set_ppl_rows,
    )
    return entropy, sum(ppls) / len(ppls)
