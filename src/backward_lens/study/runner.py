"""Running an experiment over a dataset: sample, batch, stream, resume, write the output folder.

Output folder (everything but ``raw.jsonl`` is written atomically):

- ``config.json``  what was run (experiment, data, n, seed, model, options) and model facts;
- ``raw.jsonl``    one line per sampled record, appended and flushed as soon as it is done:
  ``{"key", "case_id", "status": "ok", "seconds", "values"}`` or ``{"status": "skipped",
  "reason", "error"}``; a resumed run skips every key already there, and a torn last line (a
  crash mid-write) is dropped and recomputed;
- ``aggregate.json`` / ``aggregate.csv``  the aggregated numbers;
- ``figure.png`` / ``figure.html``  the figure (the page is self-contained);
- ``summary.md``   the finding in numbers, the paper's finding, skips and time per record.

Re-running on a finished folder only re-aggregates and redraws (the model is not even loaded).

Split over processes (``shard=Shard(K, N)``, ``--shard K/N``), shard K computes the sampled
records at positions ``i mod N == K`` into ``raw.shard-K-of-N.jsonl``; the aggregate, figure and
summary are built from all shards' files found, in sample order, so they equal the unsplit run's.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from backward_lens import checks
from backward_lens.capture import capture_requests
from backward_lens.data import FactRecord, load_records
from backward_lens.distributed.shards import Shard, layout_problem, shard_files
from backward_lens.errors import BackwardLensError, DataError, InputError
from backward_lens.io import atomic_write_bytes, atomic_write_text, read_jsonl
from backward_lens.models import DEFAULT_MODEL, LensModel, load_model
from backward_lens.study.base import Aggregate, Experiment, Item, StudyOptions, clean_json
from backward_lens.study.figures import html_page, png_bytes
from backward_lens.study.segments import segment_prompt
from backward_lens.tokens import encode_request

RAW = "raw.jsonl"
CONFIG = "config.json"


@dataclass
class StudyResult:
    """What a finished run produced (also readable back with :func:`load_study`).

    Attributes:
        experiment: the experiment's name.
        out: the output folder.
        aggregate: the aggregated numbers.
        summary: the markdown summary.
        config: run configuration and model facts (``config.json``).
        n_ok / skipped: records measured / skip reasons (reason -> count).
        seconds_per_record: mean compute time of the records measured in this folder.
    """

    experiment: str
    out: Path
    aggregate: Aggregate
    summary: str
    config: dict[str, Any]
    n_ok: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds_per_record: float | None = None

    def to_dataframe(self) -> Any:
        return self.aggregate.to_dataframe()

    @property
    def files(self) -> dict[str, Path]:
        names = [
            "config.json",
            RAW,
            "aggregate.json",
            "aggregate.csv",
            "figure.png",
            "figure.html",
            "summary.md",
        ]
        return {n: self.out / n for n in names}


def get_experiment(name: str) -> Experiment:
    from backward_lens.study.experiments import EXPERIMENTS

    if name not in EXPERIMENTS:
        raise InputError(
            f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)} (or compare)"
        )
    return EXPERIMENTS[name]


def _reason(exc: BaseException) -> str:
    """Short, countable reason for a skipped record."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "not found in the prompt" in text or "no token covers the subject" in text:
        return "subject not in the prompt"
    if "subject is empty" in text:
        return "empty subject"
    if "target is empty" in text or "no target" in text:
        return "empty target"
    if "encodes to no token" in text:
        return "target encodes to no token"
    if "unknown token" in text:
        return "target has unknown characters"
    if "context holds" in text:
        return "prompt too long"
    if isinstance(exc, BackwardLensError):
        return type(exc).__name__
    return f"error: {type(exc).__name__}"


def _has_key(row: dict[str, Any]) -> bool:
    return "key" in row


def _read_raw(path: Path) -> list[dict[str, Any]]:
    """Lines of ``raw.jsonl`` (this process's file). Only a torn last line (a crash mid-write) is
    cut off; a damaged line before it is an error, so no finished line is ever deleted.

    Raises:
        DataError: a line before the last is not a JSON object with a ``key``.
    """
    return read_jsonl(
        path,
        valid=_has_key,
        repair=True,
        hint="move the file aside (or pass --fresh to start again) and re-run",
    )


def read_raw_rows(out: str | Path) -> list[dict[str, Any]]:
    """Every raw line of a study folder: ``raw.jsonl`` and each shard's
    ``raw.shard-K-of-N.jsonl``, concatenated (plain file first, then by shard). Files are only
    read: a torn last line (maybe a shard still writing) is left out, not cut off.

    Raises:
        DataError: a damaged line before a file's last.
    """
    hint = "move the file aside (or pass --fresh to start again) and re-run"
    rows: list[dict[str, Any]] = []
    for _, path in shard_files(out, RAW):
        rows += read_jsonl(path, valid=_has_key, hint=hint)
    return rows


