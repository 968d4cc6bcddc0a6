"""The gradient of one linear layer as the sum of n outer products, sum_i x_i^T delta_i.

After one backward pass over an n-token prompt, dL/dW = X^T Delta with X the layer's forward
inputs (n x d_in) and Delta its VJPs (n x d_out). Its rank is at most n (paper, Lemma 4.1). This
module keeps only the two factors and answers every question (rank, norms, neurons, the dense
matrix on demand) through n x n work, never building the d_in x d_out matrix unless asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LowRankGradient:
    """Factors of one matrix's gradient.

    Attributes:
        x: forward inputs x_i, shape [n, d_in].
        delta: VJPs delta_i = dL/dz_i of the layer's output, shape [n, d_out].
        layout: ``"in_out"`` if the weight is stored [d_in, d_out] (GPT-2 ``Conv1D``),
            ``"out_in"`` if stored [d_out, d_in] (``nn.Linear``).
        layer: block index, for display.
        name: matrix role (``ff1``, ``gate``, ``ff2``, ``q``, ...), for display.
    """

    x: Tensor
    delta: Tensor
    layout: str = "out_in"
    layer: int = -1
    name: str = ""

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.delta.ndim != 2 or self.x.shape[0] != self.delta.shape[0]:
            raise ValueError(
                f"factors must be [n, d_in] and [n, d_out]; got {tuple(self.x.shape)} and "
                f"{tuple(self.delta.shape)}"
            )
        if self.layout not in ("in_out", "out_in"):
            raise ValueError(f"layout must be 'in_out' or 'out_in', not {self.layout!r}")

    @property
    def n(self) -> int:
        """Number of positions (outer products) in the sum."""
        return int(self.x.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the weight (and of :meth:`dense`) in the weight's own layout."""
        d_in, d_out = int(self.x.shape[1]), int(self.delta.shape[1])
        return (d_in, d_out) if self.layout == "in_out" else (d_out, d_in)

    def dense(self) -> Tensor:
        """The full gradient in the weight's layout; equals autograd's ``weight.grad``."""
        if self.layout == "in_out":
            return self.x.T @ self.delta
        return self.delta.T @ self.x

    def _core(self) -> Tensor:
        """n x n matrix with the same non-zero singular values as the gradient.

        With X^T = Q1 R1 and Delta^T = Q2 R2 (thin QR), X^T Delta = Q1 (R1 R2^T) Q2^T,
        so the singular values of X^T Delta are those of R1 R2^T. Computed in float64.
        """
        r1 = torch.linalg.qr(self.x.detach().double().T, mode="r").R
        r2 = torch.linalg.qr(self.delta.detach().double().T, mode="r").R
        return r1 @ r2.T

    def singular_values(self) -> Tensor:
        """The (at most n) non-trivial singular values of the gradient, descending."""
        if self.n == 0:
            return torch.zeros(0, dtype=torch.float64)
        return torch.linalg.svdvals(self._core())

    def rank(self, rtol: float | None = None) -> int:
        """Numerical rank, with ``torch.linalg.matrix_rank``'s default tolerance for dense().

        That default is sigma_max * max(d_in, d_out) * eps(dtype of the factors).
        """
        sv = self.singular_values()
        if sv.numel() == 0 or float(sv[0]) == 0.0:
            return 0
        if rtol is None:
            rtol = max(self.shape) * torch.finfo(self.x.dtype).eps
        return int((sv > sv[0] * rtol).sum())

    def norm(self) -> float:
        """Frobenius norm, from the n x n Gram matrices: ||X^T D||^2 = sum((X X^T) * (D D^T))."""
        gx = self.x.double() @ self.x.double().T
        gd = self.delta.double() @ self.delta.double().T
        return float((gx * gd).sum().clamp_min(0).sqrt())

    def position_norms(self) -> Tensor:
        """||x_i|| * ||delta_i||: the Frobenius norm of each position's rank-1 term, shape [n]."""
        return self.x.norm(dim=1) * self.delta.norm(dim=1)

    def input_space_neurons(self, index: Tensor | None = None) -> Tensor:
        """Gradient rows living in the input space, one per output unit j: sum_i delta_i[j] x_i.

        For FF1 these are the paper's d-sized "neurons" (Eq. 9). Shape [len(index) or d_out, d_in].
        """
        d = self.delta if index is None else self.delta[:, index]
        return d.T @ self.x

    def output_space_neurons(self, index: Tensor | None = None) -> Tensor:
        """Gradient rows living in the output space, one per input unit j: sum_i x_i[j] delta_i.

        For FF2 these are the paper's d-sized "neurons" (Eq. 10). Shape [len(index) or d_in, d_out].
        """
        x = self.x if index is None else self.x[:, index]
        return x.T @ self.delta

    def input_space_neuron_norms(self) -> Tensor:
        """Norm of every input-space neuron without building them: diag(D^T (X X^T) D), [d_out]."""
        gx = self.x @ self.x.T
        return ((self.delta.T @ gx) * self.delta.T).sum(1).clamp_min(0).sqrt()

    def output_space_neuron_norms(self) -> Tensor:
        """Norm of every output-space neuron: diag(X^T (D D^T) X), shape [d_in]."""
        gd = self.delta @ self.delta.T
        return ((self.x.T @ gd) * self.x.T).sum(1).clamp_min(0).sqrt()

    def sgd_update(self, lr: float) -> Tensor:
        """The dense change an SGD step of rate ``lr`` makes to the weight: -lr * dense()."""
        return -lr * self.dense()
