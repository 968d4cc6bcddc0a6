"""An evaluation run's folder and plan: what is done, what is left, and who writes it.

``run.json`` (model, its parameter dtype, data, measuring settings, shard count) and
``results.jsonl`` (one line per (method label, record key); a shard's:
``results.shard-K-of-N.jsonl``) are a :class:`~backward_lens.runfolder.RunFolder`.
:func:`plan_run` checks the folder against this run and lists the groups still to compute
(:meth:`RunPlan.groups`: group ``g`` is records ``[g*G, (g+1)*G)``, always whole);
:class:`ResultWriter` appends the lines (only the driver process writes); :func:`read_run` merges
every shard's lines for the summary.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backward_lens import checks
from backward_lens.data import FactRecord
from backward_lens.distributed.shards import Shard
from backward_lens.errors import DataError, InputError
from backward_lens.evaluation.methods import MethodSpec, as_specs
from backward_lens.evaluation.records import record_keys
from backward_lens.evaluation.settings import EvalSettings
from backward_lens.io import dumps, read_jsonl
from backward_lens.runfolder import RunFolder, differing_keys
from backward_lens.schema import result_line

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
RUN = "run.json"


@dataclass
class RunResult:
    """Where a run wrote, and what it did this time."""

    out_dir: Path
    results_path: Path
    written: int
    skipped: int
    errors: int
    reused: int
    duplicate_ids: list[str] = field(default_factory=list)


def row_key(row: Mapping[str, Any]) -> tuple[str, str]:
    """(label, record key) of a result line (lines of older versions have no key: the id)."""
    key = row["key"] if "key" in row else row["case_id"]
    return str(row["label"]), str(key)


def _keyed(row: dict[str, Any]) -> bool:
    """Whether a decoded line is a result line (it has a label and a record key)."""
    try:
        row_key(row)
    except (KeyError, TypeError):
        return False
    return True


def results_folder(out: str | Path, shard: Shard | None = None) -> RunFolder:
    """An evaluation run's folder: ``run.json`` and ``results.jsonl``.

    A shard's lines go to ``results.shard-K-of-N.jsonl``; lines are keyed by (method label,
    record key) and written by the results schema's serialiser.
    """
    return RunFolder(
        Path(out),
        RESULTS,
        RUN,
        shard or Shard(),
        key=row_key,
        hint="move the file aside or repair that line, then resume",
        encode=result_line,
    )


def _read_done(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Lines already written to the results file ``path``, keyed by (label, record key).

    Nothing finished is ever dropped: a line that is not JSON is tolerated only as the last line
    (a write torn by a crash), which is then cut off; anywhere else it is an error. When two lines
    share a key the first is used and both stay in the file.

    Raises:
        DataError: a damaged line before the last one.
    """
    folder = results_folder(path.parent)
    folder.rows_name = path.name
    done: dict[tuple[str, str], dict[str, Any]] = {}
    for row in folder.read_rows():
        done.setdefault(row_key(row), row)
    return done


