"""``backward-lens sweep``: pick forward pass shift's layer and eta, or any editor's setting.

The editor sweep (``--method NAME``) lives in :mod:`backward_lens.commands.sweep_editor`.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from backward_lens import checks
from backward_lens.commands.common import (
    add_model_arguments,
    add_ray_arguments,
    add_shard_argument,
    check_model_args,
    model_from_args,
    ray_from_args,
    shard_from_args,
)
from backward_lens.commands.options import (
    add_config_arguments,
    add_run_folder_flags,
    add_shared,
    config_from_args,
    parse_layers,
    positive_int,
    signature_default,
)
from backward_lens.commands.sweep_editor import run_editor
from backward_lens.commands.sweep_output import write_sweep
from backward_lens.data import load_records
from backward_lens.editing.table import EDITORS
from backward_lens.errors import InputError

NAME = "sweep"
HELP = (
    "choose forward pass shift's layer and eta, or an editor's setting (efficacy vs neighbourhood)"
)
DESCRIPTION = """\
Applies forward pass shift (FF2_l += eta * x_n^T e_t) for every candidate layer and eta to every
record of a held-out CounterFact split (all records of one grid point share batched forward
passes, each row carrying its own record's shift), and measures efficacy and paraphrase accuracy
(every target token is the argmax), neighbourhood accuracy, and ROME's neighbourhood score
(P(true) > P(new)). It chooses, among the points whose efficacy reaches --min-efficacy, the one
with the best neighbourhood score (then paraphrase accuracy, then the smaller eta), and writes
OUT/sweep.csv, OUT/sweep.md and OUT/sweep.png (heatmaps and the trade-off curve).

Fluency is protected: each grid point also samples continuations of the first
--fluency-records records (n-gram entropy) and scores --ppl-texts perplexity texts with each of
their edits, and a point whose entropy is more than --max-entropy-drop (5 %) below the unedited
model's or whose perplexity is more than --max-perplexity-rise (10 %) above it is never chosen
(sweep.csv says which points were rejected, and why).

The default grid: 7 layers between a third of the depth and the last layer, and etas from 1/4 to
3x the model's current default eta (editing/defaults.py).

Split the grid over processes with --shard K/N (K from 0; also read from RANK/WORLD_SIZE or a
Slurm array): part K computes the grid points p with p mod N == K (the unedited point first, then
layer by layer) and writes OUT/sweep.shard-K-of-N.json; the part that completes the set writes
the table, or run `backward-lens sweep --summary-only --out DIR` once all parts are done.

Or compute on Ray workers with --workers N (a local cluster; --ray-address ADDR or RAY_ADDRESS:
an existing one): each worker loads the model and probes the records once, then computes the
grid points it pulls; the table is the same. Needs: pip install 'backward-lens[ray]'.

Any other editor (--method NAME; editors: EDITOR_NAMES) is swept over the values of one
hyper-parameter, --hparam KEY=V1,V2,... (values read as JSON, split at the commas outside
brackets: --hparam layers=[3,4],[4,5] tries two lists), its others set with --fixed KEY=VALUE
(repeatable; default: the editor's own, per model). Each value is one method of an evaluation
run in OUT (single edits, measured exactly as `backward-lens evaluate` does, with the unedited
model as the baseline row; fluency on the first --fluency-records records, perplexity on all of
evaluate's perplexity texts, so --ppl-texts is not used); the same rule chooses the value (ties:
the earlier value), and OUT/sweep.png plots efficacy, neighbourhood score, n-gram entropy and
perplexity against it. As with evaluate, an OUT that holds results is refused unless --resume
(continue, nothing done is recomputed) or --fresh (start again). --layers, --etas, --shard,
--workers, --ray-address and --summary-only belong to the shift grid.

Examples:
  backward-lens sweep --model smollm2-135m --data counterfact-val.json --records 64 \\
      --layers 9-27:3 --etas 0.3,0.6,0.9,1.2,1.8 --out runs/sweep-smollm2
  backward-lens sweep --method memit --hparam mom2_update_weight=100,1000,10000,20000 \\
      --data counterfact-val.json --records 16 --fluency-records 16 --out runs/memit-lambda
""".replace("EDITOR_NAMES", ", ".join(EDITORS))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add sweep's options (defaults: :func:`shift_sweep`'s, :func:`choose`'s, FluencySettings)."""
    from backward_lens.evaluation.sweep import (
        MAX_ENTROPY_DROP,
        MAX_PERPLEXITY_RISE,
        FluencySettings,
        choose,
        shift_sweep,
    )

    p.add_argument(
        "--method",
        default="shift",
        metavar="NAME",
        help="what to sweep: shift (the --layers x --etas grid) or any editor, over the values "
        "of --hparam (default: shift)",
    )
    p.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="with --method NAME: the hyper-parameter to sweep and its values, read as JSON "
        "(e.g. mom2_update_weight=100,1000 or layers=[3,4],[4,5]); exactly one",
    )
    p.add_argument(
        "--fixed",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --method NAME: another hyper-parameter of the editor, the same at every "
        "value, read as JSON (repeatable)",
    )
    add_model_arguments(p)
    add_shared(p, "--data", "held-out CounterFact file (e.g. counterfact-val.json)")
    add_shared(
        p, "--records", "the first N records of --data (default: 64)", type=positive_int, default=64
    )
    p.add_argument(
        "--layers",
        default=None,
        metavar="LAYERS",
        help="candidate layers, e.g. 9,12,15 or 9-27:3 (every 3rd) (default: 7 layers)",
    )
    p.add_argument(
        "--etas",
        default=None,
        metavar="A,B",
        help="candidate etas, comma-separated (default: 1/4 to 3x the model's default eta)",
    )
    min_efficacy = signature_default(choose, "min_efficacy")
    p.add_argument(
        "--min-efficacy",
        type=float,
        default=min_efficacy,
        metavar="X",
        help=f"efficacy accuracy a chosen point must reach, 0..1 (default: {min_efficacy})",
    )
    add_config_arguments(p, FluencySettings)
    p.add_argument(
        "--max-entropy-drop",
        type=float,
        default=MAX_ENTROPY_DROP,
        metavar="X",
        help="largest relative drop of the n-gram entropy a chosen point may cause "
        f"(default: {MAX_ENTROPY_DROP})",
    )
    p.add_argument(
        "--max-perplexity-rise",
        type=float,
        default=MAX_PERPLEXITY_RISE,
        metavar="X",
        help="largest relative rise of the perplexity a chosen point may cause "
        f"(default: {MAX_PERPLEXITY_RISE})",
    )
    batch = signature_default(shift_sweep, "batch_size")
    add_shared(
        p,
        "--batch-size",
        f"sequences per forward pass (default: {batch})",
        type=positive_int,
        default=batch,
    )
    add_shared(
        p,
        "--out",
        "sweep.csv, sweep.md, sweep.png (and the shards' parts, or the editor sweep's run)",
        required=True,
    )
    add_run_folder_flags(p)
    add_shard_argument(p, "the grid points p with p mod N == K")
    add_ray_arguments(p)
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="only merge the shards' parts in --out into sweep.csv/.md/.png (no model)",
    )
    add_shared(p, "--quiet", "print only the chosen values", action="store_true")


