"""Fine-tuning baselines (spec §6.3): Adam on one layer's FF2 weight, as in ROME/MEMIT's FT.

Only the blocks from the trained layer up are run at each step (the blocks below see no
trainable weight, so their output is computed once), and the LM head only where the loss reads it.

The loss is the NLL of the new target's tokens, teacher-forced after the prompt (mean over the
target's tokens, then over requests). Up to ``steps`` Adam steps; stop early once the loss is below
``early_stop_loss``. With ``norm_constraint`` each step is followed by clamping the weight to an
L-infinity ball around its original value (ROME's FT-L constraint). The model's weight is restored
in ``finally``; the change comes back as an :class:`Edit`.

Names in the table of editors (``editing/table.py``): ``ft`` / ``ft-late`` (the late layer, default
as forward pass shift's layer), ``ft-early`` (layer 0), ``ft-l`` (layer 0 with ROME's norm
constraint 5e-4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from backward_lens.batching import eval_mode, pad_batch, pad_id
from backward_lens.capture import frozen_for_capture
from backward_lens.editing.base import SETTING, Edit, RewriteRequest, hparams_of
from backward_lens.editing.defaults import editor_defaults
from backward_lens.editing.matrix import ff2
from backward_lens.editing.request_tokens import EditTokens, edit_tokens
from backward_lens.editing.upper_layers import UpperBlocks
from backward_lens.errors import InputError
from backward_lens.models import LensModel


def teacher_forced_batch(
    lm: LensModel, tokens: Sequence[EditTokens]
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded prompt+target inputs, attention mask and label matrix (-100 = no loss)."""
    seqs = [t.prompt_ids + t.target_ids[:-1] for t in tokens]
    batch = pad_batch(seqs, pad_id(lm.tokenizer), side="right", device=lm.device)
    ids, mask = batch.input_ids, batch.attention_mask
    labels = torch.full_like(ids, -100)
    for b, t in enumerate(tokens):
        start = len(t.prompt_ids) - 1
        labels[b, start : start + len(t.target_ids)] = torch.tensor(t.target_ids)
    return ids, mask, labels


def target_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over rows of the mean NLL of each row's labelled positions."""
    keep = labels != -100
    logp = F.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * keep
    return (nll.sum(1) / keep.sum(1)).mean()


def target_nll_from_hidden(lm: LensModel, hidden: Tensor, labels: Tensor) -> Tensor:
    """:func:`target_nll` from the last block's output [B, T, d].

    The LM head is applied only at the labelled positions: the same value and gradient, without
    the [B, T, V] logits.
    """
    keep = labels != -100
    logp = F.log_softmax(lm.lens(hidden[keep]), dim=-1)  # [M, V]
    nll = -logp.gather(-1, labels[keep][:, None])[:, 0]
    rows = keep.nonzero()[:, 0]
    per_row = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device)
    per_row = per_row.index_add(0, rows, nll) / keep.sum(1)
    return per_row.mean()


@dataclass
class FineTune:
    """Adam fine-tuning of one FF2 weight towards the new targets.

    Args:
        layer: block whose FF2 weight is trained (default: per model, late layer).
        lr: Adam learning rate (ROME/MEMIT: 5e-4).
        steps: maximum number of steps (25).
        norm_constraint: clamp the change elementwise to [-c, c] after each step (None: off).
        early_stop_loss: stop once the loss is below this (1e-2).
        weight_decay: Adam weight decay (0).
        name: the name its edits carry (a setting the table of editors presets).
        defaults_key: the ``editing.defaults`` entry giving the default layer (``ft-late`` or
            ``ft-early``; a setting the table presets).
    """

    layer: int | None = None
    lr: float = 5e-4
    steps: int = 25
    norm_constraint: float | None = None
    early_stop_loss: float = 1e-2
    weight_decay: float = 0.0
    name: str = field(default="ft", metadata=SETTING)
    defaults_key: str = field(default="ft-late", metadata=SETTING)

    def __call__(self, lm: LensModel, requests: Sequence[RewriteRequest]) -> Edit:
        """Train the FF2 weight on ``requests``; the weight is restored, the change returned.

        Raises:
            InputError: ``steps`` < 1, ``lr`` <= 0, a non-positive ``norm_constraint``, or a
                layer the model does not have.
        """
        if self.steps < 1 or self.lr <= 0:
            raise InputError("steps must be >= 1 and lr > 0")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise InputError(f"norm_constraint must be positive, got {self.norm_constraint}")
        layer = (
            self.layer
            if self.layer is not None
            else editor_defaults(lm, self.defaults_key)["layer"]
        )
        matrix = ff2(lm, layer)
        tokens = [edit_tokens(lm, r.prompt, r.target_new) for r in requests]
        ids, mask, labels = teacher_forced_batch(lm, tokens)
        weight = matrix.weight
        original = weight.detach().clone()
        losses: list[float] = []
        with eval_mode(lm.model):
            upper = UpperBlocks(lm, matrix.resolved.layer, ids, mask)
        try:
            with frozen_for_capture(lm.model), torch.enable_grad():
                weight.requires_grad_(True)
                opt = torch.optim.Adam([weight], lr=self.lr, weight_decay=self.weight_decay)
                for _ in range(self.steps):
                    opt.zero_grad()
                    loss = target_nll_from_hidden(lm, upper.final_hidden(), labels)
                    losses.append(float(loss.detach()))
                    if losses[-1] < self.early_stop_loss:
                        break
                    loss.backward()
                    opt.step()
                    if self.norm_constraint is not None:
                        eps = self.norm_constraint
                        with torch.no_grad():
                            weight.copy_(torch.clamp(weight, original - eps, original + eps))
            delta = (weight.detach() - original).clone()
        finally:
            with torch.no_grad():
                weight.copy_(original)
            weight.grad = None
        info: dict[str, Any] = {
            "steps": len(losses),
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "losses": losses,
        }
        return Edit.from_deltas(
            lm,
            {matrix.param: delta},
            self.name,
            hparams_of(self, layer=matrix.resolved.layer),
            requests,
            info,
        )
