"""``backward-lens study``: the paper's analyses over a dataset, as reproducible experiments."""

from __future__ import annotations

import argparse

from backward_lens import checks
from backward_lens.commands.common import (
    add_model_arguments,
    add_ray_arguments,
    add_shard_argument,
    check_model_args,
    ray_from_args,
    shard_from_args,
)
from backward_lens.commands.options import (
    add_config_arguments,
    add_deprecated_alias,
    add_run_folder_flags,
    add_shared,
    config_from_args,
    positive_int,
    signature_default,
)
from backward_lens.errors import InputError

NAME = "study"
HELP = "run one of the paper's analyses over N records (rank, norms, target-rank, ...)"
DESCRIPTION = """\
Run one of the paper's analyses over N records sampled (with a fixed seed) from a dataset:
CounterFact in the EasyEdit or ROME layout, ROME's known_1000.json, or your own JSONL with
"prompt", "subject" and "target" per line. Each run writes a folder with the figure (PNG and a
self-contained HTML page), the aggregated numbers (aggregate.csv / aggregate.json), the per-record
raw values (raw.jsonl, streamed: an interrupted run resumes where it stopped) and summary.md, the
finding in numbers with the paper's for comparison, the skipped records and the time per record.
Running again on a finished folder only redraws (no model is loaded): a run folder is resumed
by default (--resume says so explicitly), and --fresh discards its raw values to start again.

experiments:
  rank           share of prompts whose FF1/FF2 gradient has rank n, per layer (Fig. 3)
  norms          mean ||delta_i|| (FF2) and ||x_i|| (FF1) per prompt segment x layer (Figs. 5, 17)
  target-rank    rank of the target in LL(delta_i) per segment x layer, raw and normalised lens
                 (Figs. 6, 18)
  original-rank  rank of the model's own answer in LL(delta_n) and LL(x_n), by correctness
                 (Figs. 19-21)
  similarity     cosine of a token's FF2 VJPs across layers, per segment (App. G)
  neurons        one layer's gradient neurons vs the spanning vectors (App. C); --layer
  imprint-shift  one real SGD step vs Lemma 5.2; --layer, --lr
  compare        overlay finished runs: backward-lens study compare DIR DIR ... --out DIR

Segments follow ROME: first subject token, middle subject tokens, last subject token, first
subsequent token, further tokens, last token (+ tokens before the subject, + BOS).

Split a run over processes with --shard K/N (K from 0; also read from RANK/WORLD_SIZE or a Slurm
array): part K computes the batches of --batch-size sampled records b with b mod N == K (batch b
is records [b*B, (b+1)*B)) into OUT/raw.shard-K-of-N.jsonl,
and the aggregate, figure and summary are built from every part found (run any part again, once
all have finished, to rebuild them from the complete set).

Or compute on Ray workers with --workers N (a local cluster; --ray-address ADDR or RAY_ADDRESS:
an existing one): each worker loads the model once and pulls batches of records; this process
writes raw.jsonl, so resuming works the same. Needs: pip install 'backward-lens[ray]'.

On a machine shared with other jobs, run with OMP_NUM_THREADS=1: torch threads competing for busy
cores can make a run many times slower.

Examples:
  backward-lens study rank --data counterfact-edit.json --records 100 --seed 0 --out runs/smol/rank
  backward-lens study rank --data counterfact-edit.json --model gemma3-270m --out runs/gemma/rank
  backward-lens study compare runs/smol/rank runs/gemma/rank --out runs/compare/rank
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add study's options (defaults: :func:`run_study`'s and :class:`StudyOptions`')."""
    from backward_lens.study.base import StudyOptions
    from backward_lens.study.experiments import EXPERIMENTS
    from backward_lens.study.runner import run_study

    p.add_argument(
        "experiment",
        choices=[*EXPERIMENTS, "compare"],
        metavar="EXPERIMENT",
        help=f"one of: {', '.join(EXPERIMENTS)}, compare",
    )
    p.add_argument(
        "folders",
        nargs="*",
        default=[],
        metavar="DIR",
        help="compare only: output folders of earlier runs",
    )
    add_shared(p, "--data", "CounterFact (EasyEdit or ROME layout), known_1000.json, or JSONL")
    n = signature_default(run_study, "n")
    records = add_shared(
        p,
        "--records",
        f"N records sampled from --data with --seed (default: {n})",
        type=positive_int,
        default=n,
    )
    add_deprecated_alias(p, "--n", records)
    seed = signature_default(run_study, "seed")
    add_shared(p, "--seed", f"of the sampling (default: {seed})", type=int, default=seed)
    add_shared(p, "--out", "the run folder (default: study/<model>/<experiment>)")
    add_run_folder_flags(p)
    add_model_arguments(p)
    batch = signature_default(run_study, "batch_size")
    add_shared(
        p,
        "--batch-size",
        f"records per capture batch (default: {batch})",
        type=positive_int,
        default=batch,
    )
    add_config_arguments(p, StudyOptions)
    add_shard_argument(p, "the batches of --batch-size sampled records b with b mod N == K")
    add_ray_arguments(p)
    add_shared(p, "--quiet", "no progress bar, no summary", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run the experiment (or compare finished runs) and print its summary; returns 0.

    Raises:
        InputError: a bad option or folder (one line, before the model loads).
    """
    if args.experiment == "compare":
        from backward_lens.study.compare import compare_studies

        if not args.folders:
            raise InputError("give the folders to compare: study compare DIR DIR ... --out DIR")
        if not args.out:
            raise InputError("give the comparison's output folder with --out DIR")
        checks.output_folder(args.out, "--out")
        out = compare_studies(args.folders, args.out)
        if not args.quiet:
            print((out / "summary.md").read_text())
            print(f"wrote {out}/figure.png, figure.html, summary.md, headline.csv")
        return 0
    if args.folders:
        raise InputError(
            f"unexpected arguments {' '.join(args.folders)}; only 'compare' takes folders"
        )
    from backward_lens.study.base import StudyOptions
    from backward_lens.study.runner import run_study

    if args.data is None:
        raise InputError(
            "give the records with --data FILE (CounterFact, known_1000.json or JSONL)"
        )
    from backward_lens.study.runner import check_options

    options = config_from_args(StudyOptions, args)
    check_options(options)
    shard = shard_from_args(args)
    if args.out:
        checks.output_folder(args.out, "--out")
    check_model_args(args)
    ray = ray_from_args(args)
    executor = None
    model: object = args.model
    if ray is not None:  # the workers load the model; this process only writes
        from backward_lens.distributed.ray_backend import RayStudy

        executor = RayStudy(*ray)
    elif args.dtype != "float32" or args.device or args.device_map:
        from backward_lens.commands.common import model_from_args

        model = model_from_args(args)
    result = run_study(
        args.experiment,
        args.data,
        model=model,  # type: ignore[arg-type]
        n=args.records,
        seed=args.seed,
        out=args.out,
        options=options,
        batch_size=args.batch_size,
        fresh=args.fresh,
        progress=not args.quiet,
        shard=shard,
        executor=executor,
    )
    if not args.quiet:
        print(result.summary)
        print(f"wrote {result.out}/: " + ", ".join(p.name for p in result.files.values()))
    return 0
