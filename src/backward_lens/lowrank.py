"""The gradient of one linear layer as the sum of n outer products, sum_i x_i^T delta_i.

After one backward pass over an n-token prompt, dL/dW = X^T Delta with X the layer's forward
inputs (n x d_in) and Delta its VJPs (n x d_out). Its rank is at most n (paper, Lemma 4.1). This
module keeps only the two factors and answers every question (rank, norms, neurons, the dense
matrix on demand) through n x n work, never building the d_in x d_out matrix unless asked.

Precision: the factors may be stored in the model's dtype (bfloat16, float16, float32). Every
answer is computed in float32 or better: singular values, ranks and the Frobenius norm in float64,
position and neuron norms (and the neurons themselves) in float32. Only :meth:`dense` and
:meth:`sgd_update` stay in the factors' dtype, like autograd's ``weight.grad``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

HALF_PRECISION_MARGIN = 2.0
"""Factor on the float32 rank tolerance for bfloat16/float16 factors (see ``rank``)."""


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
        """Check that the factors are [n, d_in] and [n, d_out] and that ``layout`` is known.

        Raises:
            ValueError: if a factor is not 2-D, their numbers of rows differ, or ``layout`` is
                neither ``"in_out"`` nor ``"out_in"``.
        """
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

    def _triangular_factors(self) -> tuple[Tensor, Tensor]:
        """R1, R2 [n, n] of the thin QR factorisations X^T = Q1 R1 and Delta^T = Q2 R2, float64.

        Converting the stored factors (bfloat16, float16 or float32) to float64 is exact.
        """
        r1 = torch.linalg.qr(self.x.detach().double().T, mode="r").R
        r2 = torch.linalg.qr(self.delta.detach().double().T, mode="r").R
        return r1, r2

    def _core(self) -> Tensor:
        """An n x n matrix with the same non-zero singular values as the gradient.

        With X^T = Q1 R1 and Delta^T = Q2 R2 (thin QR), X^T Delta = Q1 (R1 R2^T) Q2^T,
        so the singular values of X^T Delta are those of R1 R2^T. Computed in float64.
        """
        r1, r2 = self._triangular_factors()
        return r1 @ r2.T

    def singular_values(self) -> Tensor:
        """The (at most n) non-trivial singular values of the gradient, descending, float64."""
        if self.n == 0:
            return torch.zeros(0, dtype=torch.float64)
        return torch.linalg.svdvals(self._core())

    def rank_tolerance(self, rtol: float | None = None) -> float:
        """Absolute tolerance below which a singular value counts as zero (see :meth:`rank`)."""
        if self.n == 0:
            return 0.0
        r1, r2 = self._triangular_factors()
        sv_max = float(torch.linalg.matrix_norm(r1 @ r2.T, 2))
        return self._tolerance(r1, r2, sv_max, rtol)

    def _tolerance(self, r1: Tensor, r2: Tensor, sv_max: float, rtol: float | None) -> float:
        # Frobenius norms bound the spectral ones from above at no SVD's cost: a safe floor.
        scale = float(torch.linalg.matrix_norm(r1)) * float(torch.linalg.matrix_norm(r2))
        svd_error = max(*self.shape, self.n) * torch.finfo(torch.float64).eps * scale
        if rtol is None:
            half = {self.x.dtype, self.delta.dtype} & {torch.bfloat16, torch.float16}
            rtol = max(self.shape) * torch.finfo(torch.float32).eps
            rtol *= HALF_PRECISION_MARGIN if half else 1.0
        return max(sv_max * rtol, svd_error)

    def rank(self, rtol: float | None = None) -> int:
        """Numerical rank of the gradient X^T Delta, the same whatever dtype the factors have.

        The singular values are those of the stored factors' product, computed in float64
        (converting bfloat16, float16 or float32 to float64 is exact), so the float64 QR,
        product and SVD add an error of only ``max(d_in, d_out, n) * eps64 * ||X||_2 *
        ||Delta||_2`` (about 1e-13 of sigma_max at SmolLM2's width): that is the floor. The
        tolerance is what a float32 computation resolves, whatever the storage dtype:
        ``torch.linalg.matrix_rank``'s default for a float32 dense gradient, ``sigma_max *
        max(d_in, d_out) * eps32`` (6.9e-5 * sigma_max at width 576), so float32 ranks equal
        ``matrix_rank`` of autograd's ``weight.grad``.

        Why not the storage dtype's epsilon (``matrix_rank``'s default on the half-precision
        dense matrix): with bfloat16 it is about 12 x sigma_max, and every rank was 0. But the
        factors are the rounded results of the model's forward and backward pass in its dtype,
        and a direction the exact gradient lacks shows up as a singular value at that rounding
        noise (the first position's query VJP, which a one-key softmax makes exactly zero;
        GPT-2-style key VJPs, which sum to zero over positions; the last layer's value VJPs, at
        most one direction per head). Measured on SmolLM2-135M (all seven matrices of 30 layers,
        two prompts) that noise reached 3e-7 * sigma_max with float32 factors, 9e-6 with float16
        and 7e-5 with bfloat16, just above the float32 tolerance, while the smallest singular
        value float32 counts was 1.7e-4 * sigma_max. Half-precision factors therefore get
        :data:`HALF_PRECISION_MARGIN` (2) times the float32 tolerance: it gives exactly the
        float32 ranks on SmolLM2 in both half dtypes, and on the tiny random models of every
        family for the MLP matrices (the paper's subject), whose only rank deficits are exact
        zeros that stay exact in any dtype.

        Limit: the attention dependencies above are not exact zeros; bfloat16 noise reached
        1e-3 * sigma_max on tiny random models, where genuine singular values go down to
        4e-4 * sigma_max, so no tolerance separates them, and a half-precision ``k``/``v`` rank
        can exceed the float32 one. Count attention ranks in float32.

        Args:
            rtol: count singular values above ``rtol * sigma_max`` instead (never below the
                float64 floor).

        Returns:
            The number of singular values above the tolerance (0 for a zero gradient).
        """
        if self.n == 0:
            return 0
        r1, r2 = self._triangular_factors()
        sv = torch.linalg.svdvals(r1 @ r2.T)
        if float(sv[0]) == 0.0:
            return 0
        return int((sv > self._tolerance(r1, r2, float(sv[0]), rtol)).sum())

    def norm(self) -> float:
        """Frobenius norm, from the n x n Gram matrices: ||X^T D||^2 = sum((X X^T) * (D D^T)).

        Computed in float64 whatever the factors' dtype.
        """
        x, d = self.x.detach().double(), self.delta.detach().double()
        gx = x @ x.T
        gd = d @ d.T
        return float((gx * gd).sum().clamp_min(0).sqrt())

    def position_norms(self) -> Tensor:
        """||x_i|| * ||delta_i||: the Frobenius norm of each position's rank-1 term, [n] float32."""
        return self.x.float().norm(dim=1) * self.delta.float().norm(dim=1)

    def input_space_neurons(self, index: Tensor | None = None) -> Tensor:
        """Gradient rows living in the input space, one per output unit j: sum_i delta_i[j] x_i.

        For FF1 these are the paper's d-sized "neurons" (Eq. 9). Shape [len(index) or d_out, d_in],
        float32 whatever the factors' dtype.
        """
        d = self.delta if index is None else self.delta[:, index]
        return d.float().T @ self.x.float()

    def output_space_neurons(self, index: Tensor | None = None) -> Tensor:
        """Gradient rows living in the output space, one per input unit j: sum_i x_i[j] delta_i.

        For FF2 these are the paper's d-sized "neurons" (Eq. 10). Shape [len(index) or d_in, d_out],
        float32 whatever the factors' dtype.
        """
        x = self.x if index is None else self.x[:, index]
        return x.float().T @ self.delta.float()

    def input_space_neuron_norms(self) -> Tensor:
        """Norm of every input-space neuron without building them: diag(D^T (X X^T) D), [d_out].

        Float32 whatever the factors' dtype.
        """
        x, d = self.x.float(), self.delta.float()
        gx = x @ x.T
        return ((d.T @ gx) * d.T).sum(1).clamp_min(0).sqrt()

    def output_space_neuron_norms(self) -> Tensor:
        """Norm of every output-space neuron: diag(X^T (D D^T) X), shape [d_in], float32."""
        x, d = self.x.float(), self.delta.float()
        gd = d @ d.T
        return ((x.T @ gd) * x.T).sum(1).clamp_min(0).sqrt()

    def sgd_update(self, lr: float) -> Tensor:
        """The dense change an SGD step of rate ``lr`` makes to the weight: -lr * dense()."""
        return -lr * self.dense()

    def directions(self, k: int = 3) -> GradientDirections:
        """The top-``k`` singular directions of X^T Delta, from n x n Gram matrices.

        With the eigendecomposition X X^T = V L V^T (r non-zero eigenvalues), X^T = U_x L^(1/2)
        V^T with U_x = X^T V L^(-1/2) orthonormal, so X^T Delta = U_x B with B = L^(1/2) V^T
        Delta [r, d_out]; B B^T = W S^2 W^T (r x r) gives the gradient's singular values S, its
        left singular vectors ``U_x W`` (d_in space) and right ones ``B^T W S^-1`` (d_out space).
        Nothing d_in x d_out is built; the work is two n x n eigendecompositions and
        O((d_in + d_out) n^2) products, in float64 (the squared condition number of the Gram
        route costs only the directions with the smallest singular values, far below the top
        ones that are read).

        Singular vectors are defined up to a joint sign flip; the sign is fixed so that the
        positions writing the direction have inputs on its positive side
        (``sum_i (x_i . u_j) |delta_i . v_j| >= 0``). For a single position that gives
        u = x / |x| and v = delta / |delta|, the paper's reading of one rank-1 term.

        Args:
            k: how many directions (at most ``min(n, d_in, d_out)``; zero singular values are
                dropped).

        Returns:
            :class:`GradientDirections` with float64 tensors.
        """
        x, d = self.x.detach().double(), self.delta.detach().double()
        if self.n == 0 or k < 1:
            return GradientDirections.empty(int(x.shape[1]), int(d.shape[1]), self.n)
        lam, v = torch.linalg.eigh(x @ x.T)  # ascending
        floor = float(lam[-1]) * max(self.n, *self.shape) * torch.finfo(torch.float64).eps
        keep = lam > floor
        lam, v = lam[keep], v[:, keep]
        if lam.numel() == 0:
            return GradientDirections.empty(int(x.shape[1]), int(d.shape[1]), self.n)
        root = lam.sqrt()
        b = root[:, None] * (v.T @ d)  # [r, d_out]
        mu, w = torch.linalg.eigh(b @ b.T)
        mu, w = mu.flip(0).clamp_min(0), w.flip(1)  # descending
        s = mu.sqrt()
        norm = float(mu.sum().sqrt())
        k = min(k, int((s > float(s[0]) * _DIRECTION_RTOL).sum())) if float(s[0]) > 0 else 0
        if k == 0:
            return GradientDirections.empty(int(x.shape[1]), int(d.shape[1]), self.n)
        s, w = s[:k], w[:, :k]
        left = ((x.T @ (v / root)) @ w).T  # [k, d_in]
        right = ((b.T @ w) / s).T  # [k, d_out]
        a, c = x @ left.T, d @ right.T  # [n, k]
        sign = torch.where((a * c.abs()).sum(0) < 0, -1.0, 1.0).to(a)
        left, right, a, c = left * sign[:, None], right * sign[:, None], a * sign, c * sign
        return GradientDirections(s, left, right, a * c, norm)


_DIRECTION_RTOL = 1e-10
"""Singular values below this fraction of the largest are treated as zero by ``directions``."""


@dataclass
class GradientDirections:
    """Top singular directions of one low-rank gradient (see :meth:`LowRankGradient.directions`).

    The gradient in ``in_out`` layout is ``sum_j sigma_j left_j^T right_j`` plus the dropped
    directions (in ``out_in`` layout, its transpose).

    Attributes:
        singular_values: sigma_j, descending, [k].
        left: unit input-space vectors (d_in), one per row, [k, d_in].
        right: unit output-space vectors (d_out), one per row, [k, d_out].
        contributions: (x_i . left_j)(delta_i . right_j), position i's share of sigma_j; the
            column sums equal the singular values, [n, k].
        norm: the Frobenius norm of the whole gradient (sqrt of the sum of all sigma^2).
    """

    singular_values: Tensor
    left: Tensor
    right: Tensor
    contributions: Tensor
    norm: float

    @classmethod
    def empty(cls, d_in: int, d_out: int, n: int) -> GradientDirections:
        """No direction (a zero gradient, no position, or ``k = 0``)."""
        z = torch.zeros
        f64 = torch.float64
        return cls(
            z(0, dtype=f64), z(0, d_in, dtype=f64), z(0, d_out, dtype=f64), z(n, 0, dtype=f64), 0.0
        )

    @property
    def k(self) -> int:
        """Number of directions kept."""
        return int(self.singular_values.shape[0])
