"""Figs. 5, 16, 17: where the update lives, per prompt segment and layer.

The measures are the mean ||delta_i|| of FF2's VJPs and ||x_i|| of FF1's inputs.
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
    layer_axis,
    ordered_segments,
    rounded,
    segment_means,
)
from backward_lens.study.figures import heatmap, pyplot
from backward_lens.study.segments import SEGMENT_LABELS


class NormsExperiment(Experiment):
    """Figs. 5, 16, 17 (App. F.1): mean ||delta_i|| (FF2) and ||x_i|| (FF1) per segment and layer.

    Positions are grouped by ROME's causal-tracing segments (:mod:`backward_lens.study.segments`):
    the paper finds the update on the subject tokens (mostly the last one) in the first quarter of
    the layers and on the last prompt token around the middle layers.
    """

    name = "norms"
    title = "VJP and input norms per prompt segment (paper Figs. 5, 16, 17)"
    paper = (
        "Figs. 5/16 (GPT-2 xl, 100 CounterFact edits): ||delta_i|| concentrates on the subject "
        "tokens, mostly the last subject token, in the first quarter of the layers, and on the "
        "last prompt token around the middle layers; other (token, layer) VJPs are near 0. "
        "Fig. 17: ||x_i|| does not follow ||delta_i||."
    )
    matrices = ("ff1", "ff2")

    def measure(
        self, lm: LensModel, item: Item, capture: Capture, options: StudyOptions
    ) -> dict[str, Any]:
        """Per-position norms of FF2's VJPs and FF1's inputs for one prompt.

        Returns:
            ``tokens``, ``segments`` (segment -> positions), ``delta_norm`` (||delta_i|| of FF2)
            and ``x_norm`` (||x_i|| of FF1), each a [layers, n] nested list (6 significant digits).
        """
        delta = capture.stack("ff2", "delta").norm(dim=-1)  # [L, n]
        x = capture.stack("ff1", "x").norm(dim=-1)  # [L, n]
        return {
            "tokens": capture.tokens,
            "segments": item.segmentation.positions,
            "delta_norm": rounded(delta.numpy()),
            "x_norm": rounded(x.numpy()),
        }

    def aggregate(self, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Aggregate:
        """Mean norms per segment and layer, averaged over records (each a mean over positions).

        Args:
            rows: the records' :meth:`measure` rows.
            meta: run metadata; reads ``n_layers``.

        Returns:
            Table rows ``segment, layer, layer_norm, delta_norm, x_norm, records``; curves of
            ||delta|| relative to the model's largest ROME-segment mean (models differ in VJP scale
            by orders of magnitude); headline with each segment's peak layer, the top segment of the
            first quarter and of the middle half of the layers, and the Pearson r of ||x_i|| and
            ||delta_i|| over all (layer, position) cells but the last layer's (Fig. 17).
        """
        n_layers = int(meta["n_layers"])
        axis = layer_axis(n_layers)
        d_means, counts = segment_means(rows, "delta_norm")
        x_means, _ = segment_means(rows, "x_norm")
        segs = ordered_segments(d_means)
        table = [
            {
                "segment": s,
                "layer": layer,
                "layer_norm": axis[layer],
                "delta_norm": float(d_means[s][layer]),
                "x_norm": float(x_means[s][layer]),
                "records": counts[s],
            }
            for s in segs
            for layer in range(n_layers)
        ]
        # Models differ in VJP scale by orders of magnitude (Gemma's are ~50x SmolLM2's), so the
        # curves that `compare` overlays are relative to the model's largest ROME-segment mean.
        scale = max(float(np.nanmax(d_means[s])) for s in segs if s not in ("bos", "prefix"))
        curves = {
            f"||δ|| / model max: {SEGMENT_LABELS[s]}": {
                "x": axis,
                "y": (d_means[s] / scale).tolist(),
            }
            for s in ("first_subject", "last_subject", "first_subsequent", "last")
            if s in d_means
        }
        headline: dict[str, Any] = {"records": len(rows)}
        for s in ("last_subject", "last"):
            if s in d_means:
                peak = int(np.nanargmax(d_means[s]))
                headline[f"{s}_peak_layer"] = peak
                headline[f"{s}_peak_layer_norm"] = axis[peak]
                headline[f"{s}_peak"] = float(d_means[s][peak])
        q = max(1, n_layers // 4)
        ordinary = [s for s in segs if s not in ("bos",)]
        early = {s: float(np.nanmean(d_means[s][:q])) for s in ordinary}
        headline["first_quarter_top_segment"] = max(early, key=lambda s: early[s])
        headline["first_quarter_mean"] = early
        mid = slice(n_layers // 4, 3 * n_layers // 4)
        middle = {s: float(np.nanmean(d_means[s][mid])) for s in ordinary}
        headline["middle_half_top_segment"] = max(middle, key=lambda s: middle[s])
        headline["middle_half_mean"] = middle
        rome = [s for s in ordinary if s != "prefix"]  # ROME's six segments, the paper's figure
        headline["first_quarter_top_rome_segment"] = max(rome, key=lambda s: early[s])
        headline["middle_half_top_rome_segment"] = max(rome, key=lambda s: middle[s])
        # Fig. 17: do ||x_i|| and ||delta_i|| go together? Pearson r over all (layer, position)
        # cells of all records, last layer excluded (its non-last VJPs are exactly 0).
        xs = np.concatenate([as_array(r["x_norm"])[:-1].ravel() for r in rows])
        ds = np.concatenate([as_array(r["delta_norm"])[:-1].ravel() for r in rows])
        ok = np.isfinite(xs) & np.isfinite(ds)
        headline["pearson_x_delta"] = (
            float(np.corrcoef(xs[ok], ds[ok])[0, 1]) if ok.sum() > 2 else None
        )
        if "bos" in d_means:
            headline["bos_mean_delta"] = float(np.nanmean(d_means["bos"]))
        return Aggregate(
            table,
            curves,
            headline,
            {
                "segments": segs,
                "delta": {s: d_means[s].tolist() for s in segs},
                "x": {s: x_means[s].tolist() for s in segs},
                "counts": counts,
            },
        )

    def figure(self, agg: Aggregate, meta: dict[str, Any]) -> Any:
        """Segment x layer heatmaps of ||delta_i|| (FF2) above ||x_i|| (FF1), BOS row clipped."""
        plt = pyplot()
        segs = agg.extra["segments"]
        fig, axes = plt.subplots(2, 1, figsize=(8, 5.6))
        d = np.array([as_array(agg.extra["delta"][s]) for s in segs])
        x = np.array([as_array(agg.extra["x"][s]) for s in segs])
        for ax, m, what, cmap in (
            (axes[0], d, "mean ||δ_i|| of FF2 (the update's weight per token)", "Reds"),
            (axes[1], x, "mean ||x_i|| of FF1 (forward inputs)", "Blues"),
        ):
            title, vmax = what, None
            if "bos" in segs and len(segs) > 1:
                # BOS is an attention sink with norms far above the rest: clip it, say so.
                rest = np.nanmax(m[[i for i, s in enumerate(segs) if s != "bos"]])
                top = np.nanmax(m[segs.index("bos")])
                if top > 1.5 * rest:
                    vmax = float(rest)
                    title += f" (BOS row clipped; its max is {top:.3g})"
            heatmap(ax, m, segs, title, cmap, vmin=0, vmax=vmax)
        fig.suptitle(f"{meta['model']}: {agg.headline['records']} CounterFact prompts", fontsize=10)
        fig.tight_layout()
        return fig

    def finding(self, agg: Aggregate, meta: dict[str, Any]) -> str:
        """State where ||delta_i|| peaks (segment and layer) and how ||x_i|| correlates with it."""
        h = agg.headline
        n_layers = int(meta["n_layers"])
        lab = SEGMENT_LABELS
        early = h["first_quarter_mean"]
        middle = h["middle_half_mean"]
        top_e, top_m = h["first_quarter_top_segment"], h["middle_half_top_segment"]
        rome_e, rome_m = h["first_quarter_top_rome_segment"], h["middle_half_top_rome_segment"]
        text = (
            f"In the first quarter of the layers the largest mean ||δ_i|| among ROME's segments "
            f"is at the {lab[rome_e]} ({early[rome_e]:.3g}); in the middle half at the "
            f"{lab[rome_m]} ({middle[rome_m]:.3g}). "
        )
        if (top_e, top_m) != (rome_e, rome_m):
            text += (
                f"Counting every segment, the largest are the {lab[top_e]} "
                f"({early[top_e]:.3g}) and the {lab[top_m]} ({middle[top_m]:.3g}). "
            )
        if "last_subject_peak_layer" in h and "last_peak_layer" in h:
            text += (
                f"The last subject token peaks at layer {h['last_subject_peak_layer']} of "
                f"{n_layers} ({h['last_subject_peak']:.3g}), the last token at layer "
                f"{h['last_peak_layer']} ({h['last_peak']:.3g}). "
            )
        if h.get("pearson_x_delta") is not None:
            text += f"||x_i|| and ||δ_i|| correlate with Pearson r = {h['pearson_x_delta']:.2f}."
        return text
