"""Viewer latency through HTTP on the real default model (issue 5). Not a test: it asserts nothing.

    .venv/bin/python benchmarks/bench_web.py [--repeat 3] [--model smollm2-135m]

Starts the server in this process on a free port and times, as the page issues them: explain
with a new capture, a lens switch (cached capture), a cell's details, a forward-pass-shift edit
(prompt + 1 paraphrase + 1 neighbour), and /api/status while another request holds the model
(the page's progress line must not wait for the model). Prints medians and the load average,
since other processes on a shared machine inflate every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import urllib.request
from typing import Any

from backward_lens.models import load_model
from backward_lens.web.app import ViewerApp
from backward_lens.web.pool import ModelPool
from backward_lens.web.render import render_explanation_html
from backward_lens.web.server import make_server

PROMPT = "The Eiffel Tower is located in the city of"
TARGET = " Rome"


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST ``body`` as JSON to ``url`` and return the decoded JSON reply (10-minute timeout).

    Raises:
        urllib.error.HTTPError: the server answered with an error status.
    """
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.load(resp)


def timed(fn: Any, repeat: int) -> tuple[float, Any]:
    """Median seconds of ``repeat`` calls of ``fn`` (no warm-up), and the last call's result."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    """Start the viewer on a free port and print the median latency of each request kind."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    lm = load_model(args.model)
    server = make_server(ViewerApp(ModelPool.with_builtins(lm)), "127.0.0.1", 0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = server.url + "api/"
    body = {"prompt": PROMPT, "target": TARGET, "session": "bench"}
    page_t, page = timed(lambda: urllib.request.urlopen(server.url).read(), args.repeat)
    fresh_t, expl = timed(lambda: post(api + "explain", {**body, "fresh": True}), args.repeat)
    html_t, html = timed(lambda: render_explanation_html(expl["explanation"]), args.repeat)
    lens_t, _ = timed(lambda: post(api + "explain", {**body, "normalized": True}), args.repeat)
    cell = {"session": "bench", "matrix": "ff2", "layer": lm.n_layers - 2, "position": 9}
    cell_t, _ = timed(lambda: post(api + "cell", cell), args.repeat)
    edit = {
        **body,
        "layer": 21,
        "eta": 0.3,
        "paraphrases": ["The Eiffel Tower can be found in the city of"],
        "neighborhood": ["The Louvre is located in the city of"],
    }
    edit_t, out = timed(lambda: post(api + "edit", edit), args.repeat)

    busy = threading.Thread(target=post, args=(api + "explain", {**body, "fresh": True}))
    busy.start()
    time.sleep(0.3)
    status_t, _ = timed(lambda: urllib.request.urlopen(api + "status").read(), 5)
    busy.join()
    server.shutdown()

    print(f"model {lm.name}, {lm.n_layers} layers, prompt of 10 tokens; median of {args.repeat}")
    print(f"GET /            {page_t * 1000:8.0f} ms  ({len(page) / 1024:.0f} KiB page)")
    print(f"explain (new)    {fresh_t:8.2f} s")
    print(f"explain --html   {html_t * 1000:8.0f} ms  ({len(html) / 1024:.0f} KiB standalone page)")
    print(f"explain (lens)   {lens_t:8.2f} s   (cached capture, re-projection only)")
    print(f"cell details     {cell_t:8.2f} s")
    print(f"edit, 3 prompts  {edit_t:8.2f} s   (apply, read, revert, verify)")
    print(f"status, busy     {status_t * 1000:8.1f} ms  (while another request holds the model)")
    print(
        "edit rows:", [(r["kind"], r["before"]["token"], r["after"]["token"]) for r in out["rows"]]
    )
    print(
        "load average:", " ".join(f"{x:.1f}" for x in os.getloadavg()), f"on {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
