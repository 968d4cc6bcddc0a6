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

A run can be split into shards (``shard=Shard(K, N)``, ``--shard K/N``): shard K takes the
records at positions ``i mod N == K`` and appends to ``results.shard-K-of-N.jsonl`` in the same
folder; ``run.json`` records N, and :func:`read_run` (hence the summary) merges every shard's file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from backward_lens import checks
from backward_lens.data import FactRecord
from backward_lens.distributed.shards import Shard, layout_problem, shard_files
from backward_lens.editing.base import Edit, Editor, RewriteRequest, get_editor
from backward_lens.errors import BackwardLensError, DataError, InputError
from backward_lens.evaluation.metrics import (
    RecordPrompts,
    fluency,
    generate_texts,
    perplexities,
)
from backward_lens.evaluation.rowedits import RowEdits, hookable
from backward_lens.evaluation.scoring import TargetScore, encode_pair, score_targets
from backward_lens.evaluation.texts import PERPLEXITY_TEXTS
from backward_lens.io import atomic_write_text, read_jsonl
from backward_lens.models import LensModel

log = logging.getLogger(__name__)

UNEDITED = "unedited"
RESULTS = "results.jsonl"
RUN = "run.json"
ALIASES = ("ft-early", "ft-late")
"""Resolved to ``ft`` with the model's default layer (``editing.defaults``) when no editor of
that name is registered."""


def _resolve_name(name: str, hparams: dict[str, Any]) -> tuple[str, dict[str, Any], bool]:
    """(editor name, hparams, is_alias): registered names win over the ``ft-*`` aliases."""
    import backward_lens.editing.methods  # noqa: F401  (registers the built-in editors)
    from backward_lens.editing.base import EDITORS

    if name in ALIASES and name not in EDITORS:
        return "ft", hparams, True
    return name, hparams, False


@dataclass(frozen=True)
class MethodSpec:
    """An editor name, its hyper-parameters, and the label its rows carry.

    Written on the command line as ``NAME`` or ``NAME:key=value,key=value`` (values are read as
    JSON when they parse, e.g. ``layer=3``, ``layers=[3,4]``, ``eta=0.5``); the label is the text.
    """

    name: str
    hparams: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        text = text.strip()
        name, _, rest = text.partition(":")
        if not name:
            raise InputError(f"empty method name in {text!r}; write NAME or NAME:key=value,...")
        hparams: dict[str, Any] = {}
        if rest:
            for item in _split_items(rest):
                key, eq, value = item.partition("=")
                if not eq or not key.strip():
                    raise InputError(f"cannot read {item!r} in {text!r}; write key=value")
                try:
                    hparams[key.strip()] = json.loads(value)
                except json.JSONDecodeError:
                    hparams[key.strip()] = value
        return cls(name, hparams, text)

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name)


