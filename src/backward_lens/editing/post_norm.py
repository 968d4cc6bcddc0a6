"""FF2's output through a post-norm: the change of FF2's output that moves the residual stream.

MEMIT (Meng et al. 2023) assumes FF2's output is added to the residual stream as it is, so a
wanted change r of the residual at the subject's last token is asked of FF2's output directly
(ROME needs no such step: its value is optimised at FF2's output itself). Gemma-2/3 and OLMo-2
normalise FF2's output first (``post_feedforward_layernorm``, ``Adapter.ff2_post_norm``): the
residual gets norm(x), not x. There a change r of x moves the residual by J r (J the norm's
Jacobian, about its gain over the RMS of x), and MEMIT's layers overshoot their targets by that
factor (32-fold in one Gemma-3-270M edit). :func:`ff2_output_change` asks FF2
instead for the x' whose norm(x') is nearest to norm(x) + r, the nearest to x among those.
Without a post-norm it returns r unchanged, so other families edit exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.autograd.functional import jacobian

STEPS = 30
"""Gauss-Newton steps at most per row (it stops earlier once the target is met)."""

RTOL = 1e-6
"""Stop when ‖norm(x') − (norm(x) + r)‖ ≤ RTOL · ‖norm(x) + r‖."""

PINV_RTOL = 1e-4
"""Singular values of the norm's Jacobian below this fraction of the largest count as zero. An
RMS norm is scale-invariant, so its float32 Jacobian has a singular value near 1e-7 along x;
inverting it would send x' far along x (the output barely changes, the weights a lot)."""


def ff2_output_change(norm: nn.Module | None, x: Tensor, resid: Tensor) -> Tensor:
    """The change of FF2's output whose post-norm output moves the residual stream by ``resid``.

    For each row, Gauss-Newton on ``min ‖norm(x') − (norm(x) + resid)‖`` from ``x' = x``, with
    minimum-norm steps (pseudo-inverse of the Jacobian) and step halving when a step does not
    help. An RMS norm is scale-invariant, so the minimum-norm steps keep ``x'`` the nearest
    pre-image to ``x``; a target no norm output can reach (an RMS norm's outputs have a fixed
    RMS over its gain) gives the nearest reachable one.

    Args:
        norm: the post-FF2 norm (``Architecture.ff2_post_norm``), or None (no post-norm).
        x: FF2's current output at the edited positions [N, d].
        resid: the wanted change of the residual stream there [N, d].

    Returns:
        ``x' − x`` [N, d] in ``resid``'s dtype (``resid`` itself when ``norm`` is None).
    """
    if norm is None:
        return resid
    dtype = next(norm.parameters(), x).dtype

    def apply(v: Tensor) -> Tensor:
        return norm(v[None].to(dtype)).float()[0]

    changes = [
        _preimage(apply, x_row, r_row) - x_row
        for x_row, r_row in zip(x.float(), resid.float().to(x.device), strict=True)
    ]
    return torch.stack(changes).to(resid.dtype)


def _preimage(apply: Callable[[Tensor], Tensor], x: Tensor, resid: Tensor) -> Tensor:
    """The x' nearest to ``x`` whose ``apply(x')`` is nearest to ``apply(x) + resid`` [d]."""

    def miss(v: Tensor) -> float:
        with torch.no_grad():
            return float((apply(v) - target).norm())

    with torch.no_grad():
        target = apply(x) + resid
    current, error = x.clone(), miss(x)
    for _ in range(STEPS):
        if error <= RTOL * float(target.norm()):
            break
        with torch.enable_grad():
            jac = jacobian(apply, current).detach()  # [d, d]
        with torch.no_grad():
            gap = (target - apply(current)).double()
        step = torch.linalg.pinv(jac.double(), rtol=PINV_RTOL) @ gap
        trials = (current + (0.5**k * step).float() for k in range(10))  # step halving
        better = next(((t, e) for t in trials if (e := miss(t)) < error), None)
        if better is None:
            break  # no step helps: the nearest reachable point
        current, error = better
    return current.detach()
