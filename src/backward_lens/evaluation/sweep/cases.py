"""The shift sweep's records as token sequences, and the one probe pass over their prompts.

Each record becomes a :class:`Case`: its prompts and the sequences every grid point scores. One
probe pass (:func:`probe`) records x_n, the input of FF2 at the last prompt token, at every
candidate layer, and whether the prompt already predicts the target (as in the official code,
such a record gets no shift).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from backward_lens.batching import Hooks
from backward_lens.data import FactRecord
from backward_lens.errors import BackwardLensError, InputError
from backward_lens.evaluation.metrics import RecordPrompts
from backward_lens.evaluation.scoring import encode_pair, score_sequences
from backward_lens.models import LensModel


@dataclass
class Case:
    """One usable record of the sweep, encoded once.

    Attributes:
        case_id: the record's id.
        prompts: its prompts.
        target_id: the first token of the new target (the shift's e_t).
        seqs: token ids of rewrite (new), paraphrases (new), neighbours (true), neighbours (new).
        n_scored: how many tokens at the end of each sequence are scored (its target's).
    """

    case_id: int | str
    prompts: RecordPrompts
    target_id: int
    seqs: list[list[int]]
    n_scored: list[int]


def prepare_cases(lm: LensModel, records: Sequence[FactRecord]) -> list[Case]:
    """The records that can be encoded, as :class:`Case` (the others are left out).

    Raises:
        InputError: no usable record.
    """
    cases = []
    for record in records:
        try:
            prompts = RecordPrompts.from_record(record)
            new = [
                encode_pair(lm, p, prompts.target_new) for p in prompts.rewrite + prompts.paraphrase
            ]
            true = [
                encode_pair(lm, p, t)
                for p, t in zip(prompts.neighborhood, prompts.neighborhood_true, strict=True)
            ]
            nb_new = [encode_pair(lm, p, prompts.target_new) for p in prompts.neighborhood]
        except BackwardLensError:
            continue
        encoded = new + true + nb_new
        cases.append(
            Case(
                record.case_id,
                prompts,
                new[0].target_ids[0],
                [list(r.prompt_ids + r.target_ids) for r in encoded],
                [len(r.target_ids) for r in encoded],
            )
        )
    if not cases:
        raise InputError("no usable record for the sweep (each needs prompt, subject, targets)")
    return cases


def _offset(order: list[int], start: int) -> Callable[[list[int]], None]:
    def record(idx: list[int]) -> None:
        order.extend(start + i for i in idx)

    return record


@torch.no_grad()
def probe(
    lm: LensModel, cases: Sequence[Case], layers: Sequence[int], batch_size: int
) -> tuple[dict[int, Tensor], Tensor]:
    """Probe every record once.

    Returns:
        x_n at each layer's FF2 input [R, d_ff], and whether each prompt already predicts its
        target [R] bool.
    """
    modules = {layer: lm.arch.resolve(layer, "ff2").module for layer in layers}
    store: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    current: dict[str, int] = {"batch": 0}

    def keep(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            x = args[0]
            store[layer].append(x.reshape(current["batch"], -1, x.shape[-1])[:, -1].float().cpu())

        return hook

    predicted = []
    order: list[int] = []
    with Hooks() as hooks:
        for layer in layers:
            hooks.forward(modules[layer], keep(layer))
        prompt_seqs = [[*c.seqs[0][: len(c.seqs[0]) - c.n_scored[0]], c.target_id] for c in cases]
        for start in range(0, len(cases), batch_size):
            chunk = prompt_seqs[start : start + batch_size]
            current["batch"] = len(chunk)
            scored = score_sequences(
                lm,
                chunk,
                [1] * len(chunk),
                batch_size=len(chunk),
                on_batch=_offset(order, start),
            )
            predicted += [bool(ok[0]) for _, ok in scored]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return {layer: torch.cat(v)[inverse] for layer, v in store.items()}, torch.tensor(predicted)