def _layers(text: str | None, n_layers: int) -> list[int]:
    """Candidate layers: the default 7, or ``--layers`` (``9,12`` or ``9-27:3``), range-checked."""
    if text is None:
        lo, hi = n_layers // 3, n_layers - 1
        return sorted({round(lo + i * (hi - lo) / 6) for i in range(7)})
    if ":" in text:
        span, _, step_text = text.partition(":")
        found = parse_layers(span) or list(range(n_layers))
        try:
            step = int(step_text)
        except ValueError:
            raise InputError(f"cannot read the step in --layers {text!r}") from None
        if step < 1:
            raise InputError(f"the step in --layers {text!r} must be 1 or more")
        found = found[::step]
    else:
        found = parse_layers(text) or list(range(n_layers))
    checks.layers("--layers", found, n_layers)
    return found


def _etas(text: str | None, default_eta: float) -> list[float]:
    """Candidate etas: ``--etas`` (each finite, in (0, MAX_ETA]) or multiples of the default."""
    if text is None:
        return [round(default_eta * f, 6) for f in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)]
    values = [v for v in text.split(",") if v.strip()]
    if not values:
        raise InputError(f"--etas {text!r} holds no number; give numbers like 0.1,0.2,0.4")
    return [checks.eta("--etas", v.strip()) for v in values]


