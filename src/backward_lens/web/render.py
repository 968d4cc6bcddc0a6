"""Self-contained HTML pages: the stylesheet, the scripts and the data are inlined.

Both pages are built from the same files in ``web/static`` (package data), so the standalone file
written by ``explain --html`` and the server page draw the grid with identical code. Nothing is
fetched from the network: the page opens from disk, offline, and can be shared as one file.
"""

from __future__ import annotations

import html
from functools import cache
from importlib import resources
from typing import Any

from backward_lens.io import dumps

_REQUIRED = ("model", "vocab_size", "prompt", "tokens", "target", "prediction", "layers")


@cache
def static_text(name: str) -> str:
    """The text of ``web/static/<name>`` (shipped as package data)."""
    return (resources.files("backward_lens.web") / "static" / name).read_text(encoding="utf-8")


def json_for_script(data: Any) -> str:
    """JSON that is safe inside ``<script type="application/json">``.

    ``<``, ``>`` and ``&`` are escaped as JSON unicode escapes, so a token such as ``</script>``
    in a prompt cannot close the tag; ``JSON.parse`` restores them.
    """
    text = dumps(data)  # NaN and infinities as null: JSON.parse has no spelling for them
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _page(title: str, body: str, scripts: list[str], data: dict[str, Any]) -> str:
    blocks = "\n".join(
        f'<script type="application/json" id="{html.escape(key)}">{json_for_script(value)}</script>'
        for key, value in data.items()
    )
    code = "\n".join(f"<script>\n{static_text(name)}\n</script>" for name in scripts)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>\n{static_text('viewer.css')}\n</style>\n"
        f"</head>\n<body>\n{body}\n{blocks}\n{code}\n</body>\n</html>\n"
    )


def render_explanation_html(explanation: dict[str, Any]) -> str:
    """A standalone page for one explanation (``Explanation.to_dict()``, the JSON contract).

    The page shows the layers x tokens grid of FF1 (top token of x_i) and FF2 (bottom token of
    delta_i) coloured by VJP norm, each layer's gradient rank, hover tooltips with the top and
    bottom k tokens and the target's rank, the target rank by layer at the last token and a norms
    heatmap. It needs no server and no network.
    """
    missing = [k for k in _REQUIRED if k not in explanation]
    if missing:
        raise ValueError(f"not an explanation dict (missing {missing}); pass Explanation.to_dict()")
    title = f"Backward lens: {explanation['prompt']} -> {explanation['target'].get('token', '')}"
    body = (
        "<h1>Backward lens</h1>\n"
        '<p class="bl-sub">What one gradient step on this prompt would teach each layer, read '
        "through the logit lens (Katz et al., EMNLP 2024).</p>\n"
        '<div id="bl-root"></div>\n'
        "<noscript>This page needs JavaScript to draw the grid.</noscript>"
    )
    page = _page(title, body, ["viewer.js"], {"bl-data": explanation})
    return page.replace("</body>", "<script>window.BackwardLens.standalone();</script>\n</body>")


def render_app_html(config: dict[str, Any]) -> str:
    """The server's single page: the form, the grid, the cell details and the edit panel."""
    body = (
        "<h1>Backward lens viewer</h1>\n"
        '<p class="bl-sub">Project a prompt\'s gradients into the vocabulary, layer by layer, '
        "and try a forward-pass-shift edit. Runs locally; nothing leaves this machine.</p>\n"
        '<div id="bl-app"></div>\n<div id="bl-root"></div>\n<div id="bl-edit"></div>\n'
        "<noscript>This page needs JavaScript.</noscript>"
    )
    page = _page("Backward lens viewer", body, ["viewer.js", "app.js"], {"bl-config": config})
    return page.replace("</body>", "<script>window.BackwardLens.app();</script>\n</body>")