def check_options(options: StudyOptions, n_layers: int | None = None) -> None:
    """The experiment knobs' values, shared by the CLI and the API (``layer`` against the model
    once it is known).

    Raises:
        InputError: a negative ``max_neurons``, a non-finite or non-positive ``lr``, a
            ``top`` below 1, a ``layer`` the model does not have.
    """
    checks.integer("--max-neurons", options.max_neurons, lo=0)
    checks.number("--lr", options.lr, lo=0.0, hi=checks.MAX_LR)
    checks.integer("--top", options.top, lo=1)
    if options.layer is not None:
        checks.layer("--layer", options.layer, n_layers)


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(clean_json(row), separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _prepare(lm_tokenizer: Any, index: int, record: FactRecord, context: int | None) -> Item:
    target = record.target
    if target is None or not target.strip():
        raise InputError("the target is empty")
    request = encode_request(
        lm_tokenizer, record.prompt, target, multi_token="first", max_length=context
    )
    seg = segment_prompt(lm_tokenizer, record.prompt, record.subject, request.prompt_ids)
    return Item(index, str(record.case_id), record, request, seg)


def model_facts(lm: LensModel) -> dict[str, Any]:
    """What ``config.json`` records about the model (name, type, depth, vocabulary, width)."""
    cfg = lm.model.config
    return {
        "model": lm.name,
        "model_type": getattr(cfg, "model_type", "?"),
        "n_layers": lm.n_layers,
        "vocab_size": lm.vocab_size,
        "hidden_size": getattr(cfg, "hidden_size", None),
        "bos": lm.tokenizer.bos_token,
    }


def run_study(
    experiment: str | Experiment,
    data: str | Path | None = None,
    *,
    model: str | LensModel = DEFAULT_MODEL,
    records: Sequence[FactRecord] | None = None,
    n: int = 100,
    seed: int = 0,
    out: str | Path | None = None,
    options: StudyOptions | None = None,
    batch_size: int = 16,
    fresh: bool = False,
    progress: bool = True,
    shard: Shard | None = None,
    executor: StudyExecutor | None = None,
) -> StudyResult:
    """Run ``experiment`` on ``n`` records sampled from ``data`` with ``seed``.

    Args:
        experiment: a name from :data:`~backward_lens.study.experiments.EXPERIMENTS` or an
            :class:`~backward_lens.study.base.Experiment`.
        data: CounterFact (EasyEdit or ROME layout), known_1000, or JSONL of prompt/subject/target.
        model: a loaded :class:`LensModel` or a spec for :func:`load_model` (loaded only if some
            record still needs computing).
        records: records to use instead of ``data`` (already sampled).
        n: number of records to sample (all if the file has fewer).
        seed: sampling seed.
        out: output folder (default ``study/<model>/<experiment>``).
        options: experiment knobs.
        batch_size: records per capture batch (the capture is exact in batches).
        fresh: discard an existing ``raw.jsonl`` instead of resuming.
        progress: show a progress bar.
        shard: compute only this shard's records (sample position ``i`` with ``i mod N == K``)
            into ``raw.shard-K-of-N.jsonl``; the aggregate and figure are built from every
            shard's file found in ``out`` (the summary says how many records are still missing).
            ``fresh`` then discards only this shard's file. None: every record.
        executor: compute the pending records there instead of in this process (e.g.
            :class:`~backward_lens.distributed.ray_backend.RayStudy`); ``model`` is then only
            named (never loaded here) and this process alone writes the raw lines.
    """
    shard = shard or Shard()
    exp = get_experiment(experiment) if isinstance(experiment, str) else experiment
    options = options or StudyOptions()
    check_options(options, None if isinstance(model, str) else model.n_layers)
    checks.integer("batch_size", batch_size, lo=1)
    model_name = model if isinstance(model, str) else model.name
    out = Path(out) if out is not None else Path("study") / model_name / exp.name
    checks.output_folder(out, "--out")
    if records is None:
        if data is None:
            raise InputError("give the records' file with --data (CounterFact, known_1000, JSONL)")
        records = load_records(data, sample=n, seed=seed)
    records = list(records)
    if exp.max_records is not None:
        records = records[: exp.max_records]
    config = {
        "experiment": exp.name,
        "data": str(Path(data).resolve()) if data is not None else "(records given in Python)",
        "n": n,
        "seed": seed,
        "model": model_name,
        "options": options.to_dict(),
        "sampled": len(records),
    }
    if shard.sharded:
        config["shards"] = shard.count
    raw_path = out / shard.file_name(RAW)
    files = shard_files(out, RAW)
    problem = layout_problem(files, shard, out)
    if problem:
        raise InputError(problem)
    others = [p for _, p in files if p != raw_path and p.stat().st_size]
    previous = None if fresh and not others else _read_config(out / CONFIG)
    if previous is not None:
        differ = [k for k in config if previous.get("run", {}).get(k) != config[k]]
        if differ and (others or (raw_path.exists() and not fresh)):
            raise InputError(
                f"{out} holds a different run (it differs in {', '.join(differ)}); choose another "
                "--out, or pass --fresh to overwrite it"
                + (" (and remove the other shards' raw files)" if others else "")
            )
    rows = [] if fresh else _read_raw(raw_path)
    done = {r["key"] for r in rows}
    keys = [str(r.case_id) for r in records]
    if len(set(keys)) != len(keys):  # ids are not unique: fall back to the sample position
        keys = [f"{i}:{r.case_id}" for i, r in enumerate(records)]
    pairs = enumerate(zip(records, keys, strict=True))
    pending = [(i, r, k) for i, (r, k) in pairs if shard.owns(i) and k not in done]
    facts = (previous or {}).get("facts")
    if pending and executor is not None:
        facts = executor.facts()
        check_options(options, facts["n_layers"])  # before anything is written or computed
        out.mkdir(parents=True, exist_ok=True)
        if fresh:
            raw_path.unlink(missing_ok=True)
        atomic_write_text(out / CONFIG, json.dumps({"run": config, "facts": facts}, indent=2))
        executor.compute(
            exp, pending, options, batch_size, lambda row: _append(raw_path, row), progress
        )
    elif pending:
        lm = model if isinstance(model, LensModel) else load_model(model)
        check_options(options, lm.n_layers)  # before anything is written or computed
        out.mkdir(parents=True, exist_ok=True)
        if fresh:
            raw_path.unlink(missing_ok=True)
        facts = model_facts(lm)
        atomic_write_text(out / CONFIG, json.dumps({"run": config, "facts": facts}, indent=2))
        _compute(exp, lm, pending, raw_path, options, batch_size, progress)
    elif facts is None:
        raise InputError(f"{out} has no record to compute and no model facts; pass --fresh")
    _read_raw(raw_path)  # repair this shard's own torn tail, if any, before merging
    rows = read_raw_rows(out)
    return finish(exp, out, rows, keys, {"run": config, "facts": facts})


def _read_config(path: Path) -> dict[str, Any] | None:
    """``config.json`` of an earlier run, or None; a damaged one is a one-line error."""
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{path} is damaged; pass --fresh to start again or move it") from None
    return config


def compute_rows(
    exp: Experiment,
    lm: LensModel,
    pending: Sequence[tuple[int, FactRecord, str]],
    options: StudyOptions,
    batch_size: int,
) -> Iterator[dict[str, Any]]:
    """The raw line of each pending (position, record, key), as soon as it is computed.

    A record that cannot be prepared or measured yields a ``skipped`` line with its reason; a
    batch whose capture fails is captured again one record at a time to find the culprit. Used
    in-process by :func:`run_study` and by each Ray actor.
    """
    items: list[Item] = []
    for index, record, key in pending:
        try:
            item = _prepare(lm.tokenizer, index, record, lm.context_length)
            item.key = key
            items.append(item)
        except Exception as exc:  # a bad record is skipped and counted, never fatal
            yield _skip(key, record, exc)
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        t0 = time.perf_counter()
        try:
            captures = capture_requests(lm, [it.request for it in batch], matrices=exp.matrices)
        except Exception:
            captures = []  # isolate the failing record: capture one by one below
        share = (time.perf_counter() - t0) / len(batch)
        for k, item in enumerate(batch):
            t1 = time.perf_counter()
            try:
                cap = (
                    captures[k]
                    if captures
                    else capture_requests(lm, [item.request], matrices=exp.matrices)[0]
                )
                values = exp.measure(lm, item, cap, options)
            except Exception as exc:  # counted with its reason in the summary
                yield _skip(item.key, item.record, exc)
                continue
            seconds = share + time.perf_counter() - t1
            yield {
                "key": item.key,
                "case_id": item.record.case_id,
                "status": "ok",
                "seconds": round(seconds, 4),
                "values": values,
            }


def _compute(
    exp: Experiment,
    lm: LensModel,
    pending: list[tuple[int, FactRecord, str]],
    raw_path: Path,
    options: StudyOptions,
    batch_size: int,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(pending), desc=exp.name, unit="record", disable=not progress)
    try:
        for row in compute_rows(exp, lm, pending, options, batch_size):
            _append(raw_path, row)
            bar.update(1)
    finally:
        bar.close()


class StudyExecutor(Protocol):
    """Computes a study's pending records somewhere else (the Ray backend implements it)."""

    def facts(self) -> dict[str, Any]:
        """The model's facts (:func:`model_facts`: name, type, ``n_layers``, vocabulary...)."""
        ...

    def compute(
        self,
        exp: Experiment,
        pending: list[tuple[int, FactRecord, str]],
        options: StudyOptions,
        batch_size: int,
        write: Callable[[dict[str, Any]], None],
        progress: bool,
    ) -> None:
        """Compute every pending record; call ``write`` with each raw line (in the driver)."""
        ...


def _skip(key: str, record: FactRecord, exc: BaseException) -> dict[str, Any]:
    return {
        "key": key,
        "case_id": record.case_id,
        "status": "skipped",
        "reason": _reason(exc),
        "error": str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
    }


def finish(
    exp: Experiment,
    out: Path,
    rows: list[dict[str, Any]],
    keys: Sequence[str],
    config: dict[str, Any],
) -> StudyResult:
    """Aggregate the raw rows of ``keys`` (sample order) and write every output file."""
    by_key = {r["key"]: r for r in rows}
    ordered = [by_key[k] for k in keys if k in by_key]
    ok = [r for r in ordered if r["status"] == "ok"]
    skipped = Counter(r["reason"] for r in ordered if r["status"] != "ok")
    meta = dict(config["facts"], **config["run"])
    if not ok:
        raise InputError(
            f"no record could be measured ({dict(skipped)}); see {out / RAW} for the reasons"
        )
    agg = exp.aggregate([r["values"] for r in ok], meta)
    seconds = [r["seconds"] for r in ok if r.get("seconds") is not None]
    per_record = sum(seconds) / len(seconds) if seconds else None
    summary = _summary(exp, agg, meta, len(ordered), len(ok), skipped, per_record, ordered)
    fig = exp.figure(agg, meta)
    png = png_bytes(fig)
    atomic_write_text(out / "aggregate.json", json.dumps(agg.to_dict(), indent=1))
    atomic_write_text(out / "aggregate.csv", agg.to_dataframe().to_csv(index=False))
    atomic_write_bytes(out / "figure.png", png)
    atomic_write_text(out / "figure.html", html_page(exp.title, png, summary, agg.table))
    atomic_write_text(out / "summary.md", summary)
    atomic_write_text(
        out / "aggregate.meta.json",
        json.dumps(
            clean_json(
                {
                    "experiment": exp.name,
                    **meta,
                    "n_ok": len(ok),
                    "skipped": dict(skipped),
                    "seconds_per_record": per_record,
                }
            ),
            indent=1,
        ),
    )
    return StudyResult(exp.name, out, agg, summary, config, len(ok), dict(skipped), per_record)


def _summary(
    exp: Experiment,
    agg: Aggregate,
    meta: dict[str, Any],
    sampled: int,
    n_ok: int,
    skipped: Counter[str],
    per_record: float | None,
    rows: list[dict[str, Any]],
) -> str:
    lines = [
        f"# {exp.title}: {meta['model']}",
        "",
        f"**Finding.** {exp.finding(agg, meta)}",
        "",
        f"**Paper.** {exp.paper}",
        "",
        f"- data: `{meta['data']}`, {meta['sampled']} records sampled with seed {meta['seed']}"
        f" (asked for {meta['n']})",
        f"- measured: {n_ok} of {sampled} records",
    ]
    if skipped:
        examples: dict[str, str] = {}
        for r in rows:
            if r["status"] != "ok":
                examples.setdefault(r["reason"], f"case {r['case_id']}: {r['error']}")
        for reason, count in skipped.most_common():
            lines.append(f"- skipped ({reason}): {count}, e.g. {examples[reason]}")
    else:
        lines.append("- skipped: none")
    if sampled < meta["sampled"]:
        lines.append(f"- not yet computed: {meta['sampled'] - sampled} (run again to resume)")
    if per_record is not None:
        lines.append(
            f"- time per record: {per_record:.3f} s (capture share + measurement, "
            f"{meta['model']}, {meta['n_layers']} layers, vocabulary {meta['vocab_size']})"
        )
    options = {k: v for k, v in meta.get("options", {}).items() if v is not None}
    lines.append(f"- options: {options}")
    return "\n".join(lines) + "\n"


def load_study(out: str | Path) -> StudyResult:
    """Read a finished output folder back (no model needed)."""
    out = Path(out)
    try:
        meta = json.loads((out / "aggregate.meta.json").read_text())
        agg = Aggregate.from_dict(json.loads((out / "aggregate.json").read_text()))
        config = json.loads((out / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{out} is not a finished study folder ({exc})") from exc
    summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    return StudyResult(
        meta["experiment"],
        out,
        agg,
        summary,
        config,
        meta.get("n_ok", 0),
        meta.get("skipped", {}),
        meta.get("seconds_per_record"),
    )
