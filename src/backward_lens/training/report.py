"""The HTML report of a training-lens run: layers x steps, each cell the words being written.

One self-contained page (styles, script and data inlined; no network): the loss curve, then for
each matrix a grid with one row per layer (top layer first) and one column per read step; a cell
shows the first singular direction's words and is coloured by the gradient's norm (log scale, per
matrix). Clicking a cell lists every direction with its singular value, share of the gradient,
words and lens probabilities, and the positions and input tokens that write it. The viewer
(``backward-lens serve --runs DIR``) serves the same page, rebuilt from the folder on each visit,
so a run in progress can be followed.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from backward_lens.training.runlog import LENS_FILE, LOG_FILE, RunFolder, read_jsonl
from backward_lens.web.render import json_for_script, static_text


def load_run(folder: str | Path) -> dict[str, Any]:
    """A run folder as one dict: ``settings`` (run.json), ``rows`` (lens.jsonl), ``log``."""
    folder = Path(folder)
    return {
        "settings": RunFolder(folder).settings(),
        "rows": list(read_jsonl(folder / LENS_FILE)),
        "log": list(read_jsonl(folder / LOG_FILE)),
    }


def render_run_html(folder: str | Path, title: str | None = None) -> str:
    """The report page of a run folder (see the module docstring), as one HTML string."""
    run = load_run(folder)
    s = run["settings"]
    cfg = s.get("config", {})
    name = title or f"Training lens: {s.get('model', 'model')} on {s.get('data', 'data')}"
    facts = [
        f"model {s.get('model', '?')}",
        f"data {s.get('data', '?')} ({s.get('texts', '?')} texts)",
        f"{cfg.get('steps', s.get('last_step', '?'))} steps",
        f"lr {cfg.get('lr', '?')}",
        f"batch {cfg.get('batch_size', '?')} x {cfg.get('grad_accum', 1)}",
        f"lens every {s.get('every', '?')} steps",
    ]
    if s.get("lora"):
        facts.append("LoRA adapters (reading the adapted weights' gradients)")
    body = (
        f"<h1>{html.escape(name)}</h1>\n"
        '<p class="sub">What each fine-tuning step teaches each layer, read through the logit '
        "lens (Backward Lens, Katz et al., EMNLP 2024): the top singular directions of each "
        "layer's gradient over the whole batch.</p>\n"
        f'<p class="meta">{html.escape("; ".join(facts))}</p>\n'
        '<div id="bl-report"></div>\n<noscript>This page needs JavaScript.</noscript>\n'
        f'<script type="application/json" id="bl-run">{json_for_script(run)}</script>\n'
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(name)}</title>\n<style>\n{static_text('training.css')}</style>\n</head>\n<body>\n{body}"
        f"<script>\n{static_text('training.js')}</script>\n</body>\n</html>\n"
    )