def _split_items(text: str) -> list[str]:
    """Split on commas outside brackets (``layers=[3,4],lr=0.1``)."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    return [*items, cur] if cur else items


@dataclass(frozen=True)
class EvalSettings:
    """What is measured and how; a resumed run must use the same measuring settings.

    Attributes:
        batch_size: sequences per forward pass (1 = one prompt at a time, the plain path).
        group_size: records whose edited prompts share batches.
        fluency_records: compute fluency on the first this-many records (None: all; 0: none).
        ppl_records: compute perplexity on the first this-many records (None: all; 0: none).
        generation_length: tokens per fluency sample, prompt included (ROME: 100).
        top_k: top-k sampling for fluency (ROME: 5).
        ppl_max_tokens: perplexity texts are cut to this many tokens (paper: 256).
        seed: base seed of the fluency sampling.
    """

    batch_size: int = 32
    group_size: int = 16
    fluency_records: int | None = None
    ppl_records: int | None = None
    generation_length: int = 100
    top_k: int = 5
    ppl_max_tokens: int = 256
    seed: int = 0

    def measuring(self) -> dict[str, Any]:
        """Settings that change the numbers (batching does not, up to float rounding)."""
        d = asdict(self)
        d.pop("batch_size")
        d.pop("group_size")
        return d


def _wants(limit: int | None, index: int) -> bool:
    return limit is None or index < limit


@dataclass
class _Prepared:
    index: int
    record: FactRecord
    prompts: RecordPrompts
    request: RewriteRequest


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


class _Method:
    def __init__(self, lm: LensModel, spec: MethodSpec) -> None:
        self.spec = spec
        self.editor: Editor | None = None
        if spec.name == UNEDITED:
            if spec.hparams:
                raise InputError("the unedited baseline takes no hyper-parameters")
            self.editor_name = UNEDITED
            return
        name, hparams, alias = _resolve_name(spec.name, dict(spec.hparams))
        if alias:
            from backward_lens.editing.defaults import editor_defaults

            hparams = {**editor_defaults(lm, spec.name), **hparams}
        self.editor_name = name
        self.editor = get_editor(name, **hparams)


def check_methods(methods: Sequence[MethodSpec | str]) -> list[MethodSpec]:
    """Parse method specs and build their editors once, so a typo fails before any work."""
    specs = [m if isinstance(m, MethodSpec) else MethodSpec.parse(m) for m in methods]
    for spec in specs:
        if spec.name == UNEDITED:
            continue
        name, hparams, _ = _resolve_name(spec.name, dict(spec.hparams))
        get_editor(name, **hparams)
    return specs


def _prepare_one(
    index: int, record: FactRecord, lm: LensModel
) -> _Prepared | tuple[int, FactRecord, str]:
    """Validate and encode one record; a bad one becomes ``(index, record, reason)``."""
    try:
        prompts = RecordPrompts.from_record(record)
        for prompt, target in prompts.pairs():
            encode_pair(lm, prompt, target)
        request = RewriteRequest(
            record.prompt, record.subject, prompts.target_new, prompts.target_true
        )
        return _Prepared(index, record, prompts, request)
    except BackwardLensError as exc:
        return (index, record, str(exc))


def prepare(
    records: Sequence[FactRecord], lm: LensModel, shard: Shard | None = None
) -> list[_Prepared | tuple[int, FactRecord, str]]:
    """Validate and encode each record (of ``shard`` only, when given); a bad one becomes
    ``(index, record, reason)``. ``index`` is the record's position in ``records``."""
    return [
        _prepare_one(i, record, lm)
        for i, record in enumerate(records)
        if shard is None or shard.owns(i)
    ]


MISSING_ID = -1
"""The id the data readers give a record whose file has none."""


def record_keys(records: Sequence[FactRecord]) -> tuple[list[str], list[str]]:
    """A stable key per record, and the ids that occur more than once.

    The key is ``str(case_id)`` when the record has an id that no other record shares; else
    ``"#<position>:<8 hex digits of the SHA-256 of its content>"``, so records without ids, or
    with duplicate ids, still get distinct keys that stay the same when the run is resumed on the
    same file (positions count from the start of the file; ``--records N`` keeps a prefix).

    Returns:
        (keys in record order, duplicate ids as strings, sorted).
    """
    counts = Counter(str(r.case_id) for r in records)
    keys = []
    for i, r in enumerate(records):
        cid = str(r.case_id)
        if counts[cid] == 1 and r.case_id != MISSING_ID and not cid.startswith("#"):
            keys.append(cid)
        else:
            content = {k: v for k, v in r.to_dict().items() if k != "layout"}
            digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
            keys.append(f"#{i}:{digest[:8]}")
    duplicates = sorted(c for c, n in counts.items() if n > 1 and c != str(MISSING_ID))
    return keys, duplicates


def _row_key(row: dict[str, Any]) -> tuple[str, str]:
    """(label, record key) of a result line (lines of older versions have no key: the id)."""
    key = row["key"] if "key" in row else row["case_id"]
    return str(row["label"]), str(key)


def _keyed(row: dict[str, Any]) -> bool:
    """Whether a decoded line is a result line (it has a label and a record key)."""
    try:
        _row_key(row)
    except (KeyError, TypeError):
        return False
    return True


