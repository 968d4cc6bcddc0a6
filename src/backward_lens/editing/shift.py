"""Forward pass shift (paper §7): FF2_l <- FF2_l + eta * x_n^T e_t, one forward pass, no backward.

x_n is the last prompt token's input to FF2 at layer l (post-activation, d_ff) and e_t the first
target token's row of the *decoding* matrix (the LM head, so untied models work). Re-running the
layer on the same input moves its output by eta * ||x_n||^2 * e_t: towards the target embedding.
As in the official code, a request the model already answers with the target is skipped.

``shift-adaptive`` (beyond the paper) picks eta per edit: the weight change adds
eta * (X x_n) e_t to FF2's output at every position (X = the FF2 inputs of the prompt), so with
the hidden state entering block l cached, a candidate eta costs one run of the blocks from l up.
Doubling then bisection finds the smallest eta (within ``rtol``) that makes the target top-1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from backward_lens.batching import (
    by_position,
    eval_mode,
    input_device,
    pad_batch,
    pad_id,
    recording_input,
)
from backward_lens.editing.base import Edit, RewriteRequest, hparams_of
from backward_lens.editing.defaults import editor_defaults
from backward_lens.editing.matrix import EditedMatrix, ff2, target_row
from backward_lens.editing.request_tokens import edit_tokens
from backward_lens.editing.upper_layers import UpperBlocks
from backward_lens.errors import InputError
from backward_lens.models import LensModel


@dataclass
class ShiftProbe:
    """What one forward pass of the unedited model says about one request.

    Attributes:
        x: FF2 inputs of every prompt position at the edited layer, [T, d_ff].
        logits: last-position logits, [V].
        target: the first target token id.
        e_t: its decoding-matrix row, [d].
    """

    x: Tensor
    logits: Tensor
    target: int
    e_t: Tensor

    @property
    def x_n(self) -> Tensor:
        """FF2's input at the last prompt token, [d_ff]."""
        return self.x[-1]

    @property
    def already_predicted(self) -> bool:
        """True if the unedited model already predicts the target (the edit is skipped)."""
        return int(self.logits.argmax()) == self.target


def probe(
    lm: LensModel, request: RewriteRequest, matrix: EditedMatrix, upper: bool = False
) -> tuple[ShiftProbe, UpperBlocks | None]:
    """One forward pass recording FF2's input (and, if ``upper``, the blocks' inputs)."""
    tokens = edit_tokens(lm, request.prompt, request.target_new)
    ids = tokens.prompt_ids
    runner: UpperBlocks | None = None
    with eval_mode(lm.model), recording_input(matrix.module) as seen:
        if upper:
            runner = UpperBlocks(lm, matrix.resolved.layer, ids)
            logits = runner.logits
        else:
            with torch.no_grad():
                device = input_device(lm.model)
                out = lm.model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            logits = out.logits[0, -1]
    x = by_position(seen[0], (1, len(ids)))[0]
    t = tokens.first_target
    return ShiftProbe(x, logits.float(), t, target_row(lm, t)), runner


@torch.no_grad()
def probe_many(
    lm: LensModel, requests: Sequence[RewriteRequest], matrix: EditedMatrix
) -> list[ShiftProbe]:
    """:func:`probe` for many requests in one right-padded forward pass.

    Causal attention: a row's real positions never see its padding, so each probe equals the
    single one up to float summation order.
    """
    tokens = [edit_tokens(lm, r.prompt, r.target_new) for r in requests]
    batch = pad_batch(
        [t.prompt_ids for t in tokens], pad_id(lm.tokenizer), side="right", device=lm.device
    )
    ids, mask = batch.input_ids, batch.attention_mask
    b, t = ids.shape
    with eval_mode(lm.model), recording_input(matrix.module) as seen:
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    x = by_position(seen[0], (b, t))
    out = []
    for row, tok in enumerate(tokens):
        n = len(tok.prompt_ids)
        target = tok.first_target
        out.append(
            ShiftProbe(x[row, :n], logits[row, n - 1].float(), target, target_row(lm, target))
        )
    return out


