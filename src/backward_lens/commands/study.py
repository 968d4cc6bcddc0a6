"""``backward-lens study``: the paper's analyses over a dataset, as reproducible experiments."""

from __future__ import annotations

import argparse

from backward_lens import checks
from backward_lens.commands.common import (
    add_model_arguments,
    add_ray_arguments,
    add_shard_argument,
    check_model_args,
    positive_int,
    ray_from_args,
    shard_from_args,
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
Running again on a finished folder only redraws (no model is loaded).

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
array): part K computes the sampled records i with i mod N == K into OUT/raw.shard-K-of-N.jsonl,
and the aggregate, figure and summary are built from every part found (run any part again, once
all have finished, to rebuild them from the complete set).

Or compute on Ray workers with --workers N (a local cluster; --ray-address ADDR or RAY_ADDRESS:
an existing one): each worker loads the model once and pulls batches of records; this process
writes raw.jsonl, so resuming works the same. Needs: pip install 'backward-lens[ray]'.

On a machine shared with other jobs, run with OMP_NUM_THREADS=1: torch threads competing for busy
cores can make a run many times slower.

Examples:
  backward-lens study rank --data counterfact-edit.json --n 100 --seed 0 --out runs/smol/rank
  backward-lens study rank --data counterfact-edit.json --model gemma3-270m --out runs/gemma/rank
  backward-lens study compare runs/smol/rank runs/gemma/rank --out runs/compare/rank
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from backward_lens.study.experiments import EXPERIMENTS

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
    p.add_argument(
        "--data",
        metavar="FILE",
        help="records: CounterFact (EasyEdit or ROME layout), known_1000.json, or JSONL",
    )
    p.add_argument("--n", type=positive_int, default=100, help="records to sample (100)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument(
        "--out", metavar="DIR", help="output folder (default: study/<model>/<experiment>)"
    )
    add_model_arguments(p)
    p.add_argument(
        "--batch-size", type=positive_int, default=16, help="records per capture batch (16)"
    )
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="neurons / imprint-shift: the block to study (default: 61%% / 50%% of the depth)",
    )
    p.add_argument("--lr", type=float, default=1.0, help="imprint-shift: SGD learning rate (1.0)")
    p.add_argument(
        "--top", type=positive_int, default=100, help="neurons: top tokens compared (100)"
    )
    p.add_argument(
        "--max-neurons",
        type=int,
        default=512,
        help="neurons: analyse this many highest-norm neurons per matrix, 0 = all (512)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="discard earlier raw values in --out instead of resuming",
    )
    add_shard_argument(p, "sampled records")
    add_ray_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")


def run(args: argparse.Namespace) -> int:
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

    options = StudyOptions(layer=args.layer, lr=args.lr, top=args.top, max_neurons=args.max_neurons)
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
        n=args.n,
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
