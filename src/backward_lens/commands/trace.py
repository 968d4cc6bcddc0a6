"""``backward-lens trace``: causal tracing (ROME, Meng et al. 2022) over N records."""

from __future__ import annotations

import argparse

from backward_lens.commands.common import add_model_arguments, check_model_args
from backward_lens.commands.options import (
    add_config_arguments,
    add_run_folder_flags,
    add_shared,
    config_from_args,
    positive_int,
    signature_default,
)
from backward_lens.errors import InputError

NAME = "trace"
HELP = "causal tracing (ROME): which layers recall a fact; picks ROME's and MEMIT's layers"
DESCRIPTION = """\
Causal tracing as in the ROME paper (Meng et al. 2022, experiments/causal_trace.py): the
subject's token embeddings are corrupted with Gaussian noise (3x the std of the subjects'
embeddings), then one state is restored to its clean value at a time: a block's output (hidden
state), or the MLP / attention outputs of a window of 10 layers, at one (layer, token); the score
is the recovered probability of the true object. Restorations of one record run batched.

Records are visited in a seeded random order; by default only facts the model predicts (top-1
token = the true object's first token) are traced, as in ROME. The run folder holds raw.jsonl
(one line per record, streamed: an interrupted run resumes), summary.json / summary.md (the peak
layer of each kind at the subject's last token and the ROME / MEMIT layers it implies),
averages.csv, averages.png (average indirect effect by ROME's token segments) and
records/<key>.png (three heatmaps per record). A run folder is resumed by default (--resume
says so explicitly): running again with a larger --records extends it, and with more --kinds
adds them to every traced record (the same noise: as if traced at once); --fresh discards its
rows to start again.

On a shared machine run with OMP_NUM_THREADS=1 or 2. Cost per record grows with tokens x
layers^2 x --samples; ROME uses 10 samples, --samples 1-3 is a CPU budget.

Examples:
  backward-lens trace --data known_1000.json --records 50 --out runs/trace-smollm2
  backward-lens trace --data known_1000.json --records 30 --model gemma3-270m --samples 2 \\
      --out runs/trace-gemma3
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add trace's options (defaults: :func:`run_trace`'s and :class:`TraceConfig`'s)."""
    from backward_lens.tracing.core import TraceConfig
    from backward_lens.tracing.run import run_trace

    add_shared(p, "--data", "known_1000.json, CounterFact (either layout) or JSONL")
    n = signature_default(run_trace, "n")
    add_shared(
        p,
        "--records",
        f"trace N records of --data, visited in an order shuffled with --seed (default: {n})",
        type=positive_int,
        default=n,
    )
    add_shared(p, "--out", "the run folder", required=True)
    add_run_folder_flags(p)
    seed = signature_default(run_trace, "seed")
    add_shared(p, "--seed", f"of the record order (default: {seed})", type=int, default=seed)
    add_config_arguments(p, TraceConfig)
    p.add_argument(
        "--all-facts",
        action="store_true",
        help="also trace facts the model does not predict (ROME skips them)",
    )
    p.add_argument("--no-record-figures", action="store_true", help="skip records/<key>.png")
    add_model_arguments(p)
    add_shared(p, "--quiet", "no progress bar, no summary", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Trace the records, write the run folder and print its summary; returns 0.

    Raises:
        InputError: a bad option or folder (one line, before the model loads).
    """
    from backward_lens import checks
    from backward_lens.tracing.core import TraceConfig
    from backward_lens.tracing.run import run_trace

    if args.data is None:
        raise InputError("give the records with --data FILE (known_1000.json, CounterFact, JSONL)")
    config = config_from_args(TraceConfig, args)
    config.check()
    checks.output_folder(args.out, "--out")
    check_model_args(args)
    model: object = args.model
    if args.dtype != "float32" or args.device or args.device_map:
        from backward_lens.commands.common import model_from_args

        model = model_from_args(args)
    result = run_trace(
        args.data,
        model=model,  # type: ignore[arg-type]
        n=args.records,
        seed=args.seed,
        out=args.out,
        config=config,
        known_only=not args.all_facts,
        record_figures=not args.no_record_figures,
        fresh=args.fresh,
        progress=not args.quiet,
    )
    if not args.quiet:
        print((result.out / "summary.md").read_text())
        print(f"wrote {result.out}/: summary.json, summary.md, averages.csv, averages.png")
    return 0