def read_run(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every result line of a run folder, each shard's merged in.

    Reads ``results.jsonl`` and each shard's ``results.shard-K-of-N.jsonl``.

    Several files are concatenated (the plain file first, then by shard) and a (label, record
    key) seen twice keeps its first line (one file is taken as it is). The lines are then
    ordered by record position, stably: the order an unsplit run writes each method's lines in,
    so the summary of merged shards (or of Ray workers, which finish groups in any order) sums in
    the same order as the unsplit run's. Files are only read (a torn last line, maybe a shard
    still writing, is left out, not cut off).

    Raises:
        DataError: no results file in ``out_dir``, or a damaged line before a file's last.
    """
    out = Path(out_dir)
    files = results_folder(out).shard_files()
    if not files:
        raise DataError(f"no results file in {out}; run 'backward-lens evaluate' first")
    hint = "repair or remove that line"
    if len(files) == 1:
        rows = read_jsonl(files[0][1], hint=hint)
    else:
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for _, path in files:
            for row in read_jsonl(path, valid=_keyed, hint=hint):
                merged.setdefault(row_key(row), row)
        rows = list(merged.values())
    return sorted(rows, key=record_position)


def canonical_hparams(hparams: Any) -> str:
    """A line's resolved hyper-parameters as canonical JSON text (sorted keys, tuples as lists).

    The same text for a line just computed and for that line read back from its file, so two
    lines' settings compare as strings.
    """
    return json.dumps(json.loads(dumps(hparams, finite=False)), sort_keys=True)


def distinct_hparams(lines: Iterable[Mapping[str, Any]]) -> set[str]:
    """The distinct resolved hyper-parameters of lines (:func:`canonical_hparams`).

    Lines without them (the baseline, a record skipped before editing) are passed over.
    """
    return {canonical_hparams(row["hparams"]) for row in lines if row.get("hparams") is not None}


def hparams_diff(a: set[str], b: set[str]) -> str:
    """The differing hyper-parameters, ``layer 22 and 21`` (or both sets when several)."""
    if len(a) == 1 and len(b) == 1:
        x, y = json.loads(next(iter(a))), json.loads(next(iter(b)))
        if isinstance(x, dict) and isinstance(y, dict):
            keys = [k for k in dict.fromkeys([*x, *y]) if x.get(k) != y.get(k)]
            return ", ".join(f"{k} {x.get(k)!r} and {y.get(k)!r}" for k in keys)
    return f"{sorted(a)} and {sorted(b)}"


def record_position(row: dict[str, Any]) -> int:
    """A line's record position (0 for lines without one), the merge's sort key."""
    value = row.get("index", 0)
    return value if isinstance(value, int) else 0


def _check_run(
    out_dir: Path,
    model_name: str,
    dtype: str,
    data: str | None,
    settings: EvalSettings,
    resume: bool,
    overwrite: bool,
    shard: Shard,
) -> Path:
    """Check the run folder against this run's settings and shard layout; write ``run.json``.

    A shard's own file is handled like an unsplit run's ``results.jsonl`` (``--resume`` or
    ``--overwrite`` when it holds lines); when other shards' files hold lines, ``run.json`` must
    match even without ``--resume``, so shards of one job cannot differ in what they measure.

    A ``run.json`` written before the dtype was recorded is not compared on it (see
    :data:`~backward_lens.runfolder.RECORDED_LATER`); the one written then records it.

    Returns:
        This process's results file.
    """
    folder = results_folder(out_dir, shard)
    meta: dict[str, Any] = {
        "model": model_name,
        "dtype": dtype,
        "data": data,
        "settings": settings.measuring(),
    }
    if shard.sharded:
        meta["shards"] = shard.count
    folder.check_layout()
    others = folder.others_hold_rows()
    if folder.holds_rows() and not resume:
        if not overwrite:
            raise InputError(
                f"{out_dir} already holds results; pass --resume to continue that run or "
                "--overwrite to start again (or choose another --out)"
            )
        folder.discard_rows()
    if resume or others:
        folder.check_config(
            meta,
            folder.read_config(),
            advice="resume with the same settings or use another --out",
        )
    folder.write_config(meta)
    return folder.rows_path


@dataclass
class RunPlan:
    """What a run (or one shard of it) still has to compute, checked against its folder.

    Attributes:
        specs: the methods, in order.
        settings: what is measured and how.
        out: the run folder.
        results_path: this process's results file (``results.jsonl`` or a shard's).
        keys: the stable key of every record (:func:`record_keys`).
        duplicates: ids that occur more than once.
        done: lines already in ``results_path`` (resume), keyed by (label, record key).
        todo: positions of the records of this shard's groups that still have a line to write
            (a group is always computed whole, see :meth:`groups`).
        shard: the shard this process runs.
        reused: lines of this run's methods already written (kept, not recomputed).
        recorded: method label -> the hyper-parameters the folder's lines (every shard's) were
            edited with (:func:`distinct_hparams`); a new line of that label must match them.
    """

    specs: list[MethodSpec]
    settings: EvalSettings
    out: Path
    results_path: Path
    keys: list[str]
    duplicates: list[str]
    done: dict[tuple[str, str], dict[str, Any]]
    todo: list[int]
    shard: Shard
    reused: int = 0
    recorded: dict[str, set[str]] = field(default_factory=dict)

    def groups(self, records: Sequence[FactRecord]) -> list[list[tuple[int, str, FactRecord]]]:
        """The groups still to compute, as (position, key, record) triples.

        Group ``g`` is always positions ``[g*G, (g+1)*G)`` of ``records`` (``G = group_size``,
        :func:`~backward_lens.distributed.shards.batch_ranges`), whole, whatever this process
        is (one process, a shard, a Ray worker, a resumed run): the records sharing batched
        passes, hence every float, are the same everywhere. A group with a line still missing
        is computed whole and only its missing lines are written.
        """
        todo = set(self.todo)
        size = max(1, self.settings.group_size)
        return [
            [(i, self.keys[i], records[i]) for i in group]
            for group in self.shard.batches(len(records), size)
            if todo.intersection(group)
        ]

    def done_in(self, group: Sequence[tuple[int, str, FactRecord]]) -> set[tuple[str, str]]:
        """The (label, key) pairs of ``group`` already written."""
        keys = {key for _, key, _ in group}
        return {k for k in self.done if k[1] in keys}


def plan_run(
    model_name: str,
    n_layers: int,
    records: Sequence[FactRecord],
    methods: Sequence[MethodSpec | str],
    out_dir: str | Path,
    *,
    dtype: str,
    settings: EvalSettings | None = None,
    data: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    shard: Shard | None = None,
) -> RunPlan:
    """Check the methods and the run folder, write ``run.json``, and list what is left to do.

    Needs only the model's name, parameter dtype and depth, so a driver that does not hold the
    model (the Ray backend) plans the same way as :func:`evaluate`.

    Args:
        model_name: the model's name, recorded in ``run.json``.
        n_layers: the model's depth (the methods' layers are checked against it).
        records: the records, in file order.
        methods: the method specs.
        out_dir: the run folder.
        dtype: the model's parameter dtype (``float32``, ``bfloat16``...:
            :attr:`~backward_lens.models.LensModel.dtype_name`), recorded in ``run.json``; a
            resumed run must match it.
        settings: what is measured and how.
        data: the data file's name, recorded in ``run.json``.
        resume: continue the run in ``out_dir``.
        overwrite: discard this process's earlier results in ``out_dir``.
        shard: the part of the job this process runs (None: all of it).

    Raises:
        InputError: a method listed twice or with bad values, an occupied or mismatching folder.
        DataError: a damaged ``run.json`` or results line.
    """
    settings = settings or EvalSettings()
    specs = as_specs(methods)
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise InputError(f"a method is listed twice: {labels}")
    for spec in specs:  # values, layers against this model: before any record runs
        checks.hparams(spec.name, spec.hparams, n_layers)
    out = checks.output_folder(out_dir, "--out")
    keys, duplicates = record_keys(records)
    if duplicates:
        shown = ", ".join(duplicates[:5]) + (" ..." if len(duplicates) > 5 else "")
        log.warning(
            "%d id(s) occur more than once in the records (%s); those records are keyed by "
            "position and content instead",
            len(duplicates),
            shown,
        )
    out.mkdir(parents=True, exist_ok=True)
    shard = shard or Shard()
    results_path = _check_run(out, model_name, dtype, data, settings, resume, overwrite, shard)
    done = _read_done(results_path) if resume else {}
    todo = [
        i
        for group in shard.batches(len(records), settings.group_size)
        if any((label, keys[i]) not in done for i in group for label in labels)
        for i in group
    ]
    reused = sum(1 for k in done if k[0] in labels)
    recorded: dict[str, set[str]] = {}
    for row in results_folder(out).read_all_rows():
        recorded.setdefault(str(row["label"]), set()).update(distinct_hparams([row]))
    return RunPlan(
        specs, settings, out, results_path, keys, duplicates, done, todo, shard, reused, recorded
    )


class ResultWriter:
    """Appends result lines to a run's file, one JSON object a line, and counts them.

    Only one process (the driver) writes a given file. Lines are flushed as they are written
    and fsynced after each group, so a crash loses at most the group in progress.

    Args:
        plan: the run's plan (this shard's results file is appended to).
        on_result: called with each line after it is written.
    """

    def __init__(
        self, plan: RunPlan, on_result: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.plan = plan
        self.on_result = on_result
        self.stats = {"written": 0, "skipped": 0, "errors": 0}
        self._rows = results_folder(plan.out, plan.shard).writer()

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append ``rows`` (each is also added to ``plan.done``).

        Raises:
            InputError: a line edited with other hyper-parameters than the folder's lines of
                the same method label (say, a default changed between a run and its resume);
                nothing of ``rows`` is written, so one label never mixes two settings.
        """
        for row in rows:
            self._check_hparams(row)
        for row in rows:
            self._rows.write(row)
            self.stats["written"] += 1
            self.stats["skipped"] += row["status"] == "skipped"
            self.stats["errors"] += row["status"] == "error"
            self.plan.done[row_key(row)] = row
            if self.on_result is not None:
                self.on_result(row)

    def _check_hparams(self, row: Mapping[str, Any]) -> None:
        if row.get("hparams") is None:
            return
        label, new = str(row["label"]), canonical_hparams(row["hparams"])
        old = self.plan.recorded.setdefault(label, set())
        if old and new not in old:
            values = json.loads(new)
            differ = dict.fromkeys(k for o in old for k in differing_keys(values, json.loads(o)))
            method = f"{row.get('method', label)}:" + ",".join(
                f"{k}={json.dumps(values[k], separators=(',', ':'))}" for k in differ
            )
            raise InputError(
                f"{self.plan.out} holds {label!r} lines edited with other hyper-parameters than "
                f"this run's ({hparams_diff(old, {new})}: a default changed?); resuming would "
                "mix the two in one row of the table. Use another --out, or give the new values "
                f"as their own method (e.g. --method '{method}'), which is a new label"
            )
        old.add(new)

    def sync(self) -> None:
        """Make the lines written so far durable (end of a group)."""
        self._rows.sync()

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._rows.close()

    def result(self) -> RunResult:
        """What this run wrote (warns when some pairs failed with an unexpected error)."""
        if self.stats["errors"]:
            log.warning(
                "%d (record, method) pairs failed with an unexpected error; see 'reason' in %s",
                self.stats["errors"],
                self.plan.results_path,
            )
        return RunResult(
            self.plan.out,
            self.plan.results_path,
            self.stats["written"],
            self.stats["skipped"],
            self.stats["errors"],
            self.plan.reused,
            self.plan.duplicates,
        )