def shift_delta(matrix: EditedMatrix, p: ShiftProbe, eta: float) -> Tensor:
    """The weight change eta * x_n^T e_t, in FF2's weight layout."""
    return eta * matrix.outer(p.x_n.to(matrix.weight.dtype), p.e_t.to(matrix.weight.dtype))


def _resolve(lm: LensModel, layer: int | None, eta: float | None) -> tuple[int, float]:
    d = editor_defaults(lm, "shift")
    layer = d["layer"] if layer is None else layer
    eta = float(d["eta"] if eta is None else eta)
    if not eta > 0:
        raise InputError(f"eta must be positive, got {eta}")
    return int(layer), eta


def _summarise(per: list[dict[str, Any]]) -> dict[str, Any]:
    info: dict[str, Any] = {"skipped": all(p["skipped"] for p in per), "per_request": per}
    if len(per) == 1:
        info.update(per[0])
    return info


def _sum_deltas(matrix: EditedMatrix, deltas: list[Tensor]) -> dict[str, Tensor]:
    if not deltas:
        return {}
    total = deltas[0].clone()
    for d in deltas[1:]:
        total += d
    return {matrix.param: total}


@dataclass
class ForwardPassShift:
    """Forward pass shift with a fixed eta (the paper's method).

    Args:
        layer: block whose FF2 is edited (default: per model, see ``defaults.py``).
        eta: step size (default: per model; the paper's GPT-2 xl value is 0.24).
    """

    layer: int | None = None
    eta: float | None = None
    name = "shift"

    def __call__(self, lm: LensModel, requests: Sequence[RewriteRequest]) -> Edit:
        """Shift FF2 of ``layer`` towards each request's target (paper §7), as one edit.

        Raises:
            InputError: a non-positive eta, or a layer the model does not have.
        """
        layer, eta = _resolve(lm, self.layer, self.eta)
        matrix = ff2(lm, layer)
        probes = [probe(lm, request, matrix)[0] for request in requests]
        return self._edit(lm, requests, matrix, probes, eta)

    def each(self, lm: LensModel, requests: Sequence[RewriteRequest]) -> list[Edit]:
        """One single-fact edit per request, as ``[self(lm, [r]) for r in requests]``.

        The probes of all requests run in one padded forward pass: what batched evaluation uses.
        """
        layer, eta = _resolve(lm, self.layer, self.eta)
        matrix = ff2(lm, layer)
        probes = probe_many(lm, requests, matrix)
        return [
            self._edit(lm, [r], matrix, [p], eta) for r, p in zip(requests, probes, strict=True)
        ]

    def _edit(
        self,
        lm: LensModel,
        requests: Sequence[RewriteRequest],
        matrix: EditedMatrix,
        probes: Sequence[ShiftProbe],
        eta: float,
    ) -> Edit:
        per: list[dict[str, Any]] = []
        deltas: list[Tensor] = []
        for p in probes:
            skipped = p.already_predicted
            if not skipped:
                deltas.append(shift_delta(matrix, p, eta))
            per.append(
                {
                    "skipped": skipped,
                    "eta": 0.0 if skipped else eta,
                    "target_id": p.target,
                    "x_norm": float(p.x_n.norm()),
                }
            )
        return Edit.from_deltas(
            lm,
            _sum_deltas(matrix, deltas),
            self.name,
            hparams_of(self, layer=matrix.resolved.layer, eta=eta),
            requests,
            _summarise(per),
        )


ETA_CAP = 8.0
"""Default cap of the adaptive shift's eta, as a multiple of the fixed method's eta."""


