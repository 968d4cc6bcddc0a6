"""Figs. 6, 18: rank of the target token in the lens of FF2's VJPs, per segment and layer.

Descent subtracts delta_i, so the target should sit among the *least* probable tokens of
LL(delta_i) (Lemma 5.1). Ranks are divided by |V| - 1 so that 1.0 = least probable for any model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from backward_lens.capture import Capture
from backward_lens.models import LensModel
from backward_lens.study.base import (
    Aggregate,
    Experiment,
    Item,
    StudyOptions,
    as_array,
    chunked_ranks,
    layer_axis,
    ordered_segments,
    segment_means,
)
from backward_lens.study.figures import heatmap, pyplot
from backward_lens.study.segments import SEGMENT_LABELS


class TargetRankExperiment(Experiment):
    """Figs. 6, 18 (App. F.2, H): the target's rank in LL(delta_i) of FF2 per segment and layer.

    Lemma 5.1 predicts the target among the least probable tokens of each delta_i (descent subtracts
    delta_i). Both the plain logit lens and the normalised lens (App. H: each delta_i L2-normalised
    before the lens) are read.
    """

    name = "target-rank"
    title = "Rank of the target in the lens of FF2 VJPs (paper Figs. 6, 18)"
    paper = (
        "Figs. 6/18 (GPT-2 medium/xl, Llama-2-7B): the last token's δ_n ranks the target among "
        "the least probable tokens in most layers (normalised rank near 1), with some degradation "
        "in the first layers; other tokens' δ_i mostly rank it improbable too; normalising δ "
        "before the lens strengthens this (App. H)."
    )
    matrices = ("ff2",)

    def measure(
        self, lm: LensModel, item: Item, capture: Capture, options: StudyOptions
    ) -> dict[str, Any]:
        """The target's lens rank in every FF2 VJP delta_i of one prompt.

        Returns:
            ``tokens``, ``segments``, ``target_id`` and the [layers, n] rank lists ``rank_raw``
            (logit lens) and ``rank_normalized`` (normalised lens); 0 = most probable, |V| - 1 =
            least.
        """
        delta = capture.stack("ff2", "delta")  # [L, n, d]
        shape = delta.shape[:2]
        target = capture.target_id
        raw = chunked_ranks(lm, delta, target, normalized=False).reshape(shape)
        norm = chunked_ranks(lm, delta, target, normalized=True).reshape(shape)
        return {
            "tokens": capture.tokens,
            "segments": item.segmentation.positions,
            "target_id": target,
            "rank_raw": raw.tolist(),
            "rank_normalized": norm.tolist(),
        }

    def aggregate(self, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Aggregate:
        """Mean normalised rank (rank / (|V| - 1), 1 = least probable) per segment and layer.

        Args:
            rows: the records' :meth:`measure` rows.
            meta: run metadata; reads ``n_layers`` and ``vocab_size``.

        Returns:
            Table rows ``segment, layer, layer_norm, rank_raw, rank_normalized_lens, records``; the
            last token's curves for both lenses (Fig. 18); headline with the last token's mean rank,
            the share of (prompt, layer) pairs with the target in the bottom 1% and the other
            segments' mean rank.
        """
        n_layers, top = int(meta["n_layers"]), int(meta["vocab_size"]) - 1
        axis = layer_axis(n_layers)
        scaled = [
            dict(
                r,
                raw=(as_array(r["rank_raw"]) / top).tolist(),
                norm=(as_array(r["rank_normalized"]) / top).tolist(),
            )
            for r in rows
        ]
        raw, counts = segment_means(scaled, "raw")
        norm, _ = segment_means(scaled, "norm")
        segs = ordered_segments(raw)
        table = [
            {
                "segment": s,
                "layer": layer,
                "layer_norm": axis[layer],
                "rank_raw": float(raw[s][layer]),
                "rank_normalized_lens": float(norm[s][layer]),
                "records": counts[s],
            }
            for s in segs
            for layer in range(n_layers)
        ]
        curves = {
            "last token (raw lens)": {"x": axis, "y": raw["last"].tolist()},
            "last token (normalised lens)": {"x": axis, "y": norm["last"].tolist()},
        }
        last_raw = np.stack([as_array(r["rank_raw"])[:, -1] for r in rows])  # [R, L]
        last_norm = np.stack([as_array(r["rank_normalized"])[:, -1] for r in rows])
        q = max(1, n_layers // 4)
        others = [s for s in segs if s not in ("last", "bos")]
        headline = {
            "records": len(rows),
            "vocab_size": top + 1,
            "last_mean_raw": float(raw["last"].mean()),
            "last_mean_normalized": float(norm["last"].mean()),
            "last_mean_raw_after_first_quarter": float(raw["last"][q:].mean()),
            "last_min_layer_raw": int(np.argmin(raw["last"])),
            "last_min_raw": float(raw["last"].min()),
            "last_share_bottom_1pct_raw": float((last_raw >= 0.99 * top).mean()),
            "last_share_bottom_1pct_normalized": float((last_norm >= 0.99 * top).mean()),
            "last_share_least_probable_raw": float((last_raw == top).mean()),
            "last_median_tokens_below_raw": float(np.median(top - last_raw)),
            "other_segments_mean_raw": float(np.nanmean([raw[s][:-1].mean() for s in others]))
            if others
            else None,
            "other_segments_mean_normalized": float(
                np.nanmean([norm[s][:-1].mean() for s in others])
            )
            if others
            else None,
        }
        return Aggregate(
            table,
            curves,
            headline,
            {
                "segments": segs,
                "raw": {s: raw[s].tolist() for s in segs},
                "norm": {s: norm[s].tolist() for s in segs},
            },
        )

    def figure(self, agg: Aggregate, meta: dict[str, Any]) -> Any:
        """Segment x layer heatmaps for both lenses and the last token's curves (Figs. 6 and 18)."""
        plt = pyplot()
        segs = agg.extra["segments"]
        fig = plt.figure(figsize=(11, 5.4))
        grid = fig.add_gridspec(2, 2, width_ratios=[2.2, 1])
        for k, (key, label) in enumerate((("raw", "logit lens"), ("norm", "normalised lens"))):
            ax = fig.add_subplot(grid[k, 0])
            m = np.array([as_array(agg.extra[key][s]) for s in segs])
            heatmap(ax, m, segs, f"target rank / (|V|-1) in LL(δ_i), {label}", "RdYlBu", 0, 1)
        ax = fig.add_subplot(grid[:, 1])
        for label, c in agg.curves.items():
            ax.plot(c["x"], c["y"], marker=".", label=label)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("normalised layer index")
        ax.set_ylabel("normalised rank (1 = least probable)")
        ax.legend(fontsize=7)
        ax.set_title("last token δ_n (Fig. 18)", fontsize=9)
        fig.suptitle(
            f"{meta['model']}: {agg.headline['records']} prompts, |V| = {meta['vocab_size']}",
            fontsize=10,
        )
        fig.tight_layout()
        return fig

    def finding(self, agg: Aggregate, meta: dict[str, Any]) -> str:
        """State how improbable the target is in the last token's delta_n and in other segments."""
        h = agg.headline
        return (
            f"In the last token's δ_n the target's mean normalised rank is "
            f"{h['last_mean_raw']:.3f} "
            f"(raw lens; {h['last_mean_raw_after_first_quarter']:.3f} after the first quarter of "
            f"the layers, lowest {h['last_min_raw']:.3f} at layer {h['last_min_layer_raw']}) and "
            f"{h['last_mean_normalized']:.3f} with the normalised lens; the target is among the 1% "
            f"least probable tokens in {100 * h['last_share_bottom_1pct_raw']:.0f}% of "
            f"(prompt, layer) pairs (normalised lens: "
            f"{100 * h['last_share_bottom_1pct_normalized']:.0f}%). Other segments' δ_i give a "
            f"mean normalised rank of {h['other_segments_mean_raw']:.3f} "
            f"({SEGMENT_LABELS['last']} excluded, last layer excluded)."
        )
