"""Fig. 3: how often a layer's gradient has full rank n (Lemma 4.1); rank 1 at the last layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from backward_lens.capture import Capture
from backward_lens.models import LensModel
from backward_lens.study.base import Aggregate, Experiment, Item, StudyOptions, layer_axis
from backward_lens.study.figures import pyplot


class RankExperiment(Experiment):
    """Fig. 3: the share of prompts whose MLP gradients have full rank n, per layer.

    Lemma 4.1 bounds the rank of dL/dW by the prompt length n; App. A shows the last layer's
    gradient has rank 1 (only the last position's VJP is non-zero there). Ranks come from
    :meth:`backward_lens.lowrank.LowRankGradient.rank` (float32 tolerance, see there).
    """

    name = "rank"
    title = "Gradient rank per layer (paper Fig. 3)"
    paper = (
        "Fig. 3 (GPT-2 small/medium/large/xl, Llama-2-7B, 100 CounterFact prompts): rank(dL/dFF1) "
        "equals the prompt length n for > 98.5% of prompts in every layer but the last, whose "
        "gradient has rank 1 (App. A)."
    )
    matrices = None  # ff1, gate (gated MLPs) and ff2

    def measure(
        self, lm: LensModel, item: Item, capture: Capture, options: StudyOptions
    ) -> dict[str, Any]:
        """Rank of every captured matrix's gradient at every layer of one prompt.

        Returns:
            ``{"n": prompt length in tokens, "ranks": {matrix: [rank per layer]}}``.
        """
        ranks = {name: [g.rank() for g in grads] for name, grads in capture.gradients.items()}
        return {"n": capture.n, "ranks": ranks}

    def aggregate(self, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Aggregate:
        """Share of prompts with rank = n, per matrix and layer.

        Args:
            rows: the records' :meth:`measure` rows.
            meta: run metadata; reads ``n_layers``.

        Returns:
            Table rows ``matrix, layer, layer_norm, share_full_rank, mean_rank, mean_deficit,
            share_rank_1``; one curve per matrix (% of prompts with rank = n against the normalised
            layer index); per matrix the headline's minimum and mean full-rank percentage over every
            layer but the last, the worst layer, the largest deficit and the last layer's rank-1
            percentage.
        """
        n_layers = int(meta["n_layers"])
        axis = layer_axis(n_layers)
        names = list(rows[0]["ranks"])
        n = np.array([r["n"] for r in rows])
        table, curves, headline = [], {}, {"records": len(rows), "mean_n": float(n.mean())}
        for name in names:
            ranks = np.array([r["ranks"][name] for r in rows])  # [R, L]
            full = (ranks == n[:, None]).mean(0)
            curves[f"{name} rank = n (%)"] = {"x": axis, "y": (100 * full).tolist()}
            for layer in range(n_layers):
                table.append(
                    {
                        "matrix": name,
                        "layer": layer,
                        "layer_norm": axis[layer],
                        "share_full_rank": float(full[layer]),
                        "mean_rank": float(ranks[:, layer].mean()),
                        "mean_deficit": float((n - ranks[:, layer]).mean()),
                        "share_rank_1": float((ranks[:, layer] == 1).mean()),
                    }
                )
            body = full[:-1] if n_layers > 1 else full
            headline[f"{name}_full_rank_min_pct"] = float(100 * body.min())
            headline[f"{name}_full_rank_mean_pct"] = float(100 * body.mean())
            headline[f"{name}_worst_layer"] = int(body.argmin())
            headline[f"{name}_last_layer_rank1_pct"] = float(100 * (ranks[:, -1] == 1).mean())
            headline[f"{name}_max_deficit"] = int((n[:, None] - ranks[:, :-1]).max(initial=0))
        return Aggregate(table, curves, headline)

    def figure(self, agg: Aggregate, meta: dict[str, Any]) -> Any:
        """Plot % of prompts with rank = n per normalised layer, with the paper's 98.5% line."""
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for label, c in agg.curves.items():
            ax.plot(c["x"], c["y"], marker=".", label=label)
        ax.set_xlabel("normalised layer index")
        ax.set_ylabel("% of prompts with rank = n")
        ax.set_ylim(-3, 103)
        ax.axhline(98.5, color="grey", lw=0.8, ls="--", label="paper: 98.5%")
        ax.legend(fontsize=8, loc="center left")
        ax.set_title(
            f"{meta['model']}: gradient rank = prompt length ({agg.headline['records']} prompts)",
            fontsize=10,
        )
        fig.tight_layout()
        return fig

    def finding(self, agg: Aggregate, meta: dict[str, Any]) -> str:
        """State the full-rank shares per matrix and the last layer's rank-1 share."""
        h = agg.headline
        parts = [
            f"FF1's gradient has full rank n in {h['ff1_full_rank_min_pct']:.1f}% to 100% of "
            f"prompts at every layer but the last (mean {h['ff1_full_rank_mean_pct']:.1f}%; "
            f"lowest at layer {h['ff1_worst_layer']}; largest rank deficit "
            f"{h['ff1_max_deficit']}), FF2's in at least {h['ff2_full_rank_min_pct']:.1f}%",
        ]
        if "gate_full_rank_min_pct" in h:
            parts.append(f" and the gate's in at least {h['gate_full_rank_min_pct']:.1f}%")
        parts.append(
            f"; the last layer's gradient has rank 1 in {h['ff1_last_layer_rank1_pct']:.0f}% "
            f"(FF1) and {h['ff2_last_layer_rank1_pct']:.0f}% (FF2) of prompts "
            f"(mean prompt length {h['mean_n']:.1f} tokens)."
        )
        return "".join(parts)
