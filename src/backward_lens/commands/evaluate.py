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
    ray_from_args,
    shard_from_args,
)
from backward_lens.commands.options import (
    add_config_arguments,
    add_run_folder_flags,
    add_shared,
    config_from_args,
    positive_int,
)
from backward_lens.data import load_records
from backward_lens.editing.table import EDITORS
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

Results stream to OUT/results.jsonl, one line per (record, method). A folder that already holds
results is refused unless you say what to do with them: --resume continues an interrupted run
without recomputing anything (adding methods or records to a finished run only computes what is
new); --fresh discards those results and starts again. OUT/summary.md and OUT/summary.csv give
mean ± std per method (x100 for fractions and entropies), with the unedited model first.

A METHOD is an editor name optionally with hyper-parameters: NAME:key=value,key=value (values
read as JSON). Editors: EDITOR_NAMES (and unedited, the baseline row).

Or compute on Ray workers with --workers N (a local cluster; --ray-address ADDR or RAY_ADDRESS:
an existing one): each worker loads the model once and pulls groups of records as it frees up,
this process writes the results (so --resume works the same), --gpus-per-worker places workers
on GPUs. Needs the extra: pip install 'backward-lens[ray]'.

Split a long run over processes with --shard K/N (K from 0; also read from RANK/WORLD_SIZE or a
Slurm array): part K takes the groups of --group-size records g with g mod N == K (group g is
records [g*G, (g+1)*G)) and writes OUT/results.shard-K-of-N.jsonl; the summary merges every part,
bit-equal to one process, so any launcher can run the parts side by side.

One table from several runs: --summary-only --from DIR (repeatable) combines finished runs of the
same model, data file and settings into --out (a new or empty folder, or an earlier combined
table's; never a run's own folder). Each --label LABEL after a --from DIR takes only that method
from that run (one label per --label, written as in the run, e.g. 'shift:layer=22,eta=0.35';
none: all its methods). A method taken from several runs must have equal lines on the records
both have (the unedited baseline is checked so and kept once); then every method is restricted
to the records every method has, so the table compares them on the same records. --records N
keeps only the first N records. It writes OUT/summary.md, OUT/summary.csv and OUT/combined.json
(the runs and their labels, the record count, the lines dropped per method).

Examples:
  backward-lens evaluate --method shift --method shift-adaptive \\
      --data counterfact-edit.json --records 1000 --out runs/cf1000
  backward-lens evaluate --method rome --method "ft:layer=0" --data counterfact-edit.json \\
      --records 200 --out runs/cf1000 --resume
  backward-lens evaluate --summary-only --out runs/cf1000
  for k in 0 1 2 3; do backward-lens evaluate --method rome --data counterfact-edit.json \\
      --out runs/cf-all --shard $k/4 --quiet & done; wait
  backward-lens evaluate --summary-only --out runs/cf-all
  backward-lens evaluate --summary-only --out runs/table --records 300 \\
      --from runs/cf1000 --from runs/rome --label rome --label memit
""".replace("EDITOR_NAMES", ", ".join(EDITORS))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add evaluate's options; the measuring settings come from :class:`EvalSettings`."""
    from backward_lens.evaluation import EvalSettings

    p.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="METHOD",
        help="editing method, repeatable (e.g. shift, rome, 'ft:layer=0', 'shift:eta=0.5')",
    )
    add_model_arguments(p)
    add_shared(p, "--data", "CounterFact JSON (EasyEdit or ROME layout)")
    add_shared(
        p,
        "--records",
        "the first N records of --data (default: all; the paper uses 1000); with --from: "
        "only the records at positions below N",
        type=positive_int,
        default=None,
    )
    add_shared(
        p,
        "--out",
        "the run folder (results.jsonl, summary.md, ...); with --from: the combined table's",
        required=True,
    )
    add_run_folder_flags(p)
    p.add_argument(
        "--no-baseline", action="store_true", help="do not add the unedited model as a method"
    )
    add_config_arguments(p, EvalSettings)
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="only rebuild summary.md/summary.csv from --out/results.jsonl (and its shards)",
    )
    p.add_argument(
        "--from",
        dest="combine_from",
        action=_FromRun,
        default=[],
        metavar="DIR",
        help="with --summary-only: a finished run folder to combine into --out (repeatable; "
        "the table is on the records every method has)",
    )
    p.add_argument(
        "--label",
        dest="combine_label",
        action=_FromLabel,
        metavar="LABEL",
        help="take only the method LABEL from the run of the last --from (repeatable, one label "
        "each, written as in that run; default: all its methods)",
    )
    add_shard_argument(p, "the groups of --group-size records g with g mod N == K")
    add_ray_arguments(p)
    add_shared(p, "--quiet", "no progress bar, no table", action="store_true")


class _FromRun(argparse.Action):
    """``--from DIR``: add a run to combine, with all its labels until ``--label`` says which."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        """Append ``(DIR, None)`` to the runs to combine."""
        sources = list(getattr(namespace, self.dest) or [])
        sources.append((str(values), None))
        setattr(namespace, self.dest, sources)


class _FromLabel(argparse.Action):
    """``--label LABEL``: take this label from the run of the last ``--from``.

    The label is added to that run's entry in ``combine_from`` (``--from``'s list, so the order
    of the two flags on the command line decides); its own slot keeps every label given.
    """

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        """Add ``LABEL`` to the last run's labels (an error before any ``--from``)."""
        sources = list(getattr(namespace, "combine_from", None) or [])
        if not sources:
            parser.error("--label LABEL goes after the --from DIR it takes the method from")
        folder, labels = sources[-1]
        sources[-1] = (folder, [*(labels or []), str(values)])
        namespace.combine_from = sources
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), values])


def run(args: argparse.Namespace) -> int:
    """Evaluate the methods over the records (or only rebuild the summary); returns 0.

    Raises:
        InputError: a bad option, method or folder (one line, before the model loads).
    """
    from backward_lens.evaluation import EvalSettings, evaluate, write_summary
    from backward_lens.evaluation.harness import UNEDITED, check_methods

    out = Path(args.out)
    if args.combine_from:
        return _combine(args, out)
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
        settings = config_from_args(EvalSettings, args)
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
            "overwrite": args.fresh,
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


def _combine(args: argparse.Namespace, out: Path) -> int:
    """``--summary-only --from DIR ...``: one table from several runs, on the same records.

    Raises:
        InputError: --from without --summary-only, or an occupied --out.
        DataError: runs that cannot be combined (see ``evaluation.combine``).
    """
    from backward_lens.evaluation.combine import write_combined

    if not args.summary_only:
        raise InputError("--from combines finished runs and computes nothing: add --summary-only")
    files, report = write_combined(out, args.combine_from, args.records)
    if not args.quiet:
        print(files[0].read_text(), end="")
        dropped = {k: v for k, v in report.dropped.items() if v}
        print(
            f"{report.records} records common to every method"
            + (f"; lines dropped per method: {dropped}" if dropped else "")
            + f"\nsummary: {', '.join(str(f) for f in files)}"
        )
    return 0
