"""App. G (Figs. 22-23): cosine similarity of the same token's FF2 VJPs across layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from backward_lens.capture import Capture
from backward_lens.models import LensModel
from backward_lens.study.base import (
    Aggregate,
    Experiment,
    Item,
    StudyOptions,
    as_array,
    layer_axis,
    quiet_warnings,
    rounded,
)
from backward_lens.study.figures import pyplot
from backward_lens.study.segments import SEGMENT_LABELS, SEGMENTS

SHOWN = ("first_subject", "last_subject", "last")


def layer_cosines(delta: torch.Tensor) -> np.ndarray:
    """[L, n, d] VJPs -> [n, L, L] cosine matrices; NaN where a VJP is exactly zero."""
    v = delta.double().transpose(0, 1)  # [n, L, d]
    norms = v.norm(dim=-1, keepdim=True)
    unit = v / norms
    cos = unit @ unit.transpose(1, 2)
    return cos.numpy()


class SimilarityExperiment(Experiment):
    """App. G (Figs. 22-23): cos(delta_t^i, delta_t^j) of one token's FF2 VJPs at layers i and j.

    The paper finds about 0.4 over runs of 3-5 consecutive blocks for every token and, for the
    last token, more than 0.7 across about 10 of GPT-2 xl's 48 blocks.
    """

    name = "similarity"
    title = "Similarity of a token's VJPs across layers (paper App. G)"
    paper = (
        "App. G, Figs. 22-23 (GPT-2 xl): cos(δ_t^i, δ_t^j) is about 0.4 over runs of 3-5 "
        "consecutive blocks for every token; for the last token, averaged over 100 edits, it is "
        "> 0.7 across ~10 of 48 blocks, and even layer 0 vs layer 47 is > 0.08."
    )
    matrices = ("ff2",)

    def measure(
        self, lm: LensModel, item: Item, capture: Capture, options: StudyOptions
    ) -> dict[str, Any]:
        """Layer x layer cosines of one prompt's FF2 VJPs, averaged over each segment's tokens.

        Returns:
            ``{"cosine": {segment: [layers, layers] nested list}}`` (4 significant digits; None
            where a VJP is exactly zero, e.g. non-last positions at the last layer).
        """
        cos = layer_cosines(capture.stack("ff2", "delta"))  # [n, L, L]
        out: dict[str, Any] = {}
        with quiet_warnings():
            for seg, pos in item.segmentation.positions.items():
                if pos:
                    out[seg] = rounded(np.nanmean(cos[pos], axis=0), 4)
        return {"cosine": out}

    def aggregate(self, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Aggregate:
        """Mean cosine matrix per segment over the records that have the segment.

        Args:
            rows: the records' :meth:`measure` rows.
            meta: run metadata; reads ``n_layers``.

        Returns:
            Table rows ``segment, layer_i, layer_j, cosine, records``; per segment a curve of the
            adjacent-layer cosine cos(delta_l, delta_l+1); headline with each segment's mean
            adjacent cosine and, for the last token, how many layers exceed 0.7 and the cosine of
            the first vs the last layer.
        """
        n_layers = int(meta["n_layers"])
        axis = layer_axis(n_layers)
        mats: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        with quiet_warnings():
            for seg in SEGMENTS:
                parts = [as_array(r["cosine"][seg]) for r in rows if seg in r["cosine"]]
                if parts:
                    mats[seg] = np.nanmean(np.stack(parts), axis=0)
                    counts[seg] = len(parts)
        table = [
            {
                "segment": s,
                "layer_i": i,
                "layer_j": j,
                "cosine": float(m[i, j]),
                "records": counts[s],
            }
            for s, m in mats.items()
            for i in range(n_layers)
            for j in range(n_layers)
        ]
        curves = {}
        headline: dict[str, Any] = {"records": len(rows)}
        body = n_layers - 1  # the last layer's non-last VJPs are zero (NaN cosines)
        for s, m in mats.items():
            adjacent = np.array([m[i, i + 1] for i in range(n_layers - 1)])
            curves[f"cos(δ_l, δ_l+1) {SEGMENT_LABELS[s]}"] = {
                "x": axis[:-1],
                "y": adjacent.tolist(),
            }
            with quiet_warnings():
                headline[f"{s}_adjacent_mean"] = float(np.nanmean(adjacent[: max(1, body - 1)]))
        if "last" in mats:
            m = mats["last"]
            above = (m > 0.7).sum(1)  # layers j with cos > 0.7 for each layer i (incl. itself)
            headline["last_layers_above_0.7_mean"] = float(above.mean())
            headline["last_layers_above_0.7_max"] = int(above.max())
            headline["last_first_vs_last_layer"] = float(m[0, -1])
            off = m[~np.eye(n_layers, dtype=bool)]
            headline["last_min_cosine"] = float(np.nanmin(off))
        return Aggregate(
            table,
            curves,
            headline,
            {
                "matrices": {
                    s: m.tolist() for s, m in mats.items() if s in SHOWN or s == "further"
                },
                "counts": counts,
            },
        )

    def figure(self, agg: Aggregate, meta: dict[str, Any]) -> Any:
        """Heatmaps of the mean cosine matrix of the first subject, last subject and last tokens."""
        plt = pyplot()
        shown = [s for s in SHOWN if s in agg.extra["matrices"]]
        fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.9), squeeze=False)
        for ax, s in zip(axes[0], shown, strict=False):
            m = as_array(agg.extra["matrices"][s])
            im = ax.imshow(np.ma.masked_invalid(m), cmap="magma", vmin=-0.2, vmax=1, origin="lower")
            ax.set_title(f"{SEGMENT_LABELS[s]} ({agg.extra['counts'][s]} prompts)", fontsize=9)
            ax.set_xlabel("layer j", fontsize=8)
            ax.set_ylabel("layer i", fontsize=8)
            plt.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(f"{meta['model']}: mean cos(δ_t^i, δ_t^j) of FF2 VJPs", fontsize=10)
        fig.tight_layout()
        return fig

    def finding(self, agg: Aggregate, meta: dict[str, Any]) -> str:
        """State how far the last and the subject tokens' VJPs stay similar across layers."""
        h = agg.headline
        parts = []
        if "last_layers_above_0.7_mean" in h:
            parts.append(
                f"For the last token, each layer's δ has cosine > 0.7 with "
                f"{h['last_layers_above_0.7_mean']:.1f} layers on average (itself included; at "
                f"most {h['last_layers_above_0.7_max']} of {meta['n_layers']}); layer 0 vs the "
                f"last layer: {h['last_first_vs_last_layer']:.3f}; adjacent layers: "
                f"{h['last_adjacent_mean']:.2f}."
            )
        subj = [s for s in ("first_subject", "last_subject") if f"{s}_adjacent_mean" in h]
        if subj:
            parts.append(
                " Adjacent-layer cosine for "
                + ", ".join(f"the {SEGMENT_LABELS[s]}: {h[f'{s}_adjacent_mean']:.2f}" for s in subj)
                + "."
            )
        return "".join(parts)
