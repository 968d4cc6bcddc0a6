"""The interactive viewer: a standalone HTML page per explanation, and a local server.

``render_explanation_html(explanation.to_dict())`` gives a self-contained page (inline CSS, JS
and data; no network). ``backward-lens serve`` runs :mod:`backward_lens.web.server`.
"""

from backward_lens.web.render import render_app_html, render_explanation_html

__all__ = ["render_app_html", "render_explanation_html"]
