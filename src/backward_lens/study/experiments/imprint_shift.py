"""Section 5, Lemma 5.2: one real SGD step with one token's contribution, against the lemma.

Updating W <- W - lr x_i^T delta_i and re-running the prompt moves, at position i,
FF1's pre-activation by -lr ||x_i||^2 delta_i^FF1 ("imprint") and the MLP output (FF2's output)
by -lr ||x_i^FF2||^2 delta_i ("shift"), exactly: the matrix's input at its own layer does not
change. We take the step on the real weights (restored bit-exactly in ``finally``), measure the
change with forward hooks, and report predicted vs measured, and the target's logit and
probability before and after. Then the full step (all n terms) and how much of its change the
two dominant segment terms (last subject token, last token) explain.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from backward_lens.adapters import ResolvedMatrix
from backward_lens.batching import Hooks, eval_mode, model_inputs, pad_batch, pad_id
from backward_lens.capture import Capture
from backward_lens.lowrank import LowRankGradient
from backward_lens.models import LensModel
from backward_lens.study.base import Aggregate, Experiment, Item, StudyOptions
from backward_lens.study.figures import pyplot

STEPS = ("ff1 @ last subject", "ff1 @ last", "ff2 @ last subject", "ff2 @ last")


@contextmanager
def sgd_step(res: ResolvedMatrix, x: Tensor, delta: Tensor, lr: float) -> Iterator[None]:
    """W <- W - lr * sum_k x_k^T delta_k in the weight's own layout, restored bit-exactly on exit.

    ``x`` [k, d_in] and ``delta`` [k, d_out] are the factors of the terms to apply; for a fused
    module ``delta`` covers only this matrix's part of the output features.
    """
    weight = res.weight
    saved = weight.detach().clone()
    update = -lr * (x.T.double() @ delta.double())  # [d_in, d_out]
    try:
        with torch.no_grad():
            if res.layout == "in_out":
                cols = res.part if res.part is not None else slice(None)
                weight[:, cols] += update.to(weight.device, weight.dtype)
            else:
                rows = res.part if res.part is not None else slice(None)
                weight[rows, :] += update.T.to(weight.device, weight.dtype)
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def _run(
    lm: LensModel, ids: Sequence[int], modules: dict[str, ResolvedMatrix]
) -> dict[str, Tensor]:
    """One forward pass; returns each module's output [n, width] (its part) and the logits [V]."""
    outputs: dict[str, Tensor] = {}
    batch = pad_batch([ids], pad_id(lm.tokenizer), device=lm.device)
    kwargs = model_inputs(lm.model, batch, logits_to_keep=1)  # only the last logits are read
    with Hooks() as hooks, eval_mode(lm.model), torch.no_grad():
        for key, res in modules.items():

            def hook(
                module: Any, args: Any, output: Tensor, key: str = key, res: ResolvedMatrix = res
            ) -> None:
                out = output.detach().reshape(len(ids), -1)
                outputs[key] = out[:, res.part] if res.part is not None else out

            hooks.forward(res.module, hook)
        logits = lm.model(**kwargs).logits
    outputs["logits"] = logits[0, -1].float()
    return outputs


def _rel(measured: Tensor, predicted: Tensor) -> tuple[float, float]:
    m, p = measured.double(), predicted.double()
    err = float((m - p).norm() / p.norm().clamp_min(1e-300))
    cos = float(torch.nn.functional.cosine_similarity(m, p, dim=0))
    return err, cos


def _target_stats(logits: Tensor, target: int, answer: int) -> dict[str, float]:
    logp = logits.log_softmax(-1)
    return {
        "target_logit": float(logits[target]),
        "target_prob": float(logp[target].exp()),
        "answer_prob": float(logp[answer].exp()),
    }


def default_layer(n_layers: int) -> int:
    """The block studied when ``StudyOptions.layer`` is unset: the middle one, ``n_layers // 2``."""
    return n_layers // 2