def run(args: argparse.Namespace) -> int:
    """Sweep the grid (or this shard's part of it) and write the table; returns 0.

    Raises:
        InputError: a bad option, a folder of another split or settings, a missing part.
    """
    from backward_lens.editing.defaults import editor_defaults
    from backward_lens.evaluation.sweep import FluencySettings, merge_parts, shift_sweep, write_part

    checks.number("--min-efficacy", args.min_efficacy, lo=0.0, hi=1.0, lo_open=False)
    checks.number("--max-entropy-drop", args.max_entropy_drop, lo=0.0, hi=1.0, lo_open=False)
    checks.number("--max-perplexity-rise", args.max_perplexity_rise, lo=0.0, lo_open=False)
    fluency_settings = config_from_args(FluencySettings, args)
    if args.method != "shift":
        if not args.data:
            raise InputError("give the held-out CounterFact file with --data FILE")
        return run_editor(args, fluency_settings)
    for flag, given in (
        ("--hparam", args.hparam),
        ("--fixed", args.fixed),
        ("--resume", args.resume),
        ("--fresh", args.fresh),
    ):
        if given:
            raise InputError(
                f"{flag} is for an editor sweep (--method NAME); the shift sweep takes its grid "
                "from --layers and --etas and computes it afresh"
            )
    if args.summary_only:
        out = checks.output_folder(args.out, "--out")
        df, settings, present, count = merge_parts(out)
        if df is None:
            missing = sorted(set(range(count)) - set(present))
            raise InputError(
                f"{out} holds {len(present)} of {count} sweep parts; run the missing shard(s) "
                f"{', '.join(f'{k}/{count}' for k in missing)} first"
            )
        _write_table(args, out, df, settings)
        return 0
    if not args.data:
        raise InputError("give the held-out CounterFact file with --data FILE")
    if args.etas is not None:
        _etas(args.etas, 1.0)  # refuse bad numbers before loading anything
    if args.layers is not None:
        parse_layers(args.layers.partition(":")[0])
    shard = shard_from_args(args)
    out = checks.output_folder(args.out, "--out")
    check_model_args(args)
    ray = ray_from_args(args)
    records = load_records(args.data, limit=args.records)
    if ray is not None:  # the workers load the model and compute the points
        from backward_lens.distributed.ray_backend import RaySweep

        sweeper = RaySweep(*ray)
        facts = sweeper.facts()
        name, n_layers, default_eta = facts["model"], facts["n_layers"], facts["shift_eta"]
    else:
        lm = model_from_args(args)
        name, n_layers = lm.name, lm.n_layers
        default_eta = float(editor_defaults(lm, "shift")["eta"])
    layers = _layers(args.layers, n_layers)
    etas = _etas(args.etas, default_eta)
    settings = {
        "model": name,
        "data": str(Path(args.data).resolve()),
        "records": args.records,
        "layers": layers,
        "etas": etas,
        "fluency": asdict(fluency_settings),
    }
    if shard.sharded:
        from backward_lens.evaluation.sweep import check_parts

        check_parts(out, shard, settings)  # before the work, not only when writing
    common = {
        "batch_size": args.batch_size,
        "progress": not args.quiet,
        "shard": shard,
        "fluency_settings": fluency_settings,
    }
    if ray is not None:
        df = sweeper.sweep(records, layers, etas, **common)
    else:
        df = shift_sweep(lm, records, layers, etas, **common)
    if shard.sharded:
        part = write_part(out, shard, settings, df)
        merged, _, present, count = merge_parts(out)
        if merged is None:
            print(
                f"wrote {part} ({len(df)} grid points); {len(present)} of {count} parts are "
                f"in {out}: the table is written once all are (or run "
                f"'backward-lens sweep --summary-only --out {out}')"
            )
            return 0
        df = merged
    _write_table(args, out, df, settings)
    return 0


def _write_table(
    args: argparse.Namespace, out: Path, df: pd.DataFrame, settings: dict[str, object]
) -> None:
    """Choose the point and write sweep.csv, sweep.md and sweep.png (atomically)."""
    from backward_lens.evaluation.sweep import plot_sweep

    model = str(settings["model"])
    title = (
        f"forward pass shift sweep: {model}, "
        f"{int(df.records.iloc[0])} records of {Path(str(settings['data'])).name}"
    )
    write_sweep(
        args,
        out,
        df,
        markdown=_markdown,
        plot=lambda table, best, path: plot_sweep(table, best, path, title),
        choice=lambda best: f"layer={int(best.layer)} eta={best.eta:g}",
        model=model,
    )


def _markdown(df: pd.DataFrame, best: pd.Series) -> str:
    """The sweep's table in Markdown, the chosen point marked."""
    head = (
        "| layer | eta | efficacy acc | paraphrase acc | neighborhood acc | neighborhood score "
        "| n-gram entropy | perplexity | rejected because |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for _, r in df.iterrows():
        mark = " **(chosen)**" if r.layer == best.layer and r.eta == best.eta else ""
        layer = "unedited" if r.eta == 0 else str(int(r.layer))
        lines.append(
            f"| {layer} | {r.eta:g}{mark} | {r.efficacy_acc * 100:.1f} | "
            f"{r.paraphrase_acc * 100:.1f} | {r.neighborhood_acc * 100:.1f} | "
            f"{r.neighborhood_score * 100:.1f} | {r.fluency * 100:.1f} | {r.perplexity:.2f} | "
            f"{r.rejected_because} |"
        )
    return "\n".join(lines) + "\n"
