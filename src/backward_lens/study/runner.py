"""Running an experiment over a dataset: sample, batch, stream, resume, write the output folder.

Output folder (everything but ``raw.jsonl`` is written atomically):

- ``config.json``  what was run (experiment, data, n, seed, model, options) and model facts
  (:func:`model_facts`, with the parameter dtype: a resumed run must load the same);
- ``raw.jsonl``    one line per sampled record, appended and flushed as soon as it is done:
  ``{"key", "case_id", "status": "ok", "seconds", "values"}`` or ``{"status": "skipped",
  "reason", "error"}``; a resumed run skips every key already there, and a torn last line (a
  crash mid-write) is dropped and recomputed;
- ``aggregate.json`` / ``aggregate.csv``  the aggregated numbers;
- ``figure.png`` / ``figure.html``  the figure (the page is self-contained);
- ``summary.md``   the finding in numbers, the paper's finding, skips and time per record.

Re-running on a finished folder only re-aggregates and redraws (the model is not even loaded).

Records are captured in batches that depend only on sample positions: batch ``b`` is sampled
records ``[b*B, (b+1)*B)`` (``B = batch_size``), always captured whole (a resumed batch recomputes
its done records and appends only the missing ones), so a resumed, sharded or Ray run gives the
same lines, bit for bit, as one uninterrupted process (``seconds`` aside). Split over processes
(``shard=Shard(K, N)``, ``--shard K/N``), shard K computes the batches ``b mod N == K`` into
``raw.shard-K-of-N.jsonl``; the aggregate, figure and summary are built from all shards' files
found, in sample order, so they equal the unsplit run's.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from backward_lens import checks
from backward_lens.capture import capture_requests
from backward_lens.data import FactRecord, load_records
from backward_lens.distributed.shards import Shard
from backward_lens.errors import BackwardLensError, InputError
from backward_lens.io import atomic_write_bytes, atomic_write_text
from backward_lens.models import DEFAULT_MODEL, LensModel, load_model
from backward_lens.runfolder import RowWriter, RunFolder
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
        """The aggregate as a pandas DataFrame (one row per curve point or bin)."""
        return self.aggregate.to_dataframe()

    @property
    def files(self) -> dict[str, Path]:
        """The output files by name (``config.json``, ``raw.jsonl``, ``aggregate.json``...)."""
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
    """The experiment called ``name`` in the table of experiments.

    Raises:
        InputError: no experiment of that name.
    """
    from backward_lens.study.experiments import EXPERIMENTS

    if name not in EXPERIMENTS:
        raise InputError(
            f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)} (or compare)"
        )
    return EXPERIMENTS[name]


def skip_reason(exc: BaseException) -> str:
    """A short, countable reason for a skipped record (the study's and tracing's summaries)."""
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


def run_folder(out: str | Path, shard: Shard | None = None) -> RunFolder:
    """A study's run folder: ``config.json`` and ``raw.jsonl``, rows keyed by ``key``.

    A shard's rows go to ``raw.shard-K-of-N.jsonl``.
    """
    return RunFolder(
        Path(out),
        RAW,
        CONFIG,
        shard or Shard(),
        hint="move the file aside (or pass --fresh to start again) and re-run",
    )


def read_raw_rows(out: str | Path) -> list[dict[str, Any]]:
    """Every raw line of a study folder, each shard's merged in.

    Reads ``raw.jsonl`` and each shard's ``raw.shard-K-of-N.jsonl`` (plain file first, then by
    shard; a key seen twice keeps its first line). Files are only read: a torn last line (maybe
    a shard still writing) is left out, not cut off.

    Raises:
        DataError: a damaged line before a file's last.
    """
    return run_folder(out).read_all_rows()


def check_options(options: StudyOptions, n_layers: int | None = None) -> None:
    """Check the experiment knobs' values, for the CLI and the API alike.

    ``layer`` is checked against the model once it is known (``n_layers``).

    Raises:
        InputError: a negative ``max_neurons``, a non-finite or non-positive ``lr``, a
            ``top`` below 1, a ``layer`` the model does not have.
    """
    checks.integer("--max-neurons", options.max_neurons, lo=0)
    checks.number("--lr", options.lr, lo=0.0, hi=checks.MAX_LR)
    checks.integer("--top", options.top, lo=1)
    if options.layer is not None:
        checks.layer("--layer", options.layer, n_layers)


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
    """What ``config.json`` records about the model (name, dtype, type, depth, vocabulary, width).

    The Ray backend's workers report the same facts to the driver.
    """
    cfg = lm.model.config
    return {
        "model": lm.name,
        "dtype": lm.dtype_name,
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
        batch_size: records per capture batch: batch ``b`` is sampled records
            ``[b*B, (b+1)*B)``, always captured whole, wherever and whenever it is computed.
        fresh: discard an existing ``raw.jsonl`` instead of resuming.
        progress: show a progress bar.
        shard: compute only this shard's batches (batch ``b`` with ``b mod N == K``)
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
    folder = run_folder(out, shard)
    folder.check_layout()
    others = folder.others_hold_rows()
    previous = None if fresh and not others else folder.read_config()
    # the stored config rows are added to (None: no row is added to another run's)
    stored = previous if others or (folder.holds_rows() and not fresh) else None
    advice = "choose another --out, or pass --fresh to overwrite it"
    if others:
        advice += " (and remove the other shards' raw files)"
    if stored is not None:
        folder.check_config(config, stored.get("run", {}), advice=advice)
    rows = [] if fresh else folder.read_rows()
    done = {r["key"] for r in rows}
    keys = [str(r.case_id) for r in records]
    if len(set(keys)) != len(keys):  # ids are not unique: fall back to the sample position
        keys = [f"{i}:{r.case_id}" for i, r in enumerate(records)]
    pending = [
        [(i, records[i], keys[i]) for i in batch]
        for batch in shard.batches(len(records), batch_size)
        if any(keys[i] not in done for i in batch)
    ]
    facts = (previous or {}).get("facts")
    if pending:
        lm = None
        if executor is not None:
            facts = executor.facts()
        else:
            lm = model if isinstance(model, LensModel) else load_model(model)
            facts = model_facts(lm)
        check_options(options, facts["n_layers"])  # before anything is written or computed
        if stored is not None:  # the loaded model's dtype (stored facts without one: not compared)
            folder.check_config({"dtype": facts["dtype"]}, stored.get("facts") or {}, advice=advice)
        if fresh:
            folder.discard_rows()
        folder.write_config({"run": config, "facts": facts})
        with folder.writer() as writer:
            write = _durable(writer)
            if executor is not None:
                executor.compute(exp, pending, done, options, write, progress)
            else:
                assert lm is not None
                _compute(exp, lm, pending, done, write, options, progress)
    elif facts is None:
        raise InputError(f"{out} has no record to compute and no model facts; pass --fresh")
    folder.read_rows()  # repair this shard's own torn tail, if any, before merging
    rows = folder.read_all_rows()
    return finish(exp, out, rows, keys, {"run": config, "facts": facts})


Pending = list[tuple[int, FactRecord, str]]
"""One batch of sampled records as (sample position, record, key) triples."""


def compute_rows(
    exp: Experiment,
    lm: LensModel,
    batches: Sequence[Pending],
    options: StudyOptions,
    done: Collection[str] = (),
) -> Iterator[dict[str, Any]]:
    """The raw line of each record of ``batches`` whose key is not in ``done``, batch by batch.

    Each batch is captured whole (its records that can be prepared, in one capture), done
    records included, so the floats of a record do not depend on which other records of its
    batch were still to compute; done records are not measured again. A record that cannot be
    prepared or measured yields a ``skipped`` line with its reason; a batch whose capture fails
    is captured again one record at a time to find the culprit. Used in-process by
    :func:`run_study` and by each Ray actor.

    Args:
        exp: the experiment.
        lm: the model.
        batches: batches of (sample position, record, key), see :func:`run_study`.
        options: the experiment's knobs.
        done: keys already written: captured with their batch-mates, not measured or yielded.

    Yields:
        Raw lines (``{"key", "case_id", "status", ...}``), never one of ``done``.
    """
    for batch in batches:
        for row in _batch_rows(exp, lm, batch, options, done):
            if row["key"] not in done:
                yield row


def _batch_rows(
    exp: Experiment,
    lm: LensModel,
    batch: Pending,
    options: StudyOptions,
    done: Collection[str],
) -> Iterator[dict[str, Any]]:
    """The raw line of every record of one batch not in ``done``.

    The batch's prepared records are captured together, done ones included (their captures
    share the padded pass); only records not done are measured.
    """
    items: list[Item] = []
    for index, record, key in batch:
        try:
            item = _prepare(lm.tokenizer, index, record, lm.context_length)
            item.key = key
            items.append(item)
        except Exception as exc:  # a bad record is skipped and counted, never fatal
            yield _skip(key, record, exc)
    if not items:
        return
    t0 = time.perf_counter()
    try:
        captures = capture_requests(lm, [it.request for it in items], matrices=exp.matrices)
    except Exception:
        captures = []  # isolate the failing record: capture one by one below
    share = (time.perf_counter() - t0) / len(items)
    for k, item in enumerate(items):
        if item.key in done:
            continue
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
    pending: list[Pending],
    done: Collection[str],
    write: Callable[[dict[str, Any]], None],
    options: StudyOptions,
    progress: bool,
) -> None:
    """Compute the pending batches in this process, ``write`` each new line."""
    from tqdm.auto import tqdm

    total = sum(len(batch) for batch in pending)
    bar = tqdm(total=total, desc=exp.name, unit="record", disable=not progress)
    try:
        for batch in pending:
            for row in compute_rows(exp, lm, [batch], options, done):
                write(row)
            bar.update(len(batch))
    finally:
        bar.close()


def _durable(writer: RowWriter) -> Callable[[dict[str, Any]], None]:
    """Write one raw line (JSON-cleaned) and make it durable at once (a record can be slow)."""

    def write(row: dict[str, Any]) -> None:
        writer.write(clean_json(row))
        writer.sync()

    return write


class StudyExecutor(Protocol):
    """Computes a study's pending records somewhere else (the Ray backend implements it)."""

    def facts(self) -> dict[str, Any]:
        """The model's facts (:func:`model_facts`: name, type, ``n_layers``, vocabulary...)."""
        ...

    def compute(
        self,
        exp: Experiment,
        pending: list[Pending],
        done: Collection[str],
        options: StudyOptions,
        write: Callable[[dict[str, Any]], None],
        progress: bool,
    ) -> None:
        """Compute every pending batch, whole (see :func:`compute_rows`).

        Calls ``write`` in the driver with each raw line whose key is not in ``done``.
        """
        ...


def _skip(key: str, record: FactRecord, exc: BaseException) -> dict[str, Any]:
    return {
        "key": key,
        "case_id": record.case_id,
        "status": "skipped",
        "reason": skip_reason(exc),
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
