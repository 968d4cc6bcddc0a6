"""Capture for any loss, outside training: one forward and backward pass, weights untouched.

:func:`capture_loss` generalises :func:`backward_lens.capture.capture` (the paper's NLL of one
target at the last position) to a batch with labels at every position (the causal-LM loss, ignore
index -100, padding) or to any user-supplied function of the logits. Parameters are frozen for
the pass (no ``.grad`` is written); the input embeddings become the graph's leaf, so every
selected matrix gets its VJP. Hooks are removed and flags and modes restored, whatever happens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backward_lens.batching import Hooks
from backward_lens.capture import frozen_for_capture
from backward_lens.errors import InputError
from backward_lens.models import LensModel
from backward_lens.training.recorder import MatrixFactors, record
from backward_lens.training.targets import select_targets

IGNORE_INDEX = -100

LossFn = Callable[[Tensor, dict[str, Tensor]], Tensor]
"""``loss_fn(logits [B, T, V], batch) -> scalar``."""


def causal_lm_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy: position t predicts ``labels[:, t + 1]``; -100 is ignored.

    The same loss as Hugging Face's causal-LM heads (float32 whatever the logits' dtype).

    Args:
        logits: [B, T, V].
        labels: [B, T] token ids, -100 where there is no target (padding, prompt tokens).
        reduction: ``"mean"`` over the labelled positions, or ``"sum"``.
    """
    shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    target = labels[:, 1:].reshape(-1).to(shifted.device)
    return F.cross_entropy(shifted, target, ignore_index=IGNORE_INDEX, reduction=reduction)


def capture_loss(
    lm: LensModel,
    batch: dict[str, Tensor],
    *,
    loss_fn: LossFn | None = None,
    layers: Sequence[int] | None = None,
    matrices: Sequence[str] | None = None,
) -> tuple[float, list[MatrixFactors]]:
    """Factors of every selected matrix for one batch and any loss.

    Args:
        lm: the model.
        batch: ``input_ids`` [B, T], optionally ``attention_mask`` and ``labels`` (-100 ignored);
            extra keys are passed to ``loss_fn`` only.
        loss_fn: ``loss_fn(logits, batch)``; default the causal-LM loss of ``batch["labels"]``
            (mean over labelled positions, like Hugging Face).
        layers: block indices to record (negative from the end; default: every layer).
        matrices: matrix names to record (default: the MLP matrices ``ff1``, ``ff2``).

    Returns:
        The loss and the factors (``gradient.dense()`` equals the weight's gradient).

    Raises:
        InputError: no ``input_ids``, or neither ``labels`` nor ``loss_fn``.
    """
    if "input_ids" not in batch:
        raise InputError("the batch needs input_ids")
    if loss_fn is None and "labels" not in batch:
        raise InputError("give the batch labels (-100 where ignored) or a loss_fn")
    model = lm.model
    targets = select_targets(model, layers=layers, matrices=matrices, include_frozen=True)
    device = lm.device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask") if k in batch}
    with Hooks() as hooks, frozen_for_capture(model), torch.enable_grad():
        hooks.forward(model.get_input_embeddings(), _make_leaf)  # type: ignore[operator]
        with record(model, targets) as rec:
            logits = model(**inputs, use_cache=False).logits
        if loss_fn is not None:
            loss = loss_fn(logits, batch)
        else:
            loss = causal_lm_loss(logits, batch["labels"])
        loss.backward()
    return float(loss.detach()), rec.factors()


def _make_leaf(module: nn.Module, args: Any, output: Tensor) -> Tensor:
    return output.detach().requires_grad_(True)
