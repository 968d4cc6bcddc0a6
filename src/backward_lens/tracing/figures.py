"""Causal-tracing figures in the style of the ROME paper (Meng et al. 2022, Figs. 1-2)."""

from __future__ import annotations

from typing import Any

import numpy as np

from backward_lens.study.figures import png_bytes, pyplot
from backward_lens.study.segments import SEGMENT_LABELS, SEGMENTS

ROME_SEGMENTS = SEGMENTS[SEGMENTS.index("first_subject") :]
"""ROME's six token segments (the study's, without ``bos`` and ``prefix``)."""
TITLES = {
    "hidden": "single restored layer (hidden state)",
    "mlp": "restored MLP",
    "attn": "restored attention",
}
CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}


def record_png(values: dict[str, Any], model: str) -> bytes:
    """Three heatmaps of one record, as ROME's ``plot_trace_heatmap``, as PNG bytes.

    Each shows the restored probability of the true object per token x layer (hidden states,
    MLP, attention), subject tokens starred, colour from the corrupted run's probability up.
    """
    plt = pyplot()
    kinds = [k for k in ("hidden", "mlp", "attn") if k in values["scores"]]
    tokens = list(values["tokens"])
    s, e = values["subject"]
    labels = [f"{t!r}"[1:-1] + ("*" if s <= i < e else "") for i, t in enumerate(tokens)]
    fig, axes = plt.subplots(
        1,
        len(kinds),
        figsize=(3.4 * len(kinds) + 0.8, 0.22 * len(tokens) + 1.4),
        constrained_layout=True,
    )
    axes = np.atleast_1d(axes)
    for i, (ax, kind) in enumerate(zip(axes, kinds, strict=True)):
        m = np.asarray(values["scores"][kind])
        image = ax.imshow(m, aspect="auto", cmap=CMAPS[kind], vmin=values["low"],
                          interpolation="nearest")  # fmt: skip
        ax.set_yticks(range(len(labels)), labels if i == 0 else [""] * len(labels), fontsize=6)
        step = max(1, m.shape[1] // 6)
        ax.set_xticks(range(0, m.shape[1], step), [str(i) for i in range(0, m.shape[1], step)],
                      fontsize=6)  # fmt: skip
        window = "" if kind == "hidden" else f", window {values.get('window')}"
        ax.set_title(f"{TITLES[kind]}{window}", fontsize=7)
        ax.set_xlabel("layer", fontsize=7)
        cbar = plt.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
        cbar.ax.tick_params(labelsize=6)
    target = values.get("target", "")
    fig.suptitle(
        f"{model}: p({target.strip()!r}) clean {values['high']:.3f}, corrupted {values['low']:.3f}",
        fontsize=8,
    )
    return png_bytes(fig, dpi=72)


def averages_png(agg: dict[str, Any], model: str, n: int) -> bytes:
    """Average indirect effect by ROME's token segments x layer, as PNG bytes.

    The effect is the restored minus the corrupted probability; one heatmap per kind, and the
    kinds' curves at the subject's last token.
    """
    plt = pyplot()
    kinds = list(agg["averages"])
    fig, axes = plt.subplots(
        1, len(kinds) + 1, figsize=(4.6 * (len(kinds) + 1), 3.0), constrained_layout=True
    )
    for i, (ax, kind) in enumerate(zip(axes, kinds, strict=False)):
        rows = [seg for seg in ROME_SEGMENTS if agg["averages"][kind].get(seg) is not None]
        m = np.asarray([agg["averages"][kind][seg] for seg in rows])
        image = ax.imshow(m, aspect="auto", cmap=CMAPS[kind], interpolation="nearest")
        labels = [SEGMENT_LABELS[r] for r in rows] if i == 0 else [""] * len(rows)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        step = max(1, m.shape[1] // 6)
        ax.set_xticks(range(0, m.shape[1], step), [str(i) for i in range(0, m.shape[1], step)],
                      fontsize=7)  # fmt: skip
        ax.set_xlabel("layer", fontsize=8)
        ax.set_title(f"AIE, {TITLES[kind]}", fontsize=8)
        plt.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    ax = axes[-1]
    for kind in kinds:
        curve = agg["averages"][kind]["last_subject"]
        ax.plot(range(len(curve)), curve, color={"hidden": "purple", "mlp": "green",
                "attn": "red"}[kind], label=f"{kind} (peak {agg['peak'][kind]})")  # fmt: skip
    ax.axvline(agg["peak"].get("mlp", 0), color="green", ls=":", lw=1)
    ax.set_xlabel("layer", fontsize=8)
    ax.set_ylabel("AIE at the last subject token", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title("last subject token", fontsize=8)
    fig.suptitle(f"{model}: average indirect effect over {n} facts", fontsize=9)
    return png_bytes(fig, dpi=90)
