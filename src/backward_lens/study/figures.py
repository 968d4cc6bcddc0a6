"""Figure helpers for the study: matplotlib (Agg) PNGs and a self-contained HTML page.

The HTML embeds the PNG as base64 and the aggregated numbers as a table: no script, no CDN, no
network, so the page opens anywhere and can be archived with the run.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from backward_lens.study.segments import SEGMENT_LABELS


def pyplot() -> Any:
    """Import ``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed).

    Returns:
        The ``matplotlib.pyplot`` module; imported lazily so the study's maths runs without it.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any, dpi: int = 100) -> bytes:
    """Render ``fig`` to PNG bytes and close it."""
    plt = pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def heatmap(
    ax: Any,
    matrix: np.ndarray,
    rows: Sequence[str],
    title: str,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    xlabel: str = "layer",
) -> Any:
    """Rows x layers heatmap with a colour bar; NaN cells are left blank."""
    plt = pyplot()
    image = ax.imshow(
        np.ma.masked_invalid(matrix),
        aspect="auto",
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        interpolation="nearest",
    )
    ax.set_yticks(range(len(rows)), [SEGMENT_LABELS.get(r, r) for r in rows], fontsize=7)
    n_cols = matrix.shape[1]
    step = max(1, n_cols // 10)
    ax.set_xticks(range(0, n_cols, step), [str(i) for i in range(0, n_cols, step)], fontsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    plt.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    return image


def _table_html(rows: Sequence[dict[str, Any]], limit: int = 400) -> str:
    if not rows:
        return "<p>(no rows)</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    body = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows[:limit]
    )
    more = f"<p>({len(rows) - limit} more rows in aggregate.csv)</p>" if len(rows) > limit else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def _markdown_to_html(text: str) -> str:
    """Just enough markdown for our summaries: headings, bullets, paragraphs, `code`, **bold**."""
    import re

    out: list[str] = []
    in_list = False
    for line in text.splitlines():
        esc = html.escape(line)
        esc = re.sub(r"`([^`]+)`", r"<code>\1</code>", esc)
        esc = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", esc)
        if line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{esc[2:]}</li>")
            continue
        if in_list:
            out.append("</ul>")
            in_list = False
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 4)
            out.append(f"<h{level + 1}>{esc.lstrip('#').strip()}</h{level + 1}>")
        elif line.strip():
            out.append(f"<p>{esc}</p>")
    if in_list:
        out.append("</ul>")
    return "\n".join(out)


def html_page(title: str, png: bytes, summary_md: str, rows: Sequence[dict[str, Any]]) -> str:
    """A self-contained page: the summary, the figure (inline PNG) and the aggregated table."""
    data = base64.b64encode(png).decode("ascii")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "img{max-width:100%;border:1px solid #ddd}"
        "table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "details{margin-top:1em}code{background:#f4f4f4;padding:0 3px}"
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{style}</style></head><body>"
        f"{_markdown_to_html(summary_md)}"
        f"<p><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'></p>"
        f"<details><summary>Aggregated numbers ({len(rows)} rows)</summary>"
        f"{_table_html(rows)}</details></body></html>\n"
    )
