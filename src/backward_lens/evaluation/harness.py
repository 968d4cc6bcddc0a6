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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from backward_lens import checks
from backward_lens.data import FactRecord
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
from backward_lens.io import atomic_write_text
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


def prepare(
    records: Sequence[FactRecord], lm: LensModel
) -> list[_Prepared | tuple[int, FactRecord, str]]:
    """Validate and encode each record; a bad one becomes ``(index, record, reason)``."""
    out: list[_Prepared | tuple[int, FactRecord, str]] = []
    for i, record in enumerate(records):
        try:
            prompts = RecordPrompts.from_record(record)
            for prompt, target in prompts.pairs():
                encode_pair(lm, prompt, target)
            request = RewriteRequest(
                record.prompt, record.subject, prompts.target_new, prompts.target_true
            )
            out.append(_Prepared(i, record, prompts, request))
        except BackwardLensError as exc:
            out.append((i, record, str(exc)))
    return out


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


def _read_done(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Lines already written, keyed by (label, record key).

    Nothing finished is ever dropped: a line that is not JSON is tolerated only as the last line
    (a write torn by a crash), which is then cut off; anywhere else it is an error. When two lines
    share a key the first is used and both stay in the file.

    Raises:
        DataError: a damaged line before the last one.
    """
    done: dict[tuple[str, str], dict[str, Any]] = {}
    if not path.is_file():
        return done
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline (torn or empty)
    keep = len(data) - len(tail)
    for number, raw in enumerate(complete, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            key = _row_key(row)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            if number == len(complete) and not tail.strip():
                keep -= len(raw) + 1  # a torn last line that happens to end in a newline
                break
            raise DataError(
                f"{path} line {number} is damaged (not a result line); move the file aside or "
                "repair that line, then resume"
            ) from None
        done.setdefault(key, row)
    if keep != len(data):
        with path.open("r+b") as fh:  # cut the torn tail only; every complete line stays
            fh.truncate(keep)
            os.fsync(fh.fileno())
    return done


def _check_run(
    out_dir: Path,
    lm: LensModel,
    data: str | None,
    settings: EvalSettings,
    resume: bool,
    overwrite: bool,
) -> None:
    run_path, results = out_dir / RUN, out_dir / RESULTS
    meta = {"model": lm.name, "data": data, "settings": settings.measuring()}
    if results.exists() and results.stat().st_size and not resume:
        if not overwrite:
            raise InputError(
                f"{out_dir} already holds results; pass --resume to continue that run or "
                "--overwrite to start again (or choose another --out)"
            )
        results.unlink()
    if resume and run_path.is_file():
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
    """
    settings = settings or EvalSettings()
    specs = [m if isinstance(m, MethodSpec) else MethodSpec.parse(m) for m in methods]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise InputError(f"a method is listed twice: {labels}")
    for spec in specs:  # values, layers against this model: before any record runs
        checks.hparams(spec.name, spec.hparams, lm.n_layers)
    prepared_methods = [_Method(lm, s) for s in specs]  # unknown names fail here, before work
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
    _check_run(out, lm, data, settings, resume, overwrite)
    results_path = out / RESULTS
    done = _read_done(results_path) if resume else {}
    reused = sum(1 for k in done if k[0] in labels)

    items = prepare(records, lm)
    key_of = {it_index: key for it_index, key in enumerate(keys)}
    todo = [it for it in items if any((s.label, key_of[_index(it)]) not in done for s in specs)]
    runner = _Runner(lm, settings)
    stats = {"written": 0, "skipped": 0, "errors": 0}
    bar = tqdm(total=len(todo), unit="rec", disable=not progress, desc="evaluate", smoothing=0.1)
    with results_path.open("a", encoding="utf-8") as fh:

        def write(row: dict[str, Any]) -> None:
            fh.write(json.dumps(row, default=_jsonable) + "\n")
            fh.flush()
            stats["written"] += 1
            stats["skipped"] += row["status"] == "skipped"
            stats["errors"] += row["status"] == "error"
            if on_result is not None:
                on_result(row)

        for start in range(0, len(todo), max(1, settings.group_size)):
            group = todo[start : start + max(1, settings.group_size)]
            for method in prepared_methods:
                label = method.spec.label
                pending = [it for it in group if (label, key_of[_index(it)]) not in done]
                rows = runner.run_group(method, pending)
                for row in rows:
                    row = {"key": key_of[row["index"]], **row}
                    write(row)
                    done[_row_key(row)] = row
            os.fsync(fh.fileno())
            bar.update(len(group))
            bar.set_postfix(written=stats["written"], skipped=stats["skipped"])
    bar.close()
    if stats["errors"]:
        log.warning(
            "%d (record, method) pairs failed with an unexpected error; see 'reason' in %s",
            stats["errors"],
            results_path,
        )
    return RunResult(
        out,
        results_path,
        stats["written"],
        stats["skipped"],
        stats["errors"],
        reused,
        duplicates,
    )


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
