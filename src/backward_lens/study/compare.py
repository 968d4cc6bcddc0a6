"""Overlay one experiment's curves from several finished runs (e.g. several models) in one figure.

Every experiment's aggregate carries ``curves`` on a normalised layer axis (l / (L - 1)), so runs
of models with different depths line up; experiments without curves (neurons, imprint-shift) are
compared by their headline numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backward_lens.errors import InputError
from backward_lens.io import atomic_write_bytes, atomic_write_text
from backward_lens.study.figures import html_page, png_bytes, pyplot
from backward_lens.study.runner import StudyResult, load_study


def _flat(headline: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in headline.items() if isinstance(v, int | float | str | type(None))}


def compare_studies(folders: Sequence[str | Path], out: str | Path) -> Path:
    """Write ``figure.png``, ``figure.html``, ``summary.md`` and ``headline.csv`` to ``out``.

    Args:
        folders: output folders of earlier runs of the *same* experiment.
        out: where to write the comparison.
    """
    if len(folders) < 1:
        raise InputError("give at least one study output folder to compare")
    results: list[StudyResult] = [load_study(f) for f in folders]
    kinds = {r.experiment for r in results}
    if len(kinds) > 1:
        raise InputError(
            f"the folders hold different experiments ({', '.join(sorted(kinds))}); compare one "
            "experiment at a time"
        )
    experiment = kinds.pop()
    labels = [f"{r.config['run']['model']} ({r.n_ok})" for r in results]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} [{r.out}]" for lab, r in zip(labels, results, strict=False)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    curve_names = sorted({c for r in results for c in r.aggregate.curves})
    if curve_names:
        cols = min(3, len(curve_names))
        rows_n = (len(curve_names) + cols - 1) // cols
        fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.4 * rows_n), squeeze=False)
        for ax, name in zip(axes.ravel(), curve_names, strict=False):
            for r, label in zip(results, labels, strict=False):
                c = r.aggregate.curves.get(name)
                if c:
                    ax.plot(c["x"], c["y"], marker=".", ms=3, label=label)
            ax.set_title(name, fontsize=8.5)
            ax.set_xlabel("normalised layer index", fontsize=8)
            ax.legend(fontsize=7)
        for ax in axes.ravel()[len(curve_names) :]:
            ax.axis("off")
    else:
        keys = [
            k
            for k, v in _flat(results[0].aggregate.headline).items()
            if isinstance(v, int | float) and k not in ("records", "layer")
        ]
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(keys)), 3.6))
        width = 0.8 / len(results)
        for k, (r, label) in enumerate(zip(results, labels, strict=False)):
            vals = [float(r.aggregate.headline.get(key) or 0) for key in keys]
            ax.bar([i + k * width for i in range(len(keys))], vals, width, label=label)
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(keys))],
            keys,
            rotation=30,
            ha="right",
            fontsize=7,
        )
        ax.legend(fontsize=7)
    fig.suptitle(f"{experiment}: " + " vs ".join(labels), fontsize=10)
    fig.tight_layout()
    png = png_bytes(fig)
    pairs = list(zip(results, labels, strict=True))
    heads = [dict(model=label, **_flat(r.aggregate.headline)) for r, label in pairs]
    lines = [f"# Comparison: {experiment}", ""]
    for r, label in zip(results, labels, strict=False):
        finding = r.summary.split("**Finding.**", 1)[-1].split("\n", 1)[0].strip()
        lines.append(f"- **{label}**: {finding}")
        if r.seconds_per_record is not None:
            lines.append(f"  (time per record {r.seconds_per_record:.3f} s; folder `{r.out}`)")
    summary = "\n".join(lines) + "\n"
    import pandas as pd

    atomic_write_bytes(out / "figure.png", png)
    atomic_write_text(out / "figure.html", html_page(f"compare {experiment}", png, summary, heads))
    atomic_write_text(out / "summary.md", summary)
    atomic_write_text(out / "headline.csv", pd.DataFrame(heads).to_csv(index=False))
    atomic_write_text(out / "headline.json", json.dumps(heads, indent=1))
    return out
