"""ROME's time per edit, before/after the lean passes (``editing.rome.LEAN``), in one run.

The two settings alternate request by request, so both see the same machine load; the load
average is printed at the start and the end. A warm-up edit first fills the per-session context
prefixes and the on-disk key statistics, which every later edit reuses.

Usage:
  python benchmarks/bench_rome.py [--model smollm2-135m] [--data counterfact-edit.json]
      [--edits 2] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time
from typing import Any

import torch

from backward_lens.data import load_records
from backward_lens.editing import RewriteRequest, get_editor
from backward_lens.editing import rome as rome_module
from backward_lens.editing.defaults import editor_defaults
from backward_lens.models import load_model
from timing import COUNTERFACT_EDIT

DEFAULT_DATA = COUNTERFACT_EDIT


def main() -> None:
    """Parse the command line and print ROME's time per edit before and after the LEAN changes."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--edits", type=int, default=2, help="requests timed per setting (2)")
    ap.add_argument("--profile", action="store_true", help="cProfile the last lean edit")
    ap.add_argument(
        "--parts",
        type=int,
        default=0,
        metavar="N",
        help="instead, time only the passes LEAN changes (key pass; value setup = one step), "
        "N times each, alternating: on a loaded machine the whole edit's noise hides them",
    )
    args = ap.parse_args()

    lm = load_model(args.model)
    records = load_records(args.data, limit=args.edits + 1)
    requests = [RewriteRequest.from_record(r) for r in records]
    editor = get_editor("rome")
    print(f"model {lm.name}, torch threads {torch.get_num_threads()}, cores {os.cpu_count()}")
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    if args.parts:
        parts(lm, requests[0], args.parts)
        return
    t0 = time.perf_counter()
    editor(lm, requests[:1])  # warm-up: context prefixes (per session), key statistics (disk)
    print(f"warm-up edit (prefixes + statistics): {time.perf_counter() - t0:.1f} s")

    times: dict[bool, list[float]] = {False: [], True: []}
    losses: dict[bool, list[list[float]]] = {False: [], True: []}
    for request in requests[1:]:
        for lean in (False, True):
            rome_module.LEAN = lean
            profiler = cProfile.Profile() if args.profile and lean else None
            if profiler:
                profiler.enable()
            start = time.perf_counter()
            edit = editor(lm, [request])
            times[lean].append(time.perf_counter() - start)
            if profiler:
                profiler.disable()
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(12)
            losses[lean].append(edit.info["v_losses"])
            print(f"  {'after ' if lean else 'before'}: {times[lean][-1]:.1f} s, "
                  f"{len(edit.info['v_losses'])} value steps")  # fmt: skip
    rome_module.LEAN = True
    before, after = statistics.median(times[False]), statistics.median(times[True])
    print(f"ROME time per edit, median of {len(times[True])}: before {before:.1f} s, "
          f"after {after:.1f} s ({100 * (1 - after / before):.0f}% less)")  # fmt: skip
    print("same value losses before and after:", losses[False] == losses[True])
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


def parts(lm: Any, request: RewriteRequest, repeat: int) -> None:
    """Print the median time of ROME's key pass and value set-up, with LEAN off and on.

    The value set-up is the recording pass plus one optimisation step; the settings alternate,
    ``repeat`` times each, so that a loaded machine's noise hits both alike.
    """
    from backward_lens.editing.matrix import ff2

    layer = get_editor("rome").layer or editor_defaults(lm, "rome")["layer"]
    matrix = ff2(lm, layer)
    prefixes = rome_module.context_prefixes(lm, [[5, 10], [10, 10]], 0)
    config = rome_module.ValueConfig(steps=1)
    jobs = {
        "key pass": lambda: rome_module.average_key(lm, matrix, request, prefixes),
        "value set-up + 1 step": lambda: rome_module.optimize_value(
            lm, matrix.module, layer, request, prefixes, config
        ),
    }
    for name, job in jobs.items():
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeat):
            for lean in (False, True):
                rome_module.LEAN = lean
                start = time.perf_counter()
                job()
                times[lean].append(time.perf_counter() - start)
        rome_module.LEAN = True
        before, after = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name} (layer {layer}), median of {repeat}: before {before:.2f} s, "
              f"after {after:.2f} s")  # fmt: skip
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
