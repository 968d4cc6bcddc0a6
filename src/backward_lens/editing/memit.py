"""MEMIT (Meng et al. 2023): many facts at once, spread over the FF2 matrices of several layers.

1. For each request, z_i = the output of the *last* edited block at the subject's last token plus
   a delta optimised as in ROME (``rome.optimize_value`` on the block instead of FF2).
2. For each edited layer l in order: keys K (FF2 inputs at the subjects, averaged over the
   context prefixes, [N, d_ff]); residuals R = (z - current block output) / (layers left);
   update = R^T (lambda C + K^T K)^-1 K (least squares with the key covariance as prior); the
   update is applied before the next layer's keys are computed, as in MEMIT.

The model is restored in ``finally``; the summed per-layer updates come back as one Edit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from backward_lens.editing.base import Edit, RewriteRequest, hparams_of
from backward_lens.editing.defaults import editor_defaults
from backward_lens.editing.matrix import ff2
from backward_lens.editing.post_norm import ff2_output_change
from backward_lens.editing.request_tokens import require_subjects
from backward_lens.editing.rome import (
    ValueConfig,
    average_key,
    context_prefixes,
    module_io_at,
    optimize_value,
    prompts_at_subject,
)
from backward_lens.editing.stats import SampleConfig, second_moments
from backward_lens.errors import InputError
from backward_lens.models import LensModel

MOM2_UPDATE_WEIGHT = 20000.0
"""MEMIT's lambda for GPT-2 xl (spec §6.3): the default of models without a tuned one."""

V_LR = 0.5
"""MEMIT's learning rate of the z optimisation (GPT-2 xl, GPT-J): the default where none is set."""


@dataclass
class MEMIT:
    """MEMIT over ``layers`` (default: per model, see ``defaults.py``).

    Args:
        layers: blocks whose FF2 matrices are edited; z is taken at the last one.
        mom2_update_weight: lambda, the weight of the key covariance prior (default: per model,
            see ``defaults.py``; MEMIT's GPT-2 xl value, 20000, where none was tuned).
        v_lr: Adam's learning rate of the z optimisation (default: per model; MEMIT's 0.5 where
            none was chosen). Adam moves each coordinate by about ``v_lr`` per step, so a model
            whose residual stream is large (Gemma-3) needs a larger one to reach z in
            ``v_steps`` steps.
        v_steps, v_weight_decay, clamp_norm_factor, kl_factor: z optimisation (as ROME).
        context: (length, count) of sampled prefixes; MEMIT's code uses 5 of 10 tokens.
        stats_samples, stats_length, seed: as ROME.
    """

    layers: list[int] | None = None
    mom2_update_weight: float | None = None
    v_steps: int = 20
    v_lr: float | None = None
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    context: list[list[int]] = field(default_factory=lambda: [[10, 5]])  # MEMIT's own choice
    stats_samples: int = 64
    stats_length: int = 256
    seed: int = 0
    name = "memit"

    def __call__(self, lm: LensModel, requests: Sequence[RewriteRequest]) -> Edit:
        """Edit ``requests`` at once over ``layers``; the model is restored, the change returned.

        Raises:
            InputError: a request without a locatable subject, no layers, or a layer the model
                does not have.
        """
        require_subjects(lm, requests, "MEMIT")
        defaults = editor_defaults(lm, "memit")
        layers = self.layers if self.layers is not None else defaults["layers"]
        weight = self.mom2_update_weight
        if weight is None:
            weight = float(defaults.get("mom2_update_weight", MOM2_UPDATE_WEIGHT))
        v_lr = self.v_lr if self.v_lr is not None else float(defaults.get("v_lr", V_LR))
        if not layers:
            raise InputError("MEMIT needs at least one layer")
        layers = sorted({lm.arch.layer_index(layer) for layer in layers})
        matrices = [ff2(lm, layer) for layer in layers]
        prefixes = context_prefixes(lm, self.context, self.seed)
        stats = second_moments(
            lm, layers, SampleConfig(n_samples=self.stats_samples, length=self.stats_length)
        )
        z_block = lm.arch.layers[layers[-1]]
        config = ValueConfig(
            steps=self.v_steps,
            lr=v_lr,
            weight_decay=self.v_weight_decay,
            clamp_norm_factor=self.clamp_norm_factor,
            kl_factor=self.kl_factor,
        )
        values = [optimize_value(lm, z_block, layers[-1], r, prefixes, config) for r in requests]
        z = torch.stack([v.target for v in values]).double()  # [N, d]
        plain = [prompts_at_subject(lm, r, [""])[0] for r in requests]

        deltas: dict[str, Tensor] = {}
        originals = {m.param: m.weight.detach().clone() for m in matrices}
        try:
            for i, matrix in enumerate(matrices):
                keys = (
                    torch.stack([average_key(lm, matrix, r, prefixes) for r in requests])
                    .double()
                    .cpu()
                )  # [N, d_ff]
                _, current = module_io_at(lm, z_block, plain)
                resid = (z - current.double().cpu()) / (len(matrices) - i)  # [N, d]
                post_norm = lm.arch.ff2_post_norm(matrix.resolved.layer)
                if post_norm is not None:  # Gemma-2/3, OLMo-2: the residual gets norm(FF2 out)
                    _, out = module_io_at(lm, matrix.module, plain)
                    resid = ff2_output_change(post_norm, out, resid.to(out.device)).cpu()
                c = stats[matrix.resolved.layer].cpu()
                a = weight * c + keys.T @ keys
                adj = torch.linalg.solve(a, keys.T)  # [d_ff, N]
                update = matrix.matmul(adj.T, resid).to(matrix.weight.dtype)  # sum_i adj_i -> r_i
                with torch.no_grad():
                    matrix.weight.add_(update.to(matrix.weight.device))
                deltas[matrix.param] = update
        finally:
            params = dict(lm.model.named_parameters())
            with torch.no_grad():
                for name, original in originals.items():
                    params[name].copy_(original)
        info: dict[str, Any] = {
            "layers": layers,
            "z_delta_norms": [float(v.delta.norm()) for v in values],
            "v_losses": [v.losses for v in values],
        }
        return Edit.from_deltas(
            lm,
            deltas,
            self.name,
            hparams_of(self, layers=layers, mom2_update_weight=weight, v_lr=v_lr),
            requests,
            info,
        )
