"""FF2's output through a post-norm: the change of FF2's output that moves the residual stream.

ROME and MEMIT (Meng et al. 2022, 2023) assume FF2's output is added to the residual stream as it
is, so a wanted change r of the residual at the subject's last token is asked of FF2's output
directly. Gemma-2/3 and OLMo-2 normalise FF2's output first (``post_feedforward_layernorm``,
``Adapter.ff2_post_norm``): the residual gets norm(x), not x. There a change r of x moves the
residual by J r (J the norm's Jacobian: the norm's gain over the RMS of x, ≈ 20x on Gemma-3),
and MEMIT's layers overshoot their targets by that factor. :func:`ff2_output_change` asks FF2
instead for the x' whose norm(x') is nearest to norm(x) + r, the nearest to x among those.
Without a post-norm it returns r unchanged, so other families edit exactly as before.
"""

from __future__ import annotations

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

    def miss(v: Tensor, target: Tensor) -> float:
        with torch.no_grad():
            return float((apply(v) - target).norm())

    changes = []
    with torch.enable_grad():
        for x_row, r_row in zip(x.float(), resid.float().to(x.device), strict=True):
            with torch.no_grad():
                target = apply(x_row) + r_row
            current = x_row.clone()
            error = miss(current, target)
            for _ in range(STEPS):
                if error <= RTOL * float(target.norm()):
                    break
                jac = jacobian(apply, current).detach()  # [d, d]
                with torch.no_grad():
                    gap = (target - apply(current)).double()
                step = torch.linalg.pinv(jac.double(), rtol=PINV_RTOL) @ gap
                scale = 1.0
                while scale > 1e-3:
                    trial = current + (scale * step).float()
                    trial_error = miss(trial, target)
                    if trial_error < error:
                        current, error = trial, trial_error
                        break
                    scale /= 2
                else:
                    break  # no step helps: the nearest reachable point
            changes.append((current - x_row).detach())
    return torch.stack(changes).to(resid.dtype)
