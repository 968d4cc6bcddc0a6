"""The weight matrix an editor changes, and rank-1 changes laid out in its own layout.

Editors never name module paths: the matrix to edit comes from the architecture adapter
(``lm.arch.resolve(layer, "ff2")``) and its weight layout decides how an outer product is laid out
(Conv1D stores [d_in, d_out], ``nn.Linear`` [d_out, d_in]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from backward_lens.adapters import ResolvedMatrix
from backward_lens.errors import InputError, TargetError
from backward_lens.models import LensModel


def parameter_name(model: nn.Module, tensor: Tensor) -> str:
    """The ``named_parameters()`` name of ``tensor`` (found by identity).

    Raises:
        InputError: ``tensor`` is not a parameter of ``model``.
    """
    for name, p in model.named_parameters():
        if p is tensor:
            return name
    raise InputError("the edited weight is not a parameter of the model")


@dataclass(frozen=True)
class EditedMatrix:
    """FF2 (or another matrix) of one layer: module, weight layout and parameter name."""

    resolved: ResolvedMatrix
    param: str

    @property
    def module(self) -> nn.Module:
        """The module holding the weight (its forward hooks see the matrix's input/output)."""
        return self.resolved.module

    @property
    def weight(self) -> Tensor:
        """The weight parameter, in its own layout."""
        return self.resolved.weight

    @property
    def layout(self) -> str:
        """``"in_out"`` ([d_in, d_out], Conv1D) or ``"out_in"`` ([d_out, d_in], nn.Linear)."""
        return self.resolved.layout

    @property
    def d_in(self) -> int:
        """Input width of the matrix (d_ff for FF2)."""
        w = self.weight
        return int(w.shape[0] if self.layout == "in_out" else w.shape[1])

    def outer(self, x_in: Tensor, y_out: Tensor) -> Tensor:
        """The rank-1 weight change mapping ``x_in`` [d_in] to ``y_out`` [d_out].

        Laid out as the weight is: Conv1D [d_in, d_out] -> outer(x, y); nn.Linear
        [d_out, d_in] -> outer(y, x).
        """
        return outer_in_layout(self.layout, x_in, y_out)

    def matmul(self, keys: Tensor, values: Tensor) -> Tensor:
        """Sum of outer products ``keys[i] -> values[i]`` ([N, d_in], [N, d_out]) in the layout."""
        if self.layout == "in_out":
            return keys.T @ values
        return values.T @ keys


def outer_in_layout(layout: str, x_in: Tensor, y_out: Tensor) -> Tensor:
    """``outer(x_in, y_out)`` for an ``in_out`` weight, ``outer(y_out, x_in)`` for ``out_in``.

    Args:
        layout: the weight's layout (see :attr:`EditedMatrix.layout`).
        x_in: the input direction, [d_in].
        y_out: the output direction, [d_out].

    Returns:
        The rank-1 change, [d_in, d_out] or [d_out, d_in].
    """
    if layout == "in_out":
        return torch.outer(x_in, y_out)
    return torch.outer(y_out, x_in)


def ff2(lm: LensModel, layer: int) -> EditedMatrix:
    """The FF2 (down_proj / c_proj / fc2) matrix of ``layer`` (negative counts from the end).

    Raises:
        InputError: the layer is out of range, or the FF2 projection is fused with another.
    """
    layer = lm.arch.layer_index(layer)
    resolved = lm.arch.resolve(layer, "ff2")
    if resolved.part is not None:
        raise InputError("editing a fused FF2 projection is not supported")
    return EditedMatrix(resolved, parameter_name(lm.model, resolved.weight))


def target_row(lm: LensModel, token: int) -> Tensor:
    """e_t: row ``token`` of the decoding matrix (the LM head, so untied models work) [d].

    Raises:
        TargetError: ``token`` is outside the vocabulary.
    """
    weight, _ = lm.arch.unembedding()
    if not 0 <= token < weight.shape[0]:
        raise TargetError(f"token id {token} is outside the model's vocabulary")
    return weight[token].detach()