def _read_done(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Lines already written, keyed by (label, record key).

    Nothing finished is ever dropped: a line that is not JSON is tolerated only as the last line
    (a write torn by a crash), which is then cut off; anywhere else it is an error. When two lines
    share a key the first is used and both stay in the file.

    Raises:
        DataError: a damaged line before the last one.
    """
    done: dict[tuple[str, str], dict[str, Any]] = {}
    rows = read_jsonl(
        path, valid=_keyed, repair=True, hint="move the file aside or repair that line, then resume"
    )
    for row in rows:
        done.setdefault(_row_key(row), row)
    return done


def read_run(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every result line of a run folder: ``results.jsonl`` and each shard's
    ``results.shard-K-of-N.jsonl``, merged.

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
    files = shard_files(out, RESULTS)
    if not files:
        raise DataError(f"no results file in {out}; run 'backward-lens evaluate' first")
    hint = "repair or remove that line"
    if len(files) == 1:
        rows = read_jsonl(files[0][1], hint=hint)
    else:
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for _, path in files:
            for row in read_jsonl(path, valid=_keyed, hint=hint):
                merged.setdefault(_row_key(row), row)
        rows = list(merged.values())
    return sorted(rows, key=_position)


def _position(row: dict[str, Any]) -> int:
    """A line's record position (0 for lines without one), the merge's sort key."""
    value = row.get("index", 0)
    return value if isinstance(value, int) else 0


def _check_run(
    out_dir: Path,
    model_name: str,
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

    Returns:
        This process's results file.
    """
    run_path, results = out_dir / RUN, out_dir / shard.file_name(RESULTS)
    meta: dict[str, Any] = {"model": model_name, "data": data, "settings": settings.measuring()}
    if shard.sharded:
        meta["shards"] = shard.count
    files = shard_files(out_dir, RESULTS)
    problem = layout_problem(files, shard, out_dir)
    if problem:
        raise InputError(problem)
    others = [p for _, p in files if p != results and p.stat().st_size]
    if results.exists() and results.stat().st_size and not resume:
        if not overwrite:
            raise InputError(
                f"{out_dir} already holds results; pass --resume to continue that run or "
                "--overwrite to start again (or choose another --out)"
            )
        results.unlink()
    if (resume or others) and run_path.is_file():
        try:
            old = json.loads(run_path.read_text(encoding="utf-8"))
            assert isinstance(old, dict)
        except (ValueError, AssertionError):
            raise DataError(
                f"{run_path} is damaged (not a JSON object); move it aside to resume this run"
            ) from None
        diff = [k for k in meta if old.get(k) != meta[k]]
        if diff:
            raise InputError(
                f"{out_dir} was produced with different {', '.join(diff)} "
                f"({old.get(diff[0])!r}); resume with the same settings or use another --out"
            )
    atomic_write_text(run_path, json.dumps(meta, indent=2) + "\n")
    return results


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
        todo: positions of this shard's records with a method still to compute.
        shard: the shard this process runs.
        reused: lines of this run's methods already written (kept, not recomputed).
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

    def groups(self, records: Sequence[FactRecord]) -> list[list[tuple[int, str, FactRecord]]]:
        """The records to compute, ``group_size`` at a time, as (position, key, record)."""
        size = max(1, self.settings.group_size)
        todo = [(i, self.keys[i], records[i]) for i in self.todo]
        return [todo[start : start + size] for start in range(0, len(todo), size)]

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
    settings: EvalSettings | None = None,
    data: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    shard: Shard | None = None,
) -> RunPlan:
    """Check the methods and the run folder, write ``run.json``, and list what is left to do.

    Needs only the model's name and depth, so a driver that does not hold the model (the Ray
    backend) plans the same way as :func:`evaluate`.

    Raises:
        InputError: a method listed twice or with bad values, an occupied or mismatching folder.
        DataError: a damaged ``run.json`` or results line.
    """
    settings = settings or EvalSettings()
    specs = [m if isinstance(m, MethodSpec) else MethodSpec.parse(m) for m in methods]
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
    results_path = _check_run(out, model_name, data, settings, resume, overwrite, shard)
    done = _read_done(results_path) if resume else {}
    todo = [
        i
        for i in range(len(records))
        if shard.owns(i) and any((label, keys[i]) not in done for label in labels)
    ]
    reused = sum(1 for k in done if k[0] in labels)
    return RunPlan(specs, settings, out, results_path, keys, duplicates, done, todo, shard, reused)


