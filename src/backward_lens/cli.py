"""``backward-lens`` command line: one module per subcommand under ``backward_lens.commands``.

A user mistake (a :class:`~backward_lens.errors.BackwardLensError`) prints one line and exits 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from backward_lens.errors import BackwardLensError

COMMANDS = ["explain", "study", "edit", "evaluate", "sweep", "finetune", "serve", "trace", "schema"]
"""Subcommand modules in ``backward_lens.commands``; each has NAME, HELP, DESCRIPTION,
``add_arguments(parser)`` and ``run(args) -> int``."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``backward-lens: error: ...``, exit 2.

    argparse's default prints the usage block first; here the message names the command and
    points at ``--help`` instead, like every other error of the CLI.
    """

    def error(self, message: str) -> NoReturn:
        """Print ``message`` in one line naming the command, then exit with status 2."""
        command = self.prog.removeprefix("backward-lens").strip()
        where = f"{command}: " if command else ""
        hint = f"backward-lens {command} --help" if command else "backward-lens --help"
        print(f"backward-lens: error: {where}{message} (see {hint})", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The ``backward-lens`` parser with one subparser per module in :data:`COMMANDS`."""
    parser = OneLineParser(
        prog="backward-lens",
        description=(
            "Read what a language model's gradients will teach each layer, in words "
            "(Backward Lens, Katz et al., EMNLP 2024), and edit facts in one forward pass."
        ),
        epilog="Run 'backward-lens COMMAND --help' for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"backward_lens.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"backward_lens.commands.{name}":
                continue  # a command not built yet
            raise
        p = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=module.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted.

    A plain ``StreamHandler`` keeps the stream it was created with; tests that capture stderr
    replace ``sys.stderr`` for each run of :func:`main`, and the notices must reach that one.
    """

    @property
    def stream(self) -> object:
        """The current ``sys.stderr``."""
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass  # always the current sys.stderr


def show_notices() -> None:
    """Show the library's notices on stderr as ``backward-lens: ...`` lines (once per process).

    Library modules log progress and notices (``logging.getLogger(__name__)``, INFO) instead of
    printing; the command line shows INFO and above of every ``backward_lens`` logger, except the
    viewer's per-request timings (``backward_lens.web`` below WARNING), as before.
    """
    logger = logging.getLogger("backward_lens")
    if any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("backward-lens: %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    web = logging.getLogger("backward_lens.web")
    if web.level == logging.NOTSET:
        web.setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2: a user mistake, printed in one line)."""
    show_notices()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except BackwardLensError as exc:
        print(f"backward-lens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("backward-lens: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