class ImprintShiftExperiment(Experiment):
    """§5, Lemma 5.2 (imprint and shift): a real SGD step with one token's term vs the lemma.

    At the studied block (``StudyOptions.layer``, default :func:`default_layer`) each of the four
    :data:`STEPS` updates FF1 or FF2 with the rank-1 term x_i^T delta_i of the last subject token or
    the last token, at rate ``StudyOptions.lr``; then the full step (all n terms) and the two
    dominant terms alone. Weights are restored bit-exactly after each step (:func:`sgd_step`).
    """

    name = "imprint-shift"
    title = "Imprint and shift: one SGD step against Lemma 5.2"
    paper = (
        "§5, Lemma 5.2: with one token's term x_i^T δ_i, FF1's pre-activations move by "
        "η||x_i||²δ_i[j] (imprint) and the MLP output by η||x_i^FF2||²δ_i (shift, η < 0 for "
        "SGD: towards the target embedding); with the full gradient only a few tokens "
        "(last subject token, last token) dominate."
    )
    matrices = ("ff1", "ff2")

    def measure(
        self, lm: LensModel, item: Item, capture: Capture, options: StudyOptions
    ) -> dict[str, Any]:
        """Take the single-term and full SGD steps on one prompt and measure their effect.

        Runs 1 + 4 + 2 x 2 forward passes of the prompt (no backward pass: the factors come from
        ``capture``).

        Returns:
            ``layer``, ``lr``, ``n``, ``subject_pos`` (the last subject token's position),
            ``tokens``, ``before`` (the target's logit and probability, the answer's probability),
            ``single`` (one row per step of :data:`STEPS`: predicted and measured norm of the change
            at position i, their relative error and cosine, and the target statistics before and
            after) and ``full`` (per matrix: the full step's relative error at the last position,
            the target-logit change of the full and of the two-term step, and the R² of the change
            the two terms explain).
        """
        layer = options.resolve_layer(lm.arch, default_layer(lm.n_layers))
        lr = options.lr
        ids = list(capture.request.input_ids)
        n = len(ids)
        subj = item.segmentation.positions["last_subject"][0]
        last = n - 1
        target, answer = capture.target_id, capture.prediction_id
        modules = {m: lm.arch.resolve(layer, m) for m in ("ff1", "ff2")}
        base = _run(lm, ids, modules)
        before = _target_stats(base["logits"], target, answer)
        singles, fulls = [], []
        for m in ("ff1", "ff2"):
            g: LowRankGradient = capture.gradient(layer, m)
            res = modules[m]
            for label, i in (("last subject", subj), ("last", last)):
                with sgd_step(res, g.x[i : i + 1], g.delta[i : i + 1], lr):
                    after = _run(lm, ids, modules)
                measured = after[m][i] - base[m][i]
                predicted = -lr * float(g.x[i].double().norm() ** 2) * g.delta[i].double()
                err, cos = _rel(measured, predicted)
                singles.append(
                    {
                        "step": f"{m} @ {label}",
                        "position": i,
                        "predicted_norm": float(predicted.norm()),
                        "measured_norm": float(measured.double().norm()),
                        "rel_error": err,
                        "cosine": cos,
                        **{f"{k}_before": v for k, v in before.items()},
                        **{
                            f"{k}_after": v
                            for k, v in _target_stats(after["logits"], target, answer).items()
                        },
                    }
                )
            # The full step, and the two dominant segment terms alone.
            with sgd_step(res, g.x, g.delta, lr):
                full = _run(lm, ids, modules)
            two = sorted({subj, last})
            with sgd_step(res, g.x[two], g.delta[two], lr):
                pair = _run(lm, ids, modules)
            # Exact per-token terms of the change at the last position: -lr (x_n . x_i) delta_i.
            gram = g.x.double() @ g.x[last].double()  # [n]
            terms = -lr * gram[:, None] * g.delta.double()  # [n, d_out]
            full_change = full[m][last] - base[m][last]
            two_change = terms[two].sum(0)
            resid = (full_change.double() - two_change).norm() ** 2
            r2 = 1.0 - float(resid / full_change.double().norm().clamp_min(1e-300) ** 2)
            term_norms = terms.norm(dim=1)
            d_full = float(full["logits"][target] - base["logits"][target])
            d_two = float(pair["logits"][target] - base["logits"][target])
            fulls.append(
                {
                    "matrix": m,
                    "full_rel_error": _rel(full_change, terms.sum(0))[0],
                    "dlogit_full": d_full,
                    "dlogit_two": d_two,
                    "target_prob_full": _target_stats(full["logits"], target, answer)[
                        "target_prob"
                    ],
                    "r2_two_terms": r2,
                    "term_share": (term_norms / term_norms.sum().clamp_min(1e-300)).tolist(),
                    "top2_positions": term_norms.topk(min(2, n)).indices.tolist(),
                }
            )
        return {
            "layer": layer,
            "lr": lr,
            "n": n,
            "subject_pos": subj,
            "tokens": capture.tokens,
            "before": before,
            "single": singles,
            "full": fulls,
        }

    def aggregate(self, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Aggregate:
        """Lemma 5.2's error and the target-logit change per step, over all records.

        Args:
            rows: the records' :meth:`measure` rows (all at the same layer and rate).
            meta: run metadata (unused).

        Returns:
            One table row per single step (errors, cosines, mean target-logit change, share of
            prompts where the target's logit rises) and per matrix's full step (the two terms' R²
            and share of the logit change); no curves; headline with the largest relative error and
            the FF2 last-token shift's effect; ``extra`` holds the figure's points.
        """
        table: list[dict[str, Any]] = []
        headline: dict[str, Any] = {
            "records": len(rows),
            "layer": rows[0]["layer"],
            "lr": rows[0]["lr"],
        }
        for step in STEPS:
            s = [x for r in rows for x in r["single"] if x["step"] == step]
            gains = np.array([x["target_logit_after"] - x["target_logit_before"] for x in s])
            table.append(
                {
                    "step": step,
                    "records": len(s),
                    "max_rel_error": float(max(x["rel_error"] for x in s)),
                    "median_rel_error": float(np.median([x["rel_error"] for x in s])),
                    "min_cosine": float(min(x["cosine"] for x in s)),
                    "mean_dlogit_target": float(gains.mean()),
                    "share_target_up": float((gains > 0).mean()),
                    "mean_target_prob_before": float(np.mean([x["target_prob_before"] for x in s])),
                    "mean_target_prob_after": float(np.mean([x["target_prob_after"] for x in s])),
                }
            )
        headline["max_rel_error"] = max(t["max_rel_error"] for t in table)
        for m in ("ff1", "ff2"):
            f = [x for r in rows for x in r["full"] if x["matrix"] == m]
            d_full = np.array([x["dlogit_full"] for x in f])
            d_two = np.array([x["dlogit_two"] for x in f])
            r2 = np.array([x["r2_two_terms"] for x in f])
            ratio = d_two / np.where(np.abs(d_full) > 1e-12, d_full, np.nan)
            dominant = []
            for r, x in zip(rows, f, strict=False):
                want = {r["subject_pos"], r["n"] - 1}
                dominant.append(
                    set(x["top2_positions"]) <= want or want <= set(x["top2_positions"])
                )
            table.append(
                {
                    "step": f"{m} full step",
                    "records": len(f),
                    "max_rel_error": float(max(x["full_rel_error"] for x in f)),
                    "mean_dlogit_target": float(d_full.mean()),
                    "share_target_up": float((d_full > 0).mean()),
                    "mean_dlogit_two_terms": float(d_two.mean()),
                    "median_logit_share_two_terms": float(np.nanmedian(ratio)),
                    "mean_r2_two_terms": float(r2.mean()),
                    "median_r2_two_terms": float(np.median(r2)),
                    "share_top2_are_subject_and_last": float(np.mean(dominant)),
                }
            )
            headline[f"{m}_mean_r2_two_terms"] = float(r2.mean())
            headline[f"{m}_median_logit_share_two_terms"] = float(np.nanmedian(ratio))
            headline[f"{m}_share_top2_are_subject_and_last"] = float(np.mean(dominant))
            headline[f"{m}_full_mean_dlogit"] = float(d_full.mean())
        shift_last = next(t for t in table if t["step"] == "ff2 @ last")
        headline["ff2_last_share_target_up"] = shift_last["share_target_up"]
        headline["ff2_last_mean_dlogit"] = shift_last["mean_dlogit_target"]
        points = [
            (x["step"], x["predicted_norm"], x["measured_norm"]) for r in rows for x in r["single"]
        ]
        dl = {
            step: [
                x["target_logit_after"] - x["target_logit_before"]
                for r in rows
                for x in r["single"]
                if x["step"] == step
            ]
            for step in STEPS
        }
        for m in ("ff1", "ff2"):
            dl[f"{m} full"] = [
                x["dlogit_full"] for r in rows for x in r["full"] if x["matrix"] == m
            ]
            dl[f"{m} 2 terms"] = [
                x["dlogit_two"] for r in rows for x in r["full"] if x["matrix"] == m
            ]
        return Aggregate(table, {}, headline, {"points": points, "dlogit": dl})

    def figure(self, agg: Aggregate, meta: dict[str, Any]) -> Any:
        """Predicted vs measured change (log-log); target-logit change per step (box plots)."""
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        ax = axes[0]
        colours = dict(zip(STEPS, ("tab:blue", "tab:cyan", "tab:red", "tab:orange"), strict=False))
        for step in STEPS:
            pts = [(p, m) for s, p, m in agg.extra["points"] if s == step]
            if pts:
                p, m = zip(*pts, strict=False)
                ax.loglog(p, m, "o", ms=3, alpha=0.7, color=colours[step], label=step)
        lims = [
            min(min(p[1], p[2]) for p in agg.extra["points"]),
            max(max(p[1], p[2]) for p in agg.extra["points"]),
        ]
        ax.plot(lims, lims, "k--", lw=0.8, label="measured = predicted")
        ax.set_xlabel("Lemma 5.2 prediction ||η ||x_i||² δ_i||")
        ax.set_ylabel("measured change at position i")
        ax.legend(fontsize=7)
        ax.set_title(f"max relative error {agg.headline['max_rel_error']:.1e}", fontsize=9)
        ax = axes[1]
        labels = list(agg.extra["dlogit"])
        ax.boxplot([agg.extra["dlogit"][k] for k in labels], showfliers=False)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right", fontsize=7)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylabel("Δ target logit")
        ax.set_title("target logit change per SGD step", fontsize=9)
        fig.suptitle(
            f"{meta['model']}, layer {agg.headline['layer']}, lr {agg.headline['lr']}, "
            f"{agg.headline['records']} prompts",
            fontsize=10,
        )
        fig.tight_layout()
        return fig

    def finding(self, agg: Aggregate, meta: dict[str, Any]) -> str:
        """State Lemma 5.2's largest relative error and how much the two dominant terms explain."""
        h = agg.headline
        return (
            f"Lemma 5.2 holds to float precision: the largest relative error between the predicted "
            f"and measured change is {h['max_rel_error']:.1e} over {h['records']} prompts "
            f"(layer {h['layer']}, lr {h['lr']}). The last token's FF2 shift raises the target's "
            f"logit in {100 * h['ff2_last_share_target_up']:.0f}% of prompts (mean "
            f"{h['ff2_last_mean_dlogit']:+.3g}). In the full step, the last-subject and last-token "
            f"terms explain R² = {h['ff2_mean_r2_two_terms']:.2f} (FF2) and "
            f"{h['ff1_mean_r2_two_terms']:.2f} (FF1) of the change at the last position, and a "
            f"median {100 * h['ff2_median_logit_share_two_terms']:.0f}% (FF2) / "
            f"{100 * h['ff1_median_logit_share_two_terms']:.0f}% (FF1) of the target-logit change."
        )
