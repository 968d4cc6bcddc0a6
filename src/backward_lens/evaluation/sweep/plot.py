"""The sweeps' figures: the shift sweep's heatmaps and trade-off, the editor sweep's curves.

Both are written atomically; points that break fluency (a ``rejected`` column, see
:func:`~backward_lens.evaluation.sweep.rule.with_verdicts`) are marked, the chosen one framed
or circled in red.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

import pandas as pd

from backward_lens.io import atomic_write


def _save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
    import matplotlib.pyplot as plt

    def save(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    out = atomic_write(Path(path), save)
    plt.close(fig)
    return out


def plot_sweep(df: pd.DataFrame, chosen: pd.Series, path: str | Path, title: str = "") -> Path:
    """Efficacy and neighbourhood score per (layer, eta) as heatmaps, and their trade-off.

    Points that break fluency (a ``rejected`` column, see :func:`with_verdicts`) are crossed out
    on the heatmaps; the chosen one is framed in red.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edited = df[df.eta > 0]
    base = df[df.eta == 0].iloc[0]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, col, name in zip(
        axes[:2],
        ["efficacy_acc", "neighborhood_score"],
        ["efficacy accuracy", "neighbourhood score"],
        strict=True,
    ):
        grid = edited.pivot(index="layer", columns="eta", values=col)
        im = ax.imshow(
            grid.values * 100, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=100
        )
        ax.set_xticks(range(len(grid.columns)), [f"{e:g}" for e in grid.columns], rotation=45)
        ax.set_yticks(range(len(grid.index)), [str(i) for i in grid.index])
        ax.set_xlabel("eta")
        ax.set_ylabel("layer (FF2 edited)")
        ax.set_title(name + (" (unedited %.0f)" % (base[col] * 100)))
        fig.colorbar(im, ax=ax)
        r = list(grid.index).index(chosen.layer)
        c = list(grid.columns).index(chosen.eta)
        ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=2))
        if "rejected" in edited.columns:
            for _, point in edited[edited.rejected.astype(bool)].iterrows():
                x = list(grid.columns).index(point.eta)
                y = list(grid.index).index(point.layer)
                ax.text(x, y, "×", ha="center", va="center", color="white", fontsize=12)
    if "rejected" in edited.columns and edited.rejected.astype(bool).any():
        axes[0].text(
            0.0, -0.28, "×: breaks fluency (not chosen)", transform=axes[0].transAxes, fontsize=8
        )
    ax = axes[2]
    for layer, g in edited.groupby("layer"):
        ax.plot(
            g.efficacy_acc * 100,
            g.neighborhood_score * 100,
            marker="o",
            ms=3,
            label=f"layer {layer}",
        )
    ax.scatter(
        [chosen.efficacy_acc * 100],
        [chosen.neighborhood_score * 100],
        s=120,
        facecolors="none",
        edgecolors="red",
        lw=2,
        label="chosen",
        zorder=5,
    )
    ax.axhline(base.neighborhood_score * 100, color="gray", ls="--", lw=1, label="unedited")
    ax.set_xlabel("efficacy accuracy (%)")
    ax.set_ylabel("neighbourhood score (%)")
    ax.set_title("trade-off (each line: eta grows)")
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


EDITOR_PANELS = (
    ("efficacy_acc", "efficacy accuracy (%)", 100.0),
    ("neighborhood_score", "neighbourhood score (%)", 100.0),
    ("fluency", "n-gram entropy (x100)", 100.0),
    ("perplexity", "perplexity", 1.0),
)
"""(column, axis label, scale) of each panel of :func:`plot_editor_sweep`."""


def plot_editor_sweep(
    df: pd.DataFrame, chosen: pd.Series, path: str | Path, title: str = ""
) -> Path:
    """Efficacy, neighbourhood score, n-gram entropy and perplexity against the swept value.

    The values are placed in grid order, one tick each (so lists and text work as well as
    numbers); the unedited model is a dashed line, values that break fluency (a ``rejected``
    column, see :func:`with_verdicts`) are crossed out in red, the chosen one circled.

    Args:
        df: :func:`editor_sweep`'s table, its unedited row included (``value`` NaN).
        chosen: the chosen row (:func:`choose`).
        path: the PNG to write.
        title: the figure's title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = df[df.value.isna()].iloc[0]
    edited = df[df.value.notna()]
    x = list(range(len(edited)))
    labels = [_value_label(v) for v in edited.value]
    rejected = edited.rejected.astype(bool) if "rejected" in edited.columns else None
    spot = list(edited.index).index(chosen.name) if chosen.name in edited.index else None
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), sharex=True)
    for ax, (col, name, scale) in zip(axes.flat, EDITOR_PANELS, strict=True):
        y = edited[col].astype(float) * scale
        ax.plot(x, y, marker="o", ms=4, label=str(edited.method.iloc[0]))
        if not math.isnan(float(base[col])):
            ax.axhline(float(base[col]) * scale, color="gray", ls="--", lw=1, label="unedited")
        if rejected is not None and rejected.any():
            ax.scatter(
                [i for i, r in zip(x, rejected, strict=True) if r],
                [v for v, r in zip(y, rejected, strict=True) if r],
                marker="x",
                s=80,
                color="red",
                label="breaks fluency",
                zorder=5,
            )
        if spot is not None:
            ax.scatter(
                [spot],
                [y.iloc[spot]],
                s=140,
                facecolors="none",
                edgecolors="red",
                lw=2,
                label="chosen",
                zorder=6,
            )
        if col in ("efficacy_acc", "neighborhood_score"):
            ax.set_ylim(-3, 103)
        ax.set_ylabel(name)
        ax.set_xticks(x, labels, rotation=30)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel(str(df.param.iloc[0]))
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _value_label(value: Any) -> str:
    """A swept value as a tick label: ``1000``, ``0.01``, ``[3,4]``, ``text``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
