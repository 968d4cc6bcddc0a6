"""Static figures (matplotlib, no network): the paper's Fig. 4 table-heatmaps for an explanation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from backward_lens.io import atomic_write

if TYPE_CHECKING:
    from backward_lens.explain import Explanation


def _short(token: str, width: int = 9) -> str:
    token = token.replace("\n", "\\n")
    return token if len(token) <= width else token[: width - 1] + "…"


def figure_explanation(expl: Explanation) -> Any:
    """Draw the paper's Fig. 4 for one explanation: two panels of layers x prompt tokens.

    FF1 shows the top token of each x_i and FF2 the bottom token of each delta_i, coloured by
    the VJP norm as in the paper's figures (FF1: ||delta_i^FF1||, FF2: ||delta_i||); the
    gradient's rank is printed per layer (paper Fig. 4 and App. E).

    Returns:
        The matplotlib ``Figure`` (Agg backend; the caller saves or closes it).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    n_layers, n = len(expl.layers), len(expl.tokens)
    fig, axes = plt.subplots(
        1, 2, figsize=(2 * (1.5 + 0.95 * n), 1.2 + 0.28 * n_layers), squeeze=False
    )
    panels = [
        (
            "ff1",
            "top",
            "coef_norm",
            "FF1: most probable token of x_i (colour: ||δ_i^FF1||)",
            "Blues",
        ),
        ("ff2", "bottom", "norm", "FF2: least probable token of δ_i (colour: ||δ_i||)", "Reds"),
    ]
    for ax, (name, side, colour, title, cmap) in zip(axes[0], panels, strict=True):
        norms = np.array(expl.grid(name, colour), dtype=float)
        words = expl.grid(name, side)
        ax.imshow(norms, aspect="auto", cmap=cmap, origin="lower")
        for li in range(n_layers):
            for i in range(n):
                tokens = words[li][i]
                ax.text(
                    i,
                    li,
                    _short(tokens[0] if tokens else ""),
                    ha="center",
                    va="center",
                    fontsize=6.5,
                )
        ax.set_xticks(
            range(n), [_short(t, 10) for t in expl.tokens], rotation=45, ha="right", fontsize=7
        )
        ranks = [getattr(layer_reading, name).rank for layer_reading in expl.layers]
        ax.set_yticks(
            range(n_layers),
            [
                f"{layer_reading.layer} (r={r})"
                for layer_reading, r in zip(expl.layers, ranks, strict=True)
            ],
            fontsize=6.5,
        )
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("layer (gradient rank)", fontsize=8)
    lens = "normalised lens" if expl.normalized else "logit lens"
    fig.suptitle(
        f"{expl.model}: {expl.prompt!r} → {expl.target.token!r} "
        f"(model says {expl.prediction.token!r}, loss {expl.loss:.2f}; {lens})",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def save_explanation_png(expl: Explanation, path: str | Path, dpi: int = 110) -> Path:
    """Write the Fig. 4-style heatmap as a PNG, atomically."""
    import matplotlib.pyplot as plt

    fig = figure_explanation(expl)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)
