"""``backward-lens trace``: causal tracing (ROME, Meng et al. 2022) over N records."""

from __future__ import annotations

import argparse

from backward_lens.commands.common import add_model_arguments, check_model_args, positive_int
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
records/<key>.png (three heatmaps per record). Running again with a larger --records extends it.

On a shared machine run with OMP_NUM_THREADS=1 or 2. Cost per record grows with tokens x
layers^2 x --samples; ROME uses 10 samples, --samples 1-3 is a CPU budget.

Examples:
  backward-lens trace --data known_1000.json --records 50 --out runs/trace-smollm2
  backward-lens trace --data known_1000.json --records 30 --model gemma3-270m --samples 2 \\
      --out runs/trace-gemma3
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", metavar="FILE", help="known_1000.json, CounterFact (either layout) or JSONL"
    )
    p.add_argument("--records", type=positive_int, default=50, help="records to trace (50)")
    p.add_argument("--out", metavar="DIR", required=True, help="run folder (resumed if present)")
    p.add_argument("--seed", type=int, default=0, help="seed of the record order (0)")
    p.add_argument(
        "--samples", type=positive_int, default=10, help="noise samples per restoration (10)"
    )
    p.add_argument("--window", type=positive_int, default=10, help="MLP/attn window (10)")
    p.add_argument("--noise", type=float, default=3.0, help="noise std / embedding std (3)")
    p.add_argument(
        "--kinds", default="hidden,mlp,attn", help="what to restore: hidden,mlp,attn (all)"
    )
    p.add_argument(
        "--batch-rows", type=positive_int, default=128, help="rows per forward pass (128)"
    )
    p.add_argument(
        "--all-facts",
        action="store_true",
        help="also trace facts the model does not predict (ROME skips them)",
    )
    p.add_argument("--no-record-figures", action="store_true", help="skip records/<key>.png")
    add_model_arguments(p)
    p.add_argument("--fresh", action="store_true", help="discard earlier rows in --out")
    p.add_argument("--resume", action="store_true", help="resume --out (the default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")


def run(args: argparse.Namespace) -> int:
    from backward_lens import checks
    from backward_lens.tracing.core import TraceConfig
    from backward_lens.tracing.run import run_trace

    if args.data is None:
        raise InputError("give the records with --data FILE (known_1000.json, CounterFact, JSONL)")
    if args.fresh and args.resume:
        raise InputError("--fresh and --resume contradict each other; pass one")
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    config = TraceConfig(
        samples=args.samples,
        window=args.window,
        noise_factor=args.noise,
        batch_rows=args.batch_rows,
        kinds=kinds,
    )
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