class EvalWorker:
    """Computes the result lines of groups of records with one model: the in-process path of
    :func:`evaluate`, and what each Ray actor holds (it loads the model once).

    Args:
        lm: the model (left unchanged).
        specs: the methods, in order (editors are built here: unknown names fail at once).
        settings: what is measured and how.
    """

    def __init__(self, lm: LensModel, specs: Sequence[MethodSpec], settings: EvalSettings) -> None:
        self.lm = lm
        self.methods = [_Method(lm, s) for s in specs]
        self.runner = _Runner(lm, settings)

    def run_iter(
        self, group: Sequence[tuple[int, str, FactRecord]], done: Collection[tuple[str, str]]
    ) -> Iterator[list[dict[str, Any]]]:
        """For each method in turn, the lines of ``group`` ((position, key, record) triples)
        not in ``done``, with their ``key``, in record order."""
        key_of = {i: key for i, key, _ in group}
        items = [_prepare_one(i, record, self.lm) for i, _, record in group]
        for method in self.methods:
            label = method.spec.label
            pending = [it for it in items if (label, key_of[_index(it)]) not in done]
            rows = self.runner.run_group(method, pending)
            yield [{"key": key_of[row["index"]], **row} for row in rows]

    def run(
        self, group: Sequence[tuple[int, str, FactRecord]], done: Collection[tuple[str, str]]
    ) -> list[dict[str, Any]]:
        """Every line of ``group`` not in ``done`` (see :meth:`run_iter`), methods in order."""
        return [row for rows in self.run_iter(group, done) for row in rows]


