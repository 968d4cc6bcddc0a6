"""``backward-lens sweep --method NAME``: one hyper-parameter of an editor, through the harness.

The part of ``sweep`` that is not forward pass shift's (layer, eta) grid: it reads ``--hparam
KEY=V1,V2,...`` and ``--fixed KEY=VALUE`` (the package's one ``key=value`` syntax,
:mod:`backward_lens.evaluation.methods`), refuses the grid's options in one line, runs
:func:`~backward_lens.evaluation.sweep.editor.editor_sweep` (a resumable evaluation run in
``--out``, ``--resume``/``--fresh`` as in ``evaluate``) and writes the table with the same rule.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from backward_lens import checks
from backward_lens.commands.common import check_model_args, model_from_args, shard_from_args
from backward_lens.commands.sweep_output import write_sweep
from backward_lens.data import load_records
from backward_lens.errors import InputError
from backward_lens.evaluation.methods import (
    UNEDITED,
    MethodSpec,
    check_methods,
    parse_hparam,
    parse_values,
)
from backward_lens.evaluation.sweep.rule import FluencySettings

GRID_OPTIONS = (
    ("layers", "--layers"),
    ("etas", "--etas"),
    ("workers", "--workers"),
    ("ray_address", "--ray-address"),
    ("gpus_per_worker", "--gpus-per-worker"),
    ("shard", "--shard"),
    ("summary_only", "--summary-only"),
)
"""(dest, flag) of the options only the shift sweep takes."""


@dataclass(frozen=True)
class EditorSweepArgs:
    """What an editor sweep varies, read from the command line and checked.

    Attributes:
        method: the editor's name.
        param: the hyper-parameter swept.
        values: its values, in order.
        fixed: the editor's other hyper-parameters (``--fixed``).
    """

    method: str
    param: str
    values: list[Any]
    fixed: dict[str, Any]

    def label(self, value: Any) -> str:
        """A value as the run labels it (JSON), e.g. ``1000`` or ``[3, 4]``."""
        return json.dumps(value)


def editor_sweep_args(args: argparse.Namespace) -> EditorSweepArgs:
    """Read and check ``--method``, ``--hparam`` and ``--fixed`` (before any model loads).

    Args:
        args: the parsed command line, ``--method`` not ``shift``.

    Returns:
        The sweep's editor, parameter, values and fixed hyper-parameters.

    Raises:
        InputError: an unknown editor or parameter, an option of the shift grid, no or more
            than one ``--hparam``, a malformed or bad value, a parameter both swept and fixed.
    """
    from backward_lens.evaluation.sweep.editor import editor_labels

    method = args.method
    if method == UNEDITED:
        raise InputError("--method unedited is the baseline row every sweep has; name an editor")
    check_methods([method])  # an unknown editor: one line naming the valid ones
    for dest, flag in GRID_OPTIONS:
        if getattr(args, dest, None):
            raise InputError(
                f"{flag} belongs to the shift sweep (--method shift); --method {method} sweeps "
                "one --hparam in this process (continue an interrupted run with --resume)"
            )
    if shard_from_args(args).sharded:
        raise InputError(
            f"--method {method} runs in one process; RANK/WORLD_SIZE or a Slurm array split only "
            "the shift sweep (unset them, or use evaluate --shard)"
        )
    if not args.hparam:
        raise InputError(
            f"--method {method} sweeps one hyper-parameter: give --hparam KEY=V1,V2,... "
            "(e.g. --hparam mom2_update_weight=100,1000)"
        )
    if len(args.hparam) > 1:
        raise InputError(
            f"give one --hparam (a sweep varies one hyper-parameter; got {len(args.hparam)}); "
            "set the others with --fixed KEY=VALUE"
        )
    param, values = parse_values(args.hparam[0], "in --hparam")
    fixed = dict(parse_hparam(item, "in --fixed") for item in args.fixed)
    if param in fixed:
        raise InputError(f"{param} is both swept (--hparam) and fixed (--fixed); give it once")
    editor_labels(method, param, values)  # no repeated value
    check_methods([MethodSpec(method, {**fixed, param: v}) for v in values])
    return EditorSweepArgs(method, param, values, fixed)


def run_editor(args: argparse.Namespace, fluency_settings: FluencySettings) -> int:
    """Sweep ``--hparam`` of ``--method`` over the records and write the table; returns 0.

    Raises:
        InputError: a bad option (before the model loads), an occupied ``--out`` without
            ``--resume``/``--fresh``, a run made with other settings, every value rejected.
    """
    from backward_lens.evaluation.sweep.editor import editor_sweep

    sweep = editor_sweep_args(args)
    out = checks.output_folder(args.out, "--out")
    check_model_args(args)
    records = load_records(args.data, limit=args.records)
    lm = model_from_args(args)
    df = editor_sweep(
        lm,
        records,
        sweep.method,
        sweep.param,
        sweep.values,
        out,
        fixed=sweep.fixed,
        fluency_settings=fluency_settings,
        batch_size=args.batch_size,
        data=str(Path(args.data).resolve()),
        resume=args.resume,
        overwrite=args.fresh,
        progress=not args.quiet,
    )
    title = (
        f"{sweep.method} {sweep.param} sweep: {lm.name}, "
        f"{len(records)} records of {Path(args.data).name}"
    )
    _write_table(args, out, df, sweep, title, lm.name)
    return 0


def _write_table(
    args: argparse.Namespace,
    out: Path,
    df: pd.DataFrame,
    sweep: EditorSweepArgs,
    title: str,
    model: str,
) -> None:
    """Choose the value and write sweep.csv, sweep.md and sweep.png (atomically)."""
    from backward_lens.evaluation.sweep import plot_editor_sweep

    write_sweep(
        args,
        out,
        df,
        markdown=lambda table, best: _markdown(table, best, sweep),
        plot=lambda table, best, path: plot_editor_sweep(table, best, path, title),
        choice=lambda best: (
            f"{sweep.method} {sweep.param}={sweep.label(sweep.values[int(best.name) - 1])}"
        ),
        model=model,
    )


def _markdown(df: pd.DataFrame, best: pd.Series, sweep: EditorSweepArgs) -> str:
    """The editor sweep's table in Markdown, the chosen value marked (row 0: unedited)."""
    head = (
        f"| {sweep.method} {sweep.param} | efficacy acc | paraphrase acc | neighborhood acc "
        "| neighborhood score | n-gram entropy | perplexity | records | rejected because |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    names = [UNEDITED, *(sweep.label(v) for v in sweep.values)]
    for (i, r), name in zip(df.iterrows(), names, strict=True):
        mark = " **(chosen)**" if i == best.name else ""
        lines.append(
            f"| {name}{mark} | {r.efficacy_acc * 100:.1f} | {r.paraphrase_acc * 100:.1f} | "
            f"{r.neighborhood_acc * 100:.1f} | {r.neighborhood_score * 100:.1f} | "
            f"{r.fluency * 100:.1f} | {r.perplexity:.2f} | {int(r.records)} | "
            f"{r.rejected_because} |"
        )
    return "\n".join(lines) + "\n"
