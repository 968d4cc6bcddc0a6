"""``backward-lens serve``: the interactive viewer on a local web server."""

from __future__ import annotations

import argparse

from backward_lens.commands.common import add_model_arguments, model_from_args
from backward_lens.commands.options import add_shared
from backward_lens.errors import InputError

NAME = "serve"
HELP = "open the interactive viewer (grid, cell details, edit panel) in a local web server"
DESCRIPTION = """\
Start a local web server with the backward-lens viewer: type a prompt and a target, see the
layers x tokens grid of FF1 imprints and FF2 shifts (hover for top/bottom tokens, click for the
neurons a cell dominates), switch raw/normalised lens, and try a forward-pass-shift edit at a
chosen layer and eta on the prompt, paraphrases and neighbourhood prompts (the model is always
reverted after the request).

The page has no external resources and works offline. The model selector offers the model given
with --model plus the other built-in offline models (loaded on first use); a request can only
name one of these, never a path. The server binds 127.0.0.1 by default: only this machine can
reach it. Use --host 0.0.0.0 only on a trusted network.

Example:
  backward-lens serve                       # default model, http://127.0.0.1:8000/
  backward-lens serve --model gemma3-270m --port 8080
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add serve's options."""
    add_model_arguments(p)
    p.add_argument(
        "--host", default="127.0.0.1", metavar="ADDR", help="address to bind (default: 127.0.0.1)"
    )
    p.add_argument(
        "--port",
        type=int,
        default=8000,
        metavar="N",
        help="port; 0 picks a free port (default: 8000)",
    )
    add_shared(p, "--quiet", "do not log each request", action="store_true")
    p.add_argument(
        "--runs",
        action="append",
        metavar="DIR",
        help="also show the reports of the finetune runs in DIR at /training/ (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    """Serve the viewer until interrupted; returns 0.

    Raises:
        InputError: a bad port or runs folder, or a port that cannot be bound.
    """
    from backward_lens.web.app import ViewerApp
    from backward_lens.web.pool import ModelPool
    from backward_lens.web.server import make_server

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be from 0 to 65535 (got {args.port})")
    runs = None
    if args.runs:
        from backward_lens.training.viewer import RunLibrary

        runs = RunLibrary(args.runs)  # checked before the model loads
    lm = model_from_args(args)
    app = ViewerApp(ModelPool.with_builtins(lm), runs=runs)
    try:
        server = make_server(app, args.host, args.port, quiet=args.quiet)
    except OSError as exc:
        raise InputError(
            f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); "
            "choose another --port (0 picks a free one)"
        ) from None
    print(f"backward-lens viewer for {lm.name}: {server.url}  (Ctrl+C to stop)", flush=True)
    if runs is not None:
        print(f"training-lens runs: {server.url.rstrip('/')}/training/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0
