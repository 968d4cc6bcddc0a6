"""Training-lens reports in the viewer: ``backward-lens serve --runs DIR`` (read-only routes).

``GET /training/`` lists the runs found in the folders given on the command line (each folder
itself if it holds ``run.json``, else its sub-folders that do); ``GET /training/<name>`` shows a
run's report, rebuilt from its files on every visit, so a run still training can be followed.
A request names a run only by the name in that list: no path from a request reaches the file
system.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from http import HTTPStatus
from pathlib import Path
from urllib.parse import quote, unquote

from backward_lens.errors import InputError
from backward_lens.training.report import render_run_html
from backward_lens.training.runlog import RUN_FILE, RunFolder

PREFIX = "/training"


class RunLibrary:
    """The run folders the viewer may show.

    Args:
        roots: folders holding runs (or runs themselves).

    Raises:
        InputError: a root that is not an existing folder.
    """

    def __init__(self, roots: Sequence[str | Path]) -> None:
        self.roots = [Path(r) for r in roots]
        for root in self.roots:
            if not root.is_dir():
                raise InputError(f"--runs {root}: not a folder; give a folder of finetune runs")

    def runs(self) -> dict[str, Path]:
        """Run name -> folder, scanned now (runs started after the server are found too)."""
        found: dict[str, Path] = {}
        for root in self.roots:
            candidates = [root] if (root / RUN_FILE).is_file() else sorted(root.iterdir())
            for folder in candidates:
                if folder.is_dir() and (folder / RUN_FILE).is_file():
                    name, k = folder.name, 2
                    while name in found:
                        name, k = f"{folder.name}-{k}", k + 1
                    found[name] = folder
        return found

    def page(self, path: str) -> tuple[int, str]:
        """(HTTP status, HTML) for a GET of ``path`` under ``/training``."""
        rest = path[len(PREFIX) :].strip("/")
        runs = self.runs()
        if not rest:
            return HTTPStatus.OK, self._index(runs)
        name = unquote(rest)
        if name not in runs:
            return HTTPStatus.NOT_FOUND, _page(
                "No such run",
                f'<p>No run named {html.escape(name)}. <a href="{PREFIX}/">All runs</a></p>',
            )
        return HTTPStatus.OK, render_run_html(runs[name])

    def _index(self, runs: dict[str, Path]) -> str:
        items = []
        for name, folder in runs.items():
            s = RunFolder(folder).settings()
            what = f"{s.get('model', '?')} on {s.get('data', '?')}, started {s.get('started', '?')}"
            items.append(
                f'<li><a href="{PREFIX}/{quote(name)}">{html.escape(name)}</a> '
                f"<small>{html.escape(what)}</small></li>"
            )
        listing = "<ul>" + "".join(items) + "</ul>" if items else "<p>No run yet.</p>"
        return _page("Training-lens runs", listing)


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<title>{html.escape(title)}</title></head><body style="font:14px system-ui">'
        f"<h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )
