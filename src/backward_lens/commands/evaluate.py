"""``backward-lens evaluate``: single-edit CounterFact evaluation of editing methods."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from backward_lens import checks
from backward_lens.commands.common import (
    add_model_arguments,
    add_ray_arguments,
    add_shard_argument,
    check_model_args,
    model_from_args,
    positive_int,
    ray_from_args,
    shard_from_args,
)
from backward_lens.data import load_records
from backward_lens.errors import InputError

NAME = "evaluate"
HELP = "edit CounterFact facts one at a time and measure efficacy, specificity, fluency"
DESCRIPTION = """\
Runs single edits over the first N records of a CounterFact file (EasyEdit or ROME layout): for
each record and method the edit is computed (timed), measured, and reverted. Per record it
reports the Backward Lens paper's argmax accuracies (Efficacy/Paraphrase/Neighborhood acc: every
target token is the greedy argmax; neighbourhood = the true object stays argmax), ROME's scores
(P(new) > P(true), reversed for neighbourhood) and magnitudes, n-gram entropy of sampled text
(fluency), perplexity on a built-in offline text set, and the wall time of the edit.

Results stream to OUT/results.jsonl, one line per (record, method); --resume continues an
interrupted run without recomputing anything, and adding methods or records to a finished run
only computes what is new. OUT/summary.md and OUT/summary.csv give mean ± std per method (x100
for fractions and entropies), with the unedited model as the first row.

A METHOD is an editor name (unedited, shift, shift-adaptive, ft, ft-early, ft-late, rome, memit,
as registered) optionally with hyper-parameters: NAME:key=value,key=value (values read as JSON).

Or compute on Ray workers with --workers N (a local cluster; --ray-address ADDR or RAY_ADDRESS:
an existing one): each worker loads the model once and pulls groups of records as it frees up,
this process writes the results (so --resume works the same), --gpus-per-worker places workers
on GPUs. Needs the extra: pip install 'backward-lens[ray]'.

Split a long run over processes with --shard K/N (K from 0; also read from RANK/WORLD_SIZE or a
Slurm array): part K takes records i with i mod N == K and writes OUT/results.shard-K-of-N.jsonl;
the summary merges every part, so any launcher can run the parts side by side.

Examples:
  backward-lens evaluate --method shift --method shift-adaptive \\
      --data counterfact-edit.json --records 1000 --out runs/cf1000
  backward-lens evaluate --method rome --method "ft:layer=0" --data counterfact-edit.json \\
      --records 200 --out runs/cf1000 --resume
  backward-lens evaluate --summary-only --out runs/cf1000
  for k in 0 1 2 3; do backward-lens evaluate --method rome --data counterfact-edit.json \\
      --out runs/cf-all --shard $k/4 --quiet & done; wait
  backward-lens evaluate --summary-only --out runs/cf-all
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="METHOD",
        help="editing method, repeatable (e.g. shift, rome, 'ft:layer=0', 'shift:eta=0.5')",
    )
    add_model_arguments(p)
    p.add_argument("--data", metavar="FILE", help="CounterFact JSON (EasyEdit or ROME layout)")
    p.add_argument(
        "--records",
        type=positive_int,
        default=None,
        metavar="N",
        help="evaluate the first N records (default: all; the paper uses 1000)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results in --out")
    p.add_argument(
        "--no-baseline", action="store_true", help="do not add the unedited model as a method"
    )
    p.add_argument(
        "--fluency-records",
        type=int,
        default=None,
        metavar="K",
        help="sample text for n-gram entropy on the first K records only (default: all; 0: off; "
        "it costs ~100 sampled tokens per generation prompt per method)",
    )
    p.add_argument(
        "--ppl-records",
        type=int,
        default=None,
        metavar="K",
        help="measure perplexity on the first K records only (default: all; 0: off; it costs "
        "one forward pass over 48 sentences per record and method)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="sequences per forward pass (1 = one prompt at a time) (32)",
    )
    p.add_argument(
        "--group-size",
        type=positive_int,
        default=16,
        help="records whose edited prompts share forward passes (16)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the fluency sampling (0)")
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="only rebuild summary.md/summary.csv from --out/results.jsonl (and its shards)",
    )
    add_shard_argument(p)
    add_ray_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table")


def run(args: argparse.Namespace) -> int:
    from backward_lens.evaluation import EvalSettings, evaluate, write_summary
    from backward_lens.evaluation.harness import UNEDITED, check_methods

    out = Path(args.out)
    if not args.summary_only:
        if not args.data:
            raise InputError("give the CounterFact file with --data FILE")
        methods = list(dict.fromkeys(args.method))
        if not args.no_baseline and UNEDITED not in methods:
            methods.insert(0, UNEDITED)
        if not methods:
            raise InputError("give at least one --method (e.g. --method shift)")
        for name, value in (
            ("--fluency-records", args.fluency_records),
            ("--ppl-records", args.ppl_records),
        ):
            if value is not None and value < 0:
                raise InputError(f"{name} must be 0 or more, got {value}")
        settings = EvalSettings(
            batch_size=args.batch_size,
            group_size=args.group_size,
            fluency_records=args.fluency_records,
            ppl_records=args.ppl_records,
            seed=args.seed,
        )
        check_methods(methods)
        shard = shard_from_args(args)
        checks.output_folder(out, "--out")
        check_model_args(args)
        ray = ray_from_args(args)
        records = load_records(args.data, limit=args.records)
        common: dict[str, Any] = {
            "settings": settings,
            "data": str(Path(args.data).resolve()),
            "resume": args.resume,
            "overwrite": args.overwrite,
            "progress": not args.quiet,
            "shard": shard,
        }
        if ray is not None:
            from backward_lens.distributed.ray_backend import evaluate_ray

            model_spec, cluster = ray
            result = evaluate_ray(model_spec, records, methods, out, cluster=cluster, **common)
        else:
            result = evaluate(model_from_args(args), records, methods, out, **common)
        if not args.quiet:
            print(
                f"{result.written} new lines ({result.skipped} skipped, {result.errors} "
                f"errors), {result.reused} reused -> {result.results_path}"
            )
    md, csv, _ = write_summary(out)
    if not args.quiet:
        print(md.read_text(), end="")
        print(f"summary: {md} and {csv}")
    return 0