class ResultWriter:
    """Appends result lines to a run's file, one JSON object a line, and counts them.

    Only one process (the driver) writes a given file. Lines are flushed as they are written
    and fsynced after each group, so a crash loses at most the group in progress.
    """

    def __init__(
        self, plan: RunPlan, on_result: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.plan = plan
        self.on_result = on_result
        self.stats = {"written": 0, "skipped": 0, "errors": 0}
        self._fh = plan.results_path.open("a", encoding="utf-8")

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append ``rows`` (each is also added to ``plan.done``)."""
        for row in rows:
            self._fh.write(json.dumps(row, default=_jsonable) + "\n")
            self._fh.flush()
            self.stats["written"] += 1
            self.stats["skipped"] += row["status"] == "skipped"
            self.stats["errors"] += row["status"] == "error"
            self.plan.done[_row_key(row)] = row
            if self.on_result is not None:
                self.on_result(row)

    def sync(self) -> None:
        """Make the lines written so far durable (end of a group)."""
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Close the file (idempotent)."""
        if not self._fh.closed:
            self._fh.close()

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
        shard: run only this shard's records (position ``i`` with ``i mod N == K``) and write
            ``results.shard-K-of-N.jsonl``; :func:`read_run` and the summary merge the shards
            (see :mod:`backward_lens.distributed.shards`). None: every record.

    Raises:
        InputError: a method listed twice, unknown or with bad values; an occupied folder.
    """
    settings = settings or EvalSettings()
    specs = [m if isinstance(m, MethodSpec) else MethodSpec.parse(m) for m in methods]
    for spec in specs:  # values and layers first, then unknown names: before any folder work
        checks.hparams(spec.name, spec.hparams, lm.n_layers)
    worker = EvalWorker(lm, specs, settings)
    plan = plan_run(
        lm.name,
        lm.n_layers,
        records,
        specs,
        out_dir,
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


def _index(item: _Prepared | tuple[int, FactRecord, str]) -> int:
    return item.index if isinstance(item, _Prepared) else item[0]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


class _Runner:
    """Edits and scores one group of records for one method."""

    def __init__(self, lm: LensModel, settings: EvalSettings) -> None:
        self.lm = lm
        self.s = settings
        self._baseline_ppl: float | None = None

    def _row(
        self, method: _Method, index: int, record: FactRecord, status: str, **extra: Any
    ) -> dict[str, Any]:
        return {
            "label": method.spec.label,
            "method": method.editor_name,
            "case_id": record.case_id,
            "index": index,
            "status": status,
            **extra,
        }

    def run_group(
        self, method: _Method, group: Sequence[_Prepared | tuple[int, FactRecord, str]]
    ) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        ready: list[tuple[_Prepared, Edit | None, float | None, dict[str, Any]]] = []
        together = self._edit_together(method, [it for it in group if isinstance(it, _Prepared)])
        for it in group:
            if not isinstance(it, _Prepared):
                rows.append(self._row(method, it[0], it[1], "skipped", reason=it[2]))
                continue
            if together is not None:
                own, seconds_each = together[it.index]
                info = {"hparams": own.hparams, "edit_info": own.info}
                ready.append((it, own, seconds_each, {**info, "edit_batch": len(together)}))
                continue
            try:
                edit, seconds = self._edit(method, it.request)
            except BackwardLensError as exc:
                rows.append(self._row(method, it.index, it.record, "skipped", reason=str(exc)))
                continue
            except Exception as exc:  # a bug in an editor must not stop a long run
                log.exception("editor %s failed on record %s", method.spec.label, it.record.case_id)
                rows.append(
                    self._row(
                        method, it.index, it.record, "error", reason=f"{type(exc).__name__}: {exc}"
                    )
                )
                continue
            info = {"hparams": edit.hparams, "edit_info": edit.info} if edit is not None else {}
            ready.append((it, edit, seconds, info))
        if ready:
            batched = self.s.batch_size > 1 and all(
                hookable(self.lm.model, e) for _, e, _, _ in ready
            )
            metrics = self._measure_batched(ready) if batched else self._measure_each(ready)
            for (it, _, seconds, info), m in zip(ready, metrics, strict=True):
                rows.append(
                    self._row(
                        method, it.index, it.record, "ok", metrics=m, time_edit=seconds, **info
                    )
                )
        rows.sort(key=lambda r: r["index"])
        return rows

    def _edit_together(
        self, method: _Method, items: Sequence[_Prepared]
    ) -> dict[int, tuple[Edit, float]] | None:
        """Single edits of a whole group from one call of the editor's ``each`` (shift: the
        probes share one padded forward pass); the time per edit is the call's time / n.
        None when the editor cannot, batching is off, or the call fails."""
        each = getattr(method.editor, "each", None)
        if each is None or self.s.batch_size <= 1 or len(items) < 2:
            return None
        t0 = time.perf_counter()
        try:
            edits = each(self.lm, [it.request for it in items])
        except Exception:  # the per-record path then reports which record failed, and why
            return None
        seconds = (time.perf_counter() - t0) / len(items)
        return {it.index: (e, seconds) for it, e in zip(items, edits, strict=True)}

    def _edit(self, method: _Method, request: RewriteRequest) -> tuple[Edit | None, float | None]:
        if method.editor is None:
            return None, None
        t0 = time.perf_counter()
        edit = method.editor(self.lm, [request])
        return edit, time.perf_counter() - t0

    # -- measuring -------------------------------------------------------------------------

    def _seeds(self, it: _Prepared) -> list[int]:
        base = zlib.crc32(f"{self.s.seed}:{it.record.case_id}".encode())
        return [(base + j) % (2**31) for j in range(len(it.prompts.generation))]

    def _measure_batched(
        self, ready: Sequence[tuple[_Prepared, Edit | None, float | None, Any]]
    ) -> list[dict[str, Any]]:
        lm, s = self.lm, self.s
        edits = [e for _, e, _, _ in ready]
        hooks = RowEdits(lm.model, edits)
        items = [it for it, _, _, _ in ready]
        pairs, owner = [], []
        for k, it in enumerate(items):
            p = it.prompts.pairs()
            pairs += p
            owner += [k] * len(p)
        with hooks.installed():
            scores = score_targets(
                lm,
                pairs,
                batch_size=s.batch_size,
                on_batch=lambda idx: hooks.set_rows([owner[i] for i in idx]),
            )
            ppl = self._ppl_batched(items, edits, hooks)
            flu = self._fluency_batched(items, hooks)
        out, i = [], 0
        for k, it in enumerate(items):
            n = len(it.prompts.pairs())
            m = it.prompts.metrics(scores[i : i + n])
            i += n
            m["fluency"] = flu.get(k)
            m["perplexity"] = ppl.get(k)
            out.append(m)
        return out

    def _ppl_batched(
        self, items: Sequence[_Prepared], edits: Sequence[Edit | None], hooks: RowEdits
    ) -> dict[int, float]:
        want = [k for k, it in enumerate(items) if _wants(self.s.ppl_records, it.index)]
        result: dict[int, float] = {}
        if not want:
            return result
        if all(edits[k] is None for k in want):  # unedited: one computation for the whole run
            value = self._baseline()
            return {k: value for k in want}
        texts = list(PERPLEXITY_TEXTS)
        all_texts, owner = [], []
        for k in want:
            all_texts += texts
            owner += [k] * len(texts)
        values = perplexities(
            self.lm,
            all_texts,
            max_tokens=self.s.ppl_max_tokens,
            batch_size=self.s.batch_size,
            on_batch=lambda idx: hooks.set_rows([owner[i] for i in idx]),
        )
        for j, k in enumerate(want):
            chunk = values[j * len(texts) : (j + 1) * len(texts)]
            result[k] = sum(chunk) / len(chunk)
        return result

    def _baseline(self) -> float:
        if self._baseline_ppl is None:
            values = perplexities(
                self.lm,
                PERPLEXITY_TEXTS,
                max_tokens=self.s.ppl_max_tokens,
                batch_size=self.s.batch_size,
            )
            self._baseline_ppl = sum(values) / len(values)
        return self._baseline_ppl

    def _fluency_batched(self, items: Sequence[_Prepared], hooks: RowEdits) -> dict[int, float]:
        want = [k for k, it in enumerate(items) if _wants(self.s.fluency_records, it.index)]
        if not want:
            return {}
        prompts: list[str] = []
        seeds: list[int] = []
        owner: list[int] = []
        for k in want:
            prompts += items[k].prompts.generation
            seeds += self._seeds(items[k])
            owner += [k] * len(items[k].prompts.generation)
        texts = generate_texts(
            self.lm,
            prompts,
            seeds,
            max_length=self.s.generation_length,
            top_k=self.s.top_k,
            batch_size=self.s.batch_size,
            on_batch=lambda idx: hooks.set_rows([owner[i] for i in idx]),
        )
        result: dict[int, float] = {}
        for k in want:
            mine = [t for t, o in zip(texts, owner, strict=True) if o == k]
            value = fluency(mine)
            if value is not None:
                result[k] = value
        return result

    def _measure_each(
        self, ready: Sequence[tuple[_Prepared, Edit | None, float | None, Any]]
    ) -> list[dict[str, Any]]:
        """The plain path: apply each edit, score its record alone, revert."""
        lm, s = self.lm, self.s
        out = []
        for it, edit, _, _ in ready:
            if edit is not None:
                edit.apply(lm.model)
            try:
                scores: list[TargetScore] = score_targets(
                    lm, it.prompts.pairs(), batch_size=s.batch_size
                )
                m = it.prompts.metrics(scores)
                m["perplexity"] = None
                if _wants(s.ppl_records, it.index):
                    if edit is None:
                        m["perplexity"] = self._baseline()
                    else:
                        values = perplexities(
                            lm,
                            PERPLEXITY_TEXTS,
                            max_tokens=s.ppl_max_tokens,
                            batch_size=s.batch_size,
                        )
                        m["perplexity"] = sum(values) / len(values)
                m["fluency"] = None
                if _wants(s.fluency_records, it.index):
                    texts = generate_texts(
                        lm,
                        it.prompts.generation,
                        self._seeds(it),
                        max_length=s.generation_length,
                        top_k=s.top_k,
                        batch_size=s.batch_size,
                    )
                    m["fluency"] = fluency(texts)
            finally:
                if edit is not None:
                    edit.revert(lm.model)
            out.append(m)
        return out
