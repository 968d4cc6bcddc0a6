"""``backward-lens schema``: print the JSON Schema of the explain JSON or of a result row."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from backward_lens.errors import DataError, InputError

NAME = "schema"
HELP = "print the JSON Schema of the explain JSON or of an evaluation result row"
DESCRIPTION = """\
Print the versioned JSON Schema (draft 2020-12) of a document this package writes, generated
from its pydantic model (backward_lens.schema); the same text is published in the repository
as schemas/<name>.v<version>.json.

  explain      the JSON of 'backward-lens explain --json'
  result-row   one line of an evaluation run's results.jsonl ('backward-lens evaluate')

With --validate FILE the file is checked instead (a result-row file: every line), and the first
problem is reported in one line (exit 2).

Examples:
  backward-lens schema explain > explain.schema.json
  backward-lens schema result-row --validate runs/eval/results.jsonl
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the document name and ``--validate``."""
    p.add_argument("document", choices=["explain", "result-row"], help="which schema")
    p.add_argument(
        "--validate", metavar="FILE", help="check FILE against the schema instead of printing it"
    )


def run(args: argparse.Namespace) -> int:
    """Print the schema, or validate ``--validate FILE``.

    Raises:
        InputError: the file cannot be read.
        DataError: the file is not valid JSON or does not match the schema.
    """
    from backward_lens import schema

    if args.validate is None:
        print(schema.schema_text(args.document), end="")
        return 0
    path = Path(args.validate)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path} ({getattr(exc, 'strerror', None) or exc})") from None
    lines = (
        [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if args.document == "result-row"
        else [(0, text)]
    )
    for number, line in lines:
        where = f"{path} line {number}" if number else str(path)
        try:
            document = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{where} is not valid JSON ({exc})") from None
        try:
            schema.validate(args.document, document)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
    print(f"{path}: valid {args.document} v{schema.SCHEMA_VERSION} ({len(lines)} document(s))")
    return 0