@dataclass
class AdaptiveShift:
    """Forward pass shift with eta chosen per edit: the smallest eta that makes the target top-1.

    Args:
        layer: block whose FF2 is edited (default: as ``shift``).
        eta: the first eta tried (default: the fixed method's eta).
        eta_max: cap (default 8x ``eta``: on the SmolLM2 evaluation every edit that succeeds at
            all does so below 2x, while larger shifts only wreck the model).
        on_failure: what to do when even ``eta_max`` does not make the target top-1:
            ``"refuse"`` leaves the weights unchanged, ``"cap"`` applies ``eta_max`` anyway.
            Either way the edit's info says ``success: False``.
        rtol: stop bisecting when (hi - lo) / hi <= rtol.
        margin: required logit lead of the target over the runner-up (0: just top-1).
        max_runs: cap on re-runs of the upper blocks per edit.
    """

    layer: int | None = None
    eta: float | None = None
    eta_max: float | None = None
    rtol: float = 0.02
    margin: float = 0.0
    max_runs: int = 40
    on_failure: str = "refuse"
    name = "shift-adaptive"

    def __call__(self, lm: LensModel, requests: Sequence[RewriteRequest]) -> Edit:
        """Shift with the smallest eta that makes each target top-1 (beyond the paper).

        Raises:
            InputError: bad ``rtol``/``on_failure``/``eta_max``, or a layer the model lacks.
        """
        layer, eta0 = _resolve(lm, self.layer, self.eta)
        eta_max = float(self.eta_max) if self.eta_max is not None else ETA_CAP * eta0
        if not 0 < self.rtol < 1:
            raise InputError(f"rtol must be in (0, 1), got {self.rtol}")
        if not eta_max > 0:
            raise InputError(f"eta_max must be positive, got {eta_max}")
        if self.on_failure not in ("refuse", "cap"):
            raise InputError(f"on_failure must be 'refuse' or 'cap', got {self.on_failure!r}")
        matrix = ff2(lm, layer)
        per: list[dict[str, Any]] = []
        deltas: list[Tensor] = []
        for request in requests:
            p, runner = probe(lm, request, matrix, upper=True)
            assert runner is not None
            if p.already_predicted:
                per.append({"skipped": True, "eta": 0.0, "target_id": p.target, "runs": 0})
                continue
            result = self._search(matrix, p, runner, eta0, eta_max)
            refused = not result["success"] and self.on_failure == "refuse"
            if refused:
                result["eta"] = 0.0
            else:
                deltas.append(shift_delta(matrix, p, result["eta"]))
            per.append({"skipped": False, "refused": refused, "target_id": p.target, **result})
        return Edit.from_deltas(
            lm,
            _sum_deltas(matrix, deltas),
            self.name,
            hparams_of(
                self,
                layer=matrix.resolved.layer,
                eta=eta0,
                eta_max=eta_max,
                on_failure=self.on_failure,
            ),
            requests,
            _summarise(per),
        )

    def _search(
        self,
        matrix: EditedMatrix,
        p: ShiftProbe,
        runner: UpperBlocks,
        eta0: float,
        eta_max: float,
    ) -> dict[str, Any]:
        # FF2 output change of eta * outer(x_n, e_t) at every position: eta * (X x_n) e_t.
        x = p.x.to(matrix.weight.dtype)
        unit = torch.outer(x @ x[-1], p.e_t.to(matrix.weight.dtype))  # [T, d]
        runs = 0

        def ok(eta: float) -> bool:
            nonlocal runs
            runs += 1
            logits = runner.run(matrix.module, eta * unit)
            lead = logits[p.target] - torch.cat([logits[: p.target], logits[p.target + 1 :]]).max()
            return bool(lead > self.margin)

        lo, hi = 0.0, None
        eta = min(eta0, eta_max)
        if ok(eta):
            hi = eta
            while runs < self.max_runs:  # halve until it fails
                eta = hi / 2
                if ok(eta):
                    hi = eta
                else:
                    lo = eta
                    break
        else:
            lo = eta
            while runs < self.max_runs and eta < eta_max:  # double until it works
                eta = min(2 * eta, eta_max)
                if ok(eta):
                    hi = eta
                    break
                lo = eta
        if hi is None:
            return {"eta": eta_max, "eta_lower": lo, "success": False, "runs": runs}
        while runs < self.max_runs and hi - lo > self.rtol * hi:
            mid = (lo + hi) / 2
            if ok(mid):
                hi = mid
            else:
                lo = mid
        return {"eta": hi, "eta_lower": lo, "success": True, "runs": runs}
