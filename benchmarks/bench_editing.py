"""Editing benchmark (issue 4): time per edit and evaluation throughput, measured in one run.

Prints:
  1. forward pass shift's time per edit / one forward pass of the edit prompt   (goal <= 1.5)
  2. ROME's and FT's time per edit / forward pass shift's (if those editors are registered)
  3. records/s of evaluating forward pass shift on N records, batched vs one prompt at a time
     (goal >= 3x); the accuracy/score/magnitude metrics, no fluency or perplexity unless
     --with-ppl (they are the same for both modes, but would dominate the run time).

Usage:
  python benchmarks/bench_editing.py [--model smollm2-135m] [--data counterfact-edit.json]
      [--edits 20] [--records 100] [--with-ppl]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from backward_lens.data import load_records
from backward_lens.editing import RewriteRequest, get_editor
from backward_lens.errors import InputError
from backward_lens.evaluation import EvalSettings, evaluate
from backward_lens.models import load_model
from timing import COUNTERFACT_EDIT, median_time

DEFAULT_DATA = COUNTERFACT_EDIT


def main() -> None:
    """Parse the command line, load the model and records, and print parts 1-3."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--edits", type=int, default=20, help="requests timed per editor (20)")
    ap.add_argument("--slow-edits", type=int, default=3, help="requests timed for ROME/FT (3)")
    ap.add_argument("--records", type=int, default=100, help="records for the throughput (100)")
    ap.add_argument("--with-ppl", action="store_true", help="include perplexity in throughput")
    ap.add_argument(
        "--only",
        choices=["all", "edits", "throughput"],
        default="all",
        help="run only the time-per-edit part or only the throughput part (all)",
    )
    args = ap.parse_args()

    lm = load_model(args.model)
    records = load_records(args.data, limit=max(args.records, args.edits))
    requests = [RewriteRequest.from_record(r) for r in records[: args.edits]]
    tok = lm.tokenizer
    print(f"model {lm.name}, torch threads {torch.get_num_threads()}")

    # 1. one forward pass over the edit prompt (no grad), median over requests
    def forward(req: RewriteRequest) -> None:
        ids = torch.tensor([tok(req.prompt)["input_ids"]], device=lm.device)
        with torch.no_grad():
            lm.model(input_ids=ids, use_cache=False)

    if args.only != "throughput":
        time_edits(lm, requests, forward, args)
    if args.only != "edits":
        throughput(lm, records[: args.records], args)


def time_edits(lm, requests, forward, args) -> None:  # type: ignore[no-untyped-def]
    """Print parts 1 and 2: median time per edit of each editor over one forward pass.

    The forward pass and shift take the median of 3 runs per request, then the median over
    ``args.edits`` requests; ``shift-adaptive`` is timed once per request on as many, ROME, FT
    and MEMIT once on ``args.slow_edits`` requests (editors not registered are skipped).
    """
    for req in requests[:2]:
        forward(req)  # warm-up
    t_fwd = statistics.median(median_time(lambda r=r: forward(r), 3) for r in requests)

    shift = get_editor("shift")
    shift(lm, requests[:1])
    t_shift = statistics.median(median_time(lambda r=r: shift(lm, [r]), 3) for r in requests)
    print(f"one forward pass of the edit prompt: {t_fwd * 1e3:.1f} ms (median)")
    print(f"forward pass shift, time per edit:  {t_shift * 1e3:.1f} ms (median)")
    print(f"  shift / forward = {t_shift / t_fwd:.2f}  (goal <= 1.5)")

    for name in ("shift-adaptive", "rome", "ft-early", "ft-late", "memit"):
        editor_name, hparams = name, {}
        if name.startswith("ft-"):
            from backward_lens.editing.defaults import editor_defaults

            editor_name, hparams = "ft", editor_defaults(lm, name)
        try:
            editor = get_editor(editor_name, **hparams)
        except InputError:
            print(f"{name}: not registered, skipped")
            continue
        reps = args.edits if name == "shift-adaptive" else args.slow_edits
        editor(lm, requests[:1])  # warm-up (e.g. ROME's covariance statistics, cached)
        t = statistics.median(
            median_time(lambda r=r, e=editor: e(lm, [r]), 1) for r in requests[:reps]
        )
        print(
            f"{name}, time per edit: {t * 1e3:.1f} ms (median of {reps}); "
            f"/ shift = {t / t_shift:.1f}"
        )


def throughput(lm, recs, args) -> None:  # type: ignore[no-untyped-def]
    """3. evaluation throughput of forward pass shift, batched vs one prompt at a time."""
    ppl = None if args.with_ppl else 0
    rates = {}
    for mode, settings in [
        ("batched", EvalSettings(fluency_records=0, ppl_records=ppl)),
        (
            "one prompt at a time",
            EvalSettings(batch_size=1, group_size=1, fluency_records=0, ppl_records=ppl),
        ),
    ]:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            evaluate(lm, recs, ["shift"], Path(tmp), settings=settings, progress=False)
            dt = time.perf_counter() - t0
        rates[mode] = len(recs) / dt
        print(
            f"evaluate shift on {len(recs)} records, {mode}: {dt:.1f} s, "
            f"{rates[mode]:.2f} records/s"
        )
    ratio = rates["batched"] / rates["one prompt at a time"]
    print(f"  batched / one at a time = {ratio:.2f}x  (goal >= 3x)")


if __name__ == "__main__":
    main()
