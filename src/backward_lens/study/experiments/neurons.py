"""App. C (Tables 2-5, Figs. 7-9): one layer's gradient, neuron by neuron, vs its spanning set.

The dense gradient of one layer is compared with the n spanning vectors it is built from. Each FF2
gradient neuron is sum_i x_i^FF2[j] delta_i and each FF1 neuron sum_i delta_i^FF1[j] x_i (Eqs.
9-10). For every neuron (highest norm first) we compare its lens reading with each spanning
vector's: the overlap of their top-``top`` tokens, sign-aware (negative when the overlap is larger
after flipping the neuron's sign), and their cosine. The paper's claim: every high-norm neuron
matches one or two spanning vectors. We also report the exact share of each neuron's norm budget
sum_i |c_ij| ||s_i|| held by its two largest terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from backward_lens.capture import Capture
from backward_lens.models import LensModel
from backward_lens.study.base import Aggregate, Experiment, Item, StudyOptions, rounded
from backward_lens.study.figures import pyplot

MATCH = 0.5
"""A neuron 'matches' a spanning vector when they share at least half their top tokens."""
HIGH = 0.10
"""High-norm neurons: the top 10% of a matrix's neurons by norm."""
DETAIL = 64
"""Neurons kept in full (score and cosine against every spanning vector) per record."""
BINS = ((0.0, 0.01), (0.01, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 1.0))


def default_layer(n_layers: int) -> int:
    """The paper's App. C studies layer 14 of GPT-2 medium's 24: the same relative depth."""
    return round(14 / 23 * (n_layers - 1))


def _lens_is_odd(lm: LensModel) -> bool:
    """True if LL logits are odd in v (RMSNorm, no bias): then top(-v) = bottom(v) exactly."""
    v = torch.randn(2, lm.lens.unembed.shape[1], generator=torch.Generator().manual_seed(0))
    a, b = lm.lens.logits(v), lm.lens.logits(-v)
    return bool(torch.allclose(a, -b, rtol=1e-4, atol=1e-4 * float(a.abs().max())))


def top_ids(lm: LensModel, vectors: torch.Tensor, k: int, odd: bool) -> tuple[torch.Tensor, ...]:
    """Top-k token ids of LL(v) and of LL(-v) for each row of ``vectors`` [N, d]."""
    pos, neg = [], []
    for s in range(0, vectors.shape[0], 128):
        chunk = vectors[s : s + 128]
        logits = lm.lens.logits(chunk)
        pos.append(logits.topk(k, dim=-1).indices.cpu())
        if odd:
            neg.append(logits.topk(k, dim=-1, largest=False).indices.cpu())
        else:
            neg.append(lm.lens.logits(-chunk).topk(k, dim=-1).indices.cpu())
    return torch.cat(pos), torch.cat(neg)


def overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_j ∩ b_i| for id lists a [N, k] and b [M, k] -> [N, M]."""
    return (a[:, None, :, None] == b[None, :, None, :]).sum((-1, -2))


def signed_overlap(g_pos: torch.Tensor, g_neg: torch.Tensor, s_pos: torch.Tensor, k: int) -> Any:
    """Overlap of top tokens, negative when flipping the neuron matches better; in [-1, 1]."""
    plus, minus = overlap(g_pos, s_pos), overlap(g_neg, s_pos)
    return torch.where(plus >= minus, plus, -minus).float() / k


class NeuronsExperiment(Experiment):
    """App. C (Tables 2-5, Figs. 7-9): high-norm gradient neurons vs one or two spanning vectors.

    Studies one block (``StudyOptions.layer``, default the relative depth of GPT-2 medium's layer
    14, see :func:`default_layer`); FF2 neurons are compared with the VJPs delta_i, FF1 neurons with
    the inputs x_i (Eqs. 9-10).
    """

    name = "neurons"
    title = "Gradient neurons vs spanning vectors (paper App. C)"
    paper = (
        "App. C (GPT-2 medium, layer 14, 'Lionel Messi plays for' -> 'Paris'): high-norm FF2 "
        "gradient neurons project like ±δ_n of the last token; all projected tokens correlate "
        "with only one or two spanning vectors; low-norm neurons project like the zero vector."
    )
    matrices = ("ff1", "ff2")

    def measure(
        self, lm: LensModel, item: Item, capture: Capture, options: StudyOptions
    ) -> dict[str, Any]:
        """Compare the studied layer's highest-norm neurons with the spanning vectors of one prompt.

        Only the ``options.max_neurons`` largest neurons per matrix are built (through the factors,
        never the dense gradient); their lens readings are compared with every spanning vector's
        top-``options.top`` tokens.

        Returns:
            ``layer``, ``tokens``, ``odd_lens`` and, per matrix (``ff1``, ``ff2``): ``d_m`` (neuron
            count), the kept neurons' ``norms`` (descending), ``best_span``/``best_score`` (the best
            matching spanning vector and its signed overlap in [-1, 1]), ``best_abs_cos``,
            ``matches`` (spanning vectors sharing at least :data:`MATCH` of the top tokens),
            ``top2_share`` (the two largest terms' share of sum_i |c_ij| ||s_i||) and a ``detail``
            block of the first :data:`DETAIL` neurons for the figure.
        """
        layer = options.resolve_layer(lm.arch, default_layer(lm.n_layers))
        odd = _lens_is_odd(lm)
        k = options.top
        out: dict[str, Any] = {"layer": layer, "tokens": capture.tokens, "odd_lens": odd}
        for name in ("ff1", "ff2"):
            g = capture.gradient(layer, name)
            if name == "ff1":  # neurons live in the input space; spanning set x_i
                norms = g.input_space_neuron_norms()
                span, coef = g.x, g.delta  # coef [n, d_m]
            else:
                norms = g.output_space_neuron_norms()
                span, coef = g.delta, g.x
            d_m = int(norms.shape[0])
            order = torch.argsort(norms, descending=True)
            keep = order[: options.max_neurons] if options.max_neurons else order
            neurons = (
                g.input_space_neurons(keep) if name == "ff1" else g.output_space_neurons(keep)
            )  # [K, d], built through the factors: the dense gradient restricted to these rows
            g_pos, g_neg = top_ids(lm, neurons, k, odd)
            s_pos, _ = top_ids(lm, span, k, odd)
            score = signed_overlap(g_pos, g_neg, s_pos, k)  # [K, n]
            unit_n = neurons / neurons.norm(dim=1, keepdim=True).clamp_min(1e-30)
            unit_s = span / span.norm(dim=1, keepdim=True).clamp_min(1e-30)
            cos = unit_n @ unit_s.T  # [K, n]
            terms = coef[:, keep].abs().T * span.norm(dim=1)[None, :]  # [K, n]: |c_ij| ||s_i||
            top2 = terms.topk(min(2, terms.shape[1]), dim=1).values.sum(1)
            share2 = top2 / terms.sum(1).clamp_min(1e-30)
            best = score.abs().argmax(1)
            proj_top = lm.lens.project(neurons[:10], k=3)
            proj_span = lm.lens.project(span, k=3)
            out[name] = {
                "d_m": d_m,
                "norms": rounded(norms[keep].numpy(), 4),
                "best_span": best.tolist(),
                "best_score": rounded(score.gather(1, best[:, None])[:, 0].numpy(), 3),
                "best_abs_cos": rounded(cos.abs().max(1).values.numpy(), 3),
                "matches": (score.abs() >= MATCH).sum(1).tolist(),
                "top2_share": rounded(share2.numpy(), 4),
                "detail": {
                    "score": rounded(score[:DETAIL].numpy(), 3),
                    "cos": rounded(cos[:DETAIL].numpy(), 3),
                    "neuron_top": [lm.decode(r.tolist()) for r in proj_top.top_ids],
                    "neuron_bottom": [lm.decode(r.tolist()) for r in proj_top.bottom_ids],
                    "span_norms": rounded(span.norm(dim=1).numpy(), 4),
                    "span_top": [lm.decode(r.tolist()) for r in proj_span.top_ids],
                    "span_bottom": [lm.decode(r.tolist()) for r in proj_span.bottom_ids],
                },
            }
        return out

    def aggregate(self, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Aggregate:
        """Match statistics per matrix and neuron-norm bin (:data:`BINS`, fractions of the neurons).

        Args:
            rows: the records' :meth:`measure` rows (all at the same layer).
            meta: run metadata (unused).

        Returns:
            Table rows ``matrix, norm_rank_from, norm_rank_to, neurons, share_matching_1_or_2,
            share_matching_none, mean_best_overlap, mean_best_abs_cos, mean_top2_term_share``; no
            curves; headline with, per matrix, the top :data:`HIGH` neurons' share matching one or
            two spanning vectors, their top-2 term share and best cosine; ``extra`` holds the
            histogram of matches and the first record (the figure's example).
        """
        table: list[dict[str, Any]] = []
        headline: dict[str, Any] = {"records": len(rows), "layer": rows[0]["layer"]}
        hist: dict[str, list[float]] = {}
        for name in ("ff1", "ff2"):
            for lo, hi in BINS:
                sel: dict[str, list[float]] = {
                    "matches12": [],
                    "score": [],
                    "cos": [],
                    "share2": [],
                    "zero": [],
                }
                for r in rows:
                    m = r[name]
                    d_m, count = m["d_m"], len(m["norms"])
                    a, b = int(lo * d_m), min(count, int(np.ceil(hi * d_m)))
                    for j in range(a, b):
                        sel["matches12"].append(1.0 if 1 <= m["matches"][j] <= 2 else 0.0)
                        sel["zero"].append(1.0 if m["matches"][j] == 0 else 0.0)
                        sel["score"].append(abs(m["best_score"][j] or 0.0))
                        sel["cos"].append(m["best_abs_cos"][j] or 0.0)
                        sel["share2"].append(m["top2_share"][j] or 0.0)
                if not sel["score"]:
                    continue
                table.append(
                    {
                        "matrix": name,
                        "norm_rank_from": lo,
                        "norm_rank_to": hi,
                        "neurons": len(sel["score"]),
                        "share_matching_1_or_2": float(np.mean(sel["matches12"])),
                        "share_matching_none": float(np.mean(sel["zero"])),
                        "mean_best_overlap": float(np.mean(sel["score"])),
                        "mean_best_abs_cos": float(np.mean(sel["cos"])),
                        "mean_top2_term_share": float(np.mean(sel["share2"])),
                    }
                )
            high = []
            share2 = []
            best_cos = []
            counts = np.zeros(4)
            for r in rows:
                m = r[name]
                h = int(np.ceil(HIGH * m["d_m"]))
                for c in m["matches"][:h]:
                    counts[min(c, 3)] += 1
                high += [1.0 if 1 <= c <= 2 else 0.0 for c in m["matches"][:h]]
                share2 += [s or 0.0 for s in m["top2_share"][:h]]
                best_cos += [c or 0.0 for c in m["best_abs_cos"][:h]]
            headline[f"{name}_high_norm_match_1_or_2"] = float(np.mean(high))
            headline[f"{name}_high_norm_top2_share"] = float(np.mean(share2))
            headline[f"{name}_high_norm_best_abs_cos"] = float(np.mean(best_cos))
            hist[name] = (counts / counts.sum()).tolist()
        first = rows[0]
        return Aggregate(table, {}, headline, {"hist": hist, "example": first})

    def figure(self, agg: Aggregate, meta: dict[str, Any]) -> Any:
        """Figs. 7-9: overlap and cosine maps of the example's neurons, histogram of matches."""
        plt = pyplot()
        ex = agg.extra["example"]
        fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
        for row, name in enumerate(("ff1", "ff2")):
            m = ex[name]
            d = m["detail"]
            score = np.array(d["score"], dtype=float)
            cos = np.array(d["cos"], dtype=float)
            pairs = zip(ex["tokens"], d["span_norms"], strict=True)
            labels = [f"{t!r} |{n:.2g}|" for t, n in pairs]
            for ax, mat, title in (
                (axes[row, 0], score, f"signed top-{meta['options']['top']} overlap"),
                (axes[row, 1], cos, "cosine"),
            ):
                im = ax.imshow(
                    mat, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest"
                )
                ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=6)
                ax.set_ylabel(f"{name} neurons by norm (top {mat.shape[0]})", fontsize=7)
                ax.set_title(f"{name.upper()}: {title}", fontsize=8.5)
                plt.colorbar(im, ax=ax, fraction=0.04)
            ax = axes[row, 2]
            hist = agg.extra["hist"][name]
            ax.bar(["0", "1", "2", "3+"], [100 * h for h in hist], color="tab:purple")
            ax.set_title(
                f"{name.upper()}: spanning vectors matched by the top {int(100 * HIGH)}% "
                f"neurons ({agg.headline['records']} prompts)",
                fontsize=8,
            )
            ax.set_ylabel("% of high-norm neurons", fontsize=7)
        fig.suptitle(
            f"{meta['model']}, layer {agg.headline['layer']}: example prompt "
            f"{''.join(ex['tokens'])!r}",
            fontsize=9,
        )
        fig.tight_layout()
        return fig

    def finding(self, agg: Aggregate, meta: dict[str, Any]) -> str:
        """State the share of high-norm neurons matching one or two spanning vectors (FF2, FF1)."""
        h = agg.headline
        ex = agg.extra["example"]["ff2"]["detail"]
        return (
            f"At layer {h['layer']}, {100 * h['ff2_high_norm_match_1_or_2']:.0f}% of the top-"
            f"{int(100 * HIGH)}% FF2 gradient neurons (by norm) share at least {int(100 * MATCH)}% "
            f"of their top tokens with one or two spanning vectors δ_i "
            f"(FF1 with x_i: {100 * h['ff1_high_norm_match_1_or_2']:.0f}%); their two largest "
            f"terms hold {100 * h['ff2_high_norm_top2_share']:.0f}% (FF2) and "
            f"{100 * h['ff1_high_norm_top2_share']:.0f}% (FF1) of the norm budget "
            f"sum_i |c_ij| ||s_i||, and their best |cosine| with a single spanning vector averages "
            f"{h['ff2_high_norm_best_abs_cos']:.2f} (FF2) and "
            f"{h['ff1_high_norm_best_abs_cos']:.2f} "
            f"(FF1). Example: the largest FF2 neuron's least probable tokens are "
            f"{ex['neuron_bottom'][0]}, the last token's δ_n's {ex['span_bottom'][-1]}."
        )
