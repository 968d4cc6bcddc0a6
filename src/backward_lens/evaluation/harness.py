"""Single-edit CounterFact evaluation: edit, measure, revert, one JSON line per (record, method).

Records are taken in groups. For each method, every record of a group is edited (timed, model
left unchanged), then the prompts of the whole group are scored together: each batch row carries
its own record's edit through :class:`~backward_lens.evaluation.rowedits.RowEdits`, which is
exact for edits of Linear/Conv1D weights. Edits of other parameters, and ``batch_size=1``, take
the plain path: apply the edit, score that record, revert.

Lines are appended to ``results.jsonl`` as soon as a group is done, so an interrupted run resumes
where it stopped (``resume=True``): a (method label, record key) already in the file is never
recomputed or written twice, a finished line is never deleted, and only a torn last line (a crash
mid-write) is repaired. A record's key (:func:`record_keys`) is its id when the id is present and
unique in the records, else its position plus a hash of its content. Sampling for fluency is
seeded per record and row, so results do not depend on grouping or on where a run was resumed.

Groups depend only on positions: group ``g`` is records ``[g*G, (g+1)*G)`` of the file
(``G = group_size``), always computed whole (a resumed group recomputes its done lines and writes
only the missing ones), so a resumed, sharded or Ray run gives the same lines, bit for bit, as
one uninterrupted process of the same records (timing columns aside). The last group is cut at
the number of records, so runs over different numbers differ there by float rounding (batching
changes the reduction order), which :mod:`~backward_lens.evaluation.combine` allows for. A run
can be split into shards (``shard=Shard(K, N)``, ``--shard K/N``): shard K takes the groups
``g mod N == K`` and appends to ``results.shard-K-of-N.jsonl`` in the same folder; ``run.json``
records N, and :func:`read_run` (hence the summary) merges every shard's file.

The harness in parts: :mod:`~backward_lens.evaluation.methods` (``NAME:key=value`` specs and
their editors), :mod:`~backward_lens.evaluation.records` (record keys and preparation),
:mod:`~backward_lens.evaluation.settings` (:class:`EvalSettings`),
:mod:`~backward_lens.evaluation.plan` (the run folder, the groups left, the writer) and
:mod:`~backward_lens.evaluation.runner` (editing and scoring a group). This module keeps
:func:`evaluate` and re-exports their public names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from backward_lens import checks
from backward_lens.data import FactRecord
from backward_lens.distributed.shards import Shard
from backward_lens.evaluation.methods import (
    UNEDITED,
    MethodSpec,
    as_specs,
    check_methods,
    parse_hparam,
)
from backward_lens.evaluation.plan import (
    RESULTS,
    RUN,
    ResultWriter,
    RunPlan,
    RunResult,
    _read_done,
    plan_run,
    read_run,
    results_folder,
)
from backward_lens.evaluation.records import MISSING_ID, record_keys
from backward_lens.evaluation.runner import EvalWorker
from backward_lens.evaluation.settings import EvalSettings
from backward_lens.models import LensModel

__all__ = [
    "MISSING_ID",
    "RESULTS",
    "RUN",
    "UNEDITED",
    "EvalSettings",
    "EvalWorker",
    "MethodSpec",
    "ResultWriter",
    "RunPlan",
    "RunResult",
    "_read_done",
    "check_methods",
    "evaluate",
    "parse_hparam",
    "plan_run",
    "read_run",
    "record_keys",
    "results_folder",
]


def evaluate(
    lm: LensModel,
    records: Sequence[FactRecord],
    methods: Sequence[MethodSpec | str],
    out_dir: str | Path,
    *,
    settings: EvalSettings | None = None,
    data: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    shard: Shard | None = None,
) -> RunResult:
    """Evaluate single edits of every method on every record; stream lines to ``out_dir``.

    Args:
        lm: the model (left unchanged).
        records: CounterFact records (either layout).
        methods: method specs (``"shift"``, ``"ft:layer=0"``, ``"unedited"``...).
        out_dir: receives ``run.json``, ``results.jsonl`` (and the summary, see ``summary.py``).
        settings: what to measure and batching.
        data: the data file's name, recorded in ``run.json`` (a resumed run must match it).
        resume: continue a run in ``out_dir``; done (label, record key) pairs are kept as they are
            (see :func:`record_keys`); a finished line is never deleted.
        overwrite: discard earlier results in ``out_dir``.
        on_result: called with each line after it is written (tests use it to interrupt).
        progress: show a tqdm bar (records/s and ETA).
        shard: run only this shard's groups (group ``g`` with ``g mod N == K``) and write
            ``results.shard-K-of-N.jsonl``; :func:`read_run` and the summary merge the shards
            (see :mod:`backward_lens.distributed.shards`). None: every record.

    Raises:
        InputError: a method listed twice, unknown or with bad values; an occupied folder.
    """
    settings = settings or EvalSettings()
    specs = as_specs(methods)
    for spec in specs:  # values and layers first, then unknown names: before any folder work
        checks.hparams(spec.name, spec.hparams, lm.n_layers)
    worker = EvalWorker(lm, specs, settings)
    plan = plan_run(
        lm.name,
        lm.n_layers,
        records,
        specs,
        out_dir,
        dtype=lm.dtype_name,
        settings=settings,
        data=data,
        resume=resume,
        overwrite=overwrite,
        shard=shard,
    )
    desc = f"evaluate {plan.shard}" if plan.shard.sharded else "evaluate"
    bar = tqdm(total=len(plan.todo), unit="rec", disable=not progress, desc=desc, smoothing=0.1)
    writer = ResultWriter(plan, on_result)
    try:
        for group in plan.groups(records):
            for rows in worker.run_iter(group, plan.done_in(group)):
                writer.write(rows)
            writer.sync()
            bar.update(len(group))
            bar.set_postfix(written=writer.stats["written"], skipped=writer.stats["skipped"])
    finally:
        writer.close()
        bar.close()
    return writer.result()
