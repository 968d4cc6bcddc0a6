"""What both kinds of ``backward-lens sweep`` write: verdicts, the choice, table and figure."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pandas as pd


def write_sweep(
    args: argparse.Namespace,
    out: Path,
    df: pd.DataFrame,
    *,
    markdown: Callable[[pd.DataFrame, pd.Series], str],
    plot: Callable[[pd.DataFrame, pd.Series, Path], object],
    choice: Callable[[pd.Series], str],
    model: str,
) -> None:
    """Judge every row, choose one and write ``sweep.csv``, ``sweep.md``, ``sweep.png``.

    ``sweep.csv`` (with the verdicts) is written before the choice, so that it exists even
    when every row is rejected; every file is written atomically.

    Args:
        args: the parsed command line (``--min-efficacy``, the fluency bounds, ``--quiet``).
        out: the output folder.
        df: the sweep's table, the unedited row first.
        markdown: the table in Markdown, given the judged table and the chosen row.
        plot: writes the figure, given the judged table, the chosen row and the path.
        choice: the chosen row in words (``layer=21 eta=0.35``, ``memit lambda=100``).
        model: the model's name, for the printed line.

    Raises:
        InputError: no row satisfies the rule (from :func:`choose`).
    """
    from backward_lens.evaluation.sweep import choose, with_verdicts
    from backward_lens.io import atomic_write_text

    bounds = {
        "max_entropy_drop": args.max_entropy_drop,
        "max_perplexity_rise": args.max_perplexity_rise,
    }
    df = with_verdicts(df, **bounds)
    atomic_write_text(out / "sweep.csv", df.to_csv(index=False))  # before a refusal to choose
    best = choose(df, args.min_efficacy, **bounds)
    table = markdown(df, best)
    atomic_write_text(out / "sweep.md", table)
    plot(df, best, out / "sweep.png")
    if not args.quiet:
        print(table)
        print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.md'}, {out / 'sweep.png'}")
    print(
        f"chosen for {model}: {choice(best)} "
        f"(efficacy {best.efficacy_acc:.1%}, paraphrase {best.paraphrase_acc:.1%}, "
        f"neighbourhood score {best.neighborhood_score:.1%}, "
        f"neighbourhood acc {best.neighborhood_acc:.1%}, n-gram entropy "
        f"{best.fluency * 100:.1f}, perplexity {best.perplexity:.2f})"
    )
