"""Causal tracing over N records into a resumable run folder (the study's layout).

Output folder:

- ``config.json``   what was run (data, records, seed, model, samples, window, noise), the
  noise's absolute standard deviation, measured once (a resumed run reuses it), and the model's
  facts (the study's ``model_facts``: name, parameter dtype, depth, vocabulary...; a resumed run
  must load the same dtype);
- ``raw.jsonl``     one line per record looked at, appended and flushed when done (the study's
  ``raw.jsonl`` rules: a resumed run skips every key already there, a torn last line is dropped):
  ``{"key", "case_id", "status": "ok", "seconds", "values": RecordTrace}`` or ``{"status":
  "skipped", "reason", "error"}``; ``raw.jsonl.gz`` (a compressed copy, for committing) is read too,
  and a later line of a key supersedes an earlier one (a record given more kinds, below);
- ``summary.json`` / ``summary.md``   the averages by ROME's token segments, the peak layer of
  each kind at the subject's last token, the ROME / MEMIT layers they imply, and how often a
  bootstrap resample of the records picks each (``support``, :func:`layer_support`);
- ``averages.csv``  average indirect effect per kind x segment x layer;
- ``averages.png``  ROME's average-effect heatmaps (Fig. 2 style) and the last subject token's
  curve; ``records/<key>.png`` three heatmaps per record (ROME's Fig. 1 style).

Records are visited in a seeded random order of the whole file; with ``known_only`` (ROME's
``correct_prediction`` filter) a record whose clean top-1 token is not the true object's first
token is skipped (one clean forward pass) and the next one is taken, until ``n`` are traced.

A resumed run may ask for more kinds than the folder holds (e.g. ``mlp`` first, the kind the layer
choice reads, then ``hidden,attn`` for the figures): the folder's kinds become the union, and each
traced record gets the missing kinds, appended as a new line that carries the old kinds' values.
A record's noise is drawn once from the noise seed, whatever the kinds, so the result equals a run
that traced every kind at once.
"""

from __future__ import annotations

import gzip
import json
import random
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from backward_lens import checks
from backward_lens.data import FactRecord, load_records
from backward_lens.errors import DataError, InputError
from backward_lens.io import atomic_write_bytes, atomic_write_text
from backward_lens.models import DEFAULT_MODEL, LensModel, load_model
from backward_lens.runfolder import RowWriter, RunFolder
from backward_lens.study.base import clean_json
from backward_lens.study.runner import model_facts, skip_reason
from backward_lens.study.segments import SEGMENTS, segment_prompt
from backward_lens.tracing.core import KINDS, TraceConfig, embedding_std, trace_prompt

RAW = "raw.jsonl"
CONFIG = "config.json"
SUMMARY = "summary.json"
MEMIT_WIDTH = 5
"""MEMIT edits 5 consecutive layers (its GPT-2 xl 13-17 and GPT-J 3-8 choices are 5-6 layers)."""


@dataclass
class TraceResult:
    """A finished (or partly finished) tracing run.

    Attributes:
        out: the run folder.
        summary: ``summary.json``'s content (peaks, chosen layers, averages).
        n_traced / skipped: records traced / skip reasons with counts.
    """

    out: Path
    summary: dict[str, Any]
    n_traced: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def peak_mlp_layer(self) -> int:
        """ROME's edited layer: the peak of the MLP's restoration at the subject's last token.

        The layer whose (windowed) MLP restoration there recovers the most.
        """
        return int(self.summary["peak"]["mlp"])


def chosen_layers(curve: Sequence[float], width: int = MEMIT_WIDTH) -> dict[str, Any]:
    """ROME's layer and MEMIT's layers implied by the MLP's average indirect effect.

    ``curve`` [L] is the effect at the subject's last token. ROME edits the peak layer (Meng et
    al. 2022, §2-3); MEMIT the ``width`` consecutive layers of highest mean effect, its
    "critical" MLP layers (Meng et al. 2023, §3; GPT-2 xl: 13-17 around ROME's 17). Ties go to
    the lower layer.
    """
    values = [float(v) for v in curve]
    peak = max(range(len(values)), key=values.__getitem__)
    width = min(width, len(values))
    sums = [sum(values[a : a + width]) for a in range(len(values) - width + 1)]
    start = max(range(len(sums)), key=sums.__getitem__)
    return {"rome": peak, "memit": list(range(start, start + width))}


SUPPORT_RESAMPLES = 1000
"""Bootstrap resamples of the traced records behind ``summary.json``'s ``support``."""


def layer_support(
    curves: Sequence[Sequence[float]],
    resamples: int = SUPPORT_RESAMPLES,
    seed: int = 0,
    width: int = MEMIT_WIDTH,
) -> dict[str, Any]:
    """How often a bootstrap resample of the records picks each ROME layer and MEMIT window.

    ``curves`` [R, L] are the records' own MLP indirect effects at the subject's last token. Each
    of ``resamples`` resamples draws R records with replacement (seeded), averages their curves
    and applies :func:`chosen_layers`. Each record's trace is one draw of (fact, noise), so the
    spread covers both the facts chosen and the noise samples: a layer picked in nearly every
    resample is settled, one picked in 40 % of them is not (more records or ``--samples`` would
    sharpen it). A statistic beyond ROME, which reports the averages only.

    Returns:
        ``{"resamples": B, "rome": {layer: fraction}, "memit": {"a-b": fraction}}``, the
        fractions in [0, 1] summing to 1, most frequent first (layer keys as strings, JSON-ready).

    Raises:
        InputError: no curve, or curves of different lengths.
    """
    try:
        values = np.asarray(curves, dtype=float)
    except ValueError:  # ragged
        values = np.zeros(0)
    if values.ndim != 2 or values.shape[0] == 0:
        raise InputError("layer support needs at least one record's curve (all of one length)")
    n, n_layers = values.shape
    width = min(width, n_layers)
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = values[draws].mean(axis=1)  # [B, L]
    # first index of the maximum, as chosen_layers (ties go to the lower layer)
    peaks = means.argmax(axis=1)
    windows = np.stack([means[:, a : a + width].sum(1) for a in range(n_layers - width + 1)], 1)
    starts = windows.argmax(axis=1)

    def fractions(labels: list[str]) -> dict[str, float]:
        counts: dict[str, int] = {}
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return {k: v / resamples for k, v in ranked}

    return {
        "resamples": resamples,
        "rome": fractions([str(int(p)) for p in peaks]),
        "memit": fractions([f"{int(a)}-{int(a) + width - 1}" for a in starts]),
    }


def _true_object(record: FactRecord) -> str | None:
    return record.target_true if record.target_true is not None else record.target


def run_folder(out: Path) -> RunFolder:
    """The tracing run's folder: ``config.json`` and ``raw.jsonl``, rows keyed by ``key``."""
    return RunFolder(
        out, RAW, CONFIG, hint="move the file aside (or pass --fresh to start again) and re-run"
    )


def _read_rows(folder: RunFolder) -> list[dict[str, Any]]:
    """Rows of ``raw.jsonl.gz`` (if any) then ``raw.jsonl``; a key seen twice keeps the last.

    A key's later line is the same record with more kinds traced (:func:`_add_kinds`).
    """
    rows: list[dict[str, Any]] = []
    gz = folder.path / (RAW + ".gz")
    if gz.is_file():
        try:
            with gzip.open(gz, "rt", encoding="utf-8") as fh:
                rows += [json.loads(line) for line in fh if line.strip()]
        except (OSError, ValueError):
            raise DataError(f"{gz} is damaged; move it aside and re-run") from None
    rows += folder.read_rows()
    return list({row["key"]: row for row in rows}.values())


def run_trace(
    data: str | Path | None = None,
    *,
    model: str | LensModel = DEFAULT_MODEL,
    records: Sequence[FactRecord] | None = None,
    n: int = 50,
    seed: int = 0,
    out: str | Path,
    config: TraceConfig | None = None,
    known_only: bool = True,
    record_figures: bool = True,
    fresh: bool = False,
    progress: bool = True,
) -> TraceResult:
    """Trace ``n`` records of ``data`` (or ``records``) and write the run folder ``out``.

    Args:
        data: CounterFact, known_1000.json or JSONL (``load_records``).
        model: a loaded model or a spec (loaded only if a record still needs tracing).
        records: records to use instead of ``data``.
        n: records to trace.
        seed: seed of the order in which records are visited.
        out: the run folder (resumed if it holds the same run; kinds it lacks are added to its
            traced records).
        config: tracing knobs (samples, window, noise factor, kinds).
        known_only: skip records whose clean top-1 token is not the true object (ROME).
        record_figures: draw ``records/<key>.png`` for every traced record.
        fresh: discard earlier rows instead of resuming.
        progress: show a progress bar.

    Raises:
        InputError: no data, bad knobs, a folder holding a different run.
    """
    config = config or TraceConfig()
    config.check()
    checks.integer("--records", n, lo=1)
    out = Path(out)
    checks.output_folder(out, "--out")
    if records is None:
        if data is None:
            raise InputError("give the records with --data FILE (known_1000.json, CounterFact)")
        records = load_records(data)
    records = list(records)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    model_name = model if isinstance(model, str) else model.name
    knobs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    knobs.pop("batch_rows")
    knobs["noise_seed"] = knobs.pop("seed")
    run = {
        "data": str(Path(data).resolve()) if data is not None else "(records given in Python)",
        "records": n,
        "seed": seed,  # the record order's
        "model": model_name,
        "known_only": known_only,
        **knobs,
    }
    folder = run_folder(out)
    previous = None if fresh else folder.read_config()
    rows = [] if fresh else _read_rows(folder)
    stored = previous if rows else None  # the config rows are added to, if any
    advice = "choose another --out, or pass --fresh to overwrite it"
    if stored is not None:  # more records or kinds may be asked for
        folder.check_config(run, stored.get("run", {}), ignore=("records", "kinds"), advice=advice)
        had = stored.get("run", {}).get("kinds", [])
        config = replace(config, kinds=tuple(k for k in KINDS if k in config.kinds or k in had))
        run["kinds"] = list(config.kinds)
    keys = [str(records[i].case_id) for i in order]
    if len(set(keys)) != len(keys):
        keys = [f"{i}:{records[i].case_id}" for i in order]
    done = {r["key"] for r in rows}
    n_ok = sum(r["status"] == "ok" for r in rows)
    by_key = {r["key"]: r for r in rows}
    used = [r for k in keys if (r := by_key.get(k)) and r["status"] == "ok"][:n]
    lacking = [r for r in used if any(k not in r["values"]["scores"] for k in config.kinds)]
    noise_std = (previous or {}).get("noise_std") if rows else None
    if (n_ok < n and any(k not in done for k in keys)) or lacking:
        lm = model if isinstance(model, LensModel) else load_model(model)
        facts = model_facts(lm)
        if stored is not None:  # the loaded model's dtype (stored facts without one: not compared)
            folder.check_config({"dtype": facts["dtype"]}, stored.get("facts") or {}, advice=advice)
        out.mkdir(parents=True, exist_ok=True)
        if fresh:
            folder.discard_rows()
            (out / (RAW + ".gz")).unlink(missing_ok=True)
        if noise_std is None:
            noise_std = embedding_std(lm, [(r.prompt, r.subject) for r in records])
        folder.write_config({"run": run, "noise_std": noise_std, "facts": facts})
        index = dict(zip(keys, order, strict=True))
        with folder.writer() as writer:
            _add_kinds(lm, records, index, lacking, writer, config, noise_std, progress)
            _trace_pending(lm, records, order, keys, done, n - n_ok, writer, config, noise_std,
                           known_only, progress)  # fmt: skip
        rows = _read_rows(folder)
    elif previous is None:
        raise InputError(f"{out} has nothing to trace and no config.json; pass --fresh")
    return finish(out, rows, keys, n, record_figures, redraw={r["key"] for r in lacking})


def _append(writer: RowWriter, row: dict[str, Any]) -> None:
    """Append one line and make it durable at once."""
    writer.write(clean_json(row))
    writer.sync()


def _add_kinds(
    lm: LensModel,
    records: Sequence[FactRecord],
    index: dict[str, int],
    rows: Sequence[dict[str, Any]],
    writer: RowWriter,
    config: TraceConfig,
    noise_std: float,
    progress: bool,
) -> None:
    """Trace the kinds of ``config`` that each traced row lacks; append the merged rows.

    ``index`` maps a row's key to its record in ``records``. The record's noise is drawn from the
    same seed as before, so the new kinds' scores are those an all-kinds run would have had.

    Raises:
        DataError: the prompt now tokenises differently from the stored row (another tokenizer
            or data file under the same name).
    """
    from tqdm.auto import tqdm

    for row in tqdm(rows, desc="adding kinds", unit="record", disable=not progress):
        old = row["values"]
        missing = tuple(k for k in config.kinds if k not in old["scores"])
        record = records[index[row["key"]]]
        t0 = time.perf_counter()
        trace = trace_prompt(
            lm,
            record.prompt,
            record.subject,
            old["target"],
            config.noise_factor * noise_std,
            replace(config, kinds=missing),
        )
        if trace is None or trace.ids != old["ids"]:
            raise DataError(
                f"record {row['key']} now tokenises differently from its row in raw.jsonl; "
                "trace into a new --out"
            )
        scores = {**old["scores"], **trace.to_dict()["scores"]}
        values = {**old, "scores": {k: scores[k] for k in KINDS if k in scores}}
        seconds = round(row["seconds"] + time.perf_counter() - t0, 3)
        _append(writer, {**row, "seconds": seconds, "values": values})


def _trace_pending(
    lm: LensModel,
    records: Sequence[FactRecord],
    order: Sequence[int],
    keys: Sequence[str],
    done: set[str],
    wanted: int,
    writer: RowWriter,
    config: TraceConfig,
    noise_std: float,
    known_only: bool,
    progress: bool,
) -> None:
    """Trace records in visiting order, skipping done keys, until ``wanted`` are traced.

    Each line (traced or skipped) is appended through ``writer`` and made durable at once.
    """
    from tqdm.auto import tqdm

    if wanted <= 0:  # only kinds were added: no empty progress bar
        return
    bar = tqdm(total=wanted, desc="causal tracing", unit="record", disable=not progress)
    traced = 0
    try:
        for i, key in zip(order, keys, strict=True):
            if traced >= wanted:
                break
            if key in done:
                continue
            record = records[i]
            t0 = time.perf_counter()
            try:
                target = _true_object(record)
                if target is None or not target.strip():
                    raise InputError("the target is empty")
                trace = trace_prompt(
                    lm,
                    record.prompt,
                    record.subject,
                    target,
                    config.noise_factor * noise_std,
                    config,
                    require_correct=known_only,
                )
                if trace is None:
                    raise _Unknown
                seg = segment_prompt(
                    lm.tokenizer, record.prompt.rstrip(), record.subject, trace.ids
                )
            except _Unknown:
                _append(
                    writer, _skip_row(key, record, "model does not predict the true object", "")
                )
                continue
            except Exception as exc:  # a bad record is skipped and counted, never fatal
                _append(writer, _skip_row(key, record, skip_reason(exc), str(exc)))
                continue
            values = trace.to_dict()
            values["prompt"] = record.prompt
            values["subject_text"] = record.subject
            values["segments"] = seg.positions
            _append(
                writer,
                {
                    "key": key,
                    "case_id": record.case_id,
                    "status": "ok",
                    "seconds": round(time.perf_counter() - t0, 3),
                    "values": values,
                },
            )
            traced += 1
            bar.update(1)
    finally:
        bar.close()


class _Unknown(Exception):
    """The model does not predict the record's true object (ROME skips those)."""


def _skip_row(key: str, record: FactRecord, reason: str, error: str) -> dict[str, Any]:
    return {
        "key": key,
        "case_id": record.case_id,
        "status": "skipped",
        "reason": reason,
        "error": error.splitlines()[0][:300] if error else reason,
    }


# --------------------------------------------------------------------------- aggregation


def segment_effects(values: dict[str, Any], kind: str) -> dict[str, list[float] | None]:
    """One record's indirect effect per segment and layer.

    The effect (restored - corrupted probability) is averaged over each segment's positions,
    per layer; None for a segment with no position.
    """
    scores = np.asarray(values["scores"][kind], dtype=float) - float(values["low"])
    out: dict[str, list[float] | None] = {}
    for segment in SEGMENTS:
        positions = values["segments"].get(segment, [])
        out[segment] = scores[positions].mean(0).tolist() if positions else None
    return out


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Average indirect effects over records, and the peak layer of each kind.

    Returns kind -> segment -> [L] (None if no record has the segment), the record count per
    segment, and the peak layer of each kind at the subject's last token.
    """
    values = [r["values"] for r in rows]
    kinds = [k for k in KINDS if all(k in v["scores"] for v in values)]
    averages: dict[str, dict[str, list[float] | None]] = {}
    counts: dict[str, int] = {}
    for kind in kinds:
        per = [segment_effects(v, kind) for v in values]
        averages[kind] = {}
        for segment in SEGMENTS:
            got = [curve for p in per if (curve := p[segment]) is not None]
            counts[segment] = len(got)
            averages[kind][segment] = np.mean(got, axis=0).tolist() if got else None
    peak = {
        kind: int(np.argmax(averages[kind]["last_subject"]))  # type: ignore[arg-type]
        for kind in kinds
    }
    return {
        "averages": averages,
        "segment_counts": counts,
        "peak": peak,
        "mean_high": float(np.mean([v["high"] for v in values])),
        "mean_low": float(np.mean([v["low"] for v in values])),
    }


def finish(
    out: Path,
    rows: list[dict[str, Any]],
    keys: Sequence[str],
    n: int,
    record_figures: bool,
    redraw: Collection[str] = (),
) -> TraceResult:
    """Aggregate the traced rows and write the summary and figures.

    The first ``n`` traced rows in visiting order are aggregated. A record's figure is drawn
    when missing, or again when its key is in ``redraw`` (kinds were added).
    """
    from backward_lens.tracing.figures import averages_png, record_png

    config = run_folder(out).read_config() or {}
    by_key = {r["key"]: r for r in rows}
    ordered = [by_key[k] for k in keys if k in by_key]
    ok = [r for r in ordered if r["status"] == "ok"][:n]
    skipped: dict[str, int] = {}
    for r in ordered:
        if r["status"] != "ok":
            skipped[r["reason"]] = skipped.get(r["reason"], 0) + 1
    if not ok:
        raise InputError(f"no record could be traced ({skipped}); see {out / RAW} for the reasons")
    agg = aggregate(ok)
    seconds = [r["seconds"] for r in ok]
    mlp_curves = [
        curve
        for r in ok
        if "mlp" in r["values"]["scores"]
        and (curve := segment_effects(r["values"], "mlp")["last_subject"]) is not None
    ]
    has_mlp = "mlp" in agg["peak"]
    summary = {
        **agg,
        "chosen": chosen_layers(agg["averages"]["mlp"]["last_subject"]) if has_mlp else None,
        "support": layer_support(mlp_curves) if has_mlp and mlp_curves else None,
        "n_traced": len(ok),
        "n_asked": n,
        "skipped": skipped,
        "seconds_per_record": float(np.mean(seconds)),
        "keys": [r["key"] for r in ok],
        **config,
    }
    atomic_write_text(out / SUMMARY, json.dumps(clean_json(summary), indent=1))
    atomic_write_text(out / "summary.md", _summary_md(summary))
    atomic_write_text(out / "averages.csv", _averages_csv(agg))
    model = str(config.get("facts", {}).get("model", "model"))
    atomic_write_bytes(out / "averages.png", averages_png(agg, model, len(ok)))
    if record_figures:
        folder = out / "records"
        folder.mkdir(exist_ok=True)
        for r in ok:
            name = "".join(c if c.isalnum() or c in "-_" else "_" for c in r["key"])
            path = folder / f"{name}.png"
            if not path.exists() or r["key"] in redraw:
                atomic_write_bytes(path, record_png(r["values"], model))
    return TraceResult(out, summary, len(ok), skipped)


def _averages_csv(agg: dict[str, Any]) -> str:
    lines = ["kind,segment,layer,indirect_effect"]
    for kind, segments in agg["averages"].items():
        for segment, curve in segments.items():
            for layer, value in enumerate(curve or []):
                lines.append(f"{kind},{segment},{layer},{value:.6f}")
    return "\n".join(lines) + "\n"


def _summary_md(s: dict[str, Any]) -> str:
    run = s.get("run", {})
    peak = s["peak"]
    lines = [
        f"# Causal tracing: {s.get('facts', {}).get('model', '?')}",
        "",
        f"- data: `{run.get('data')}`, record order seed {run.get('seed')}, noise seed "
        f"{run.get('noise_seed')}, known facts only: "
        f"{run.get('known_only')}",
        f"- traced: {s['n_traced']} of {s['n_asked']} asked; skipped: {s['skipped'] or 'none'}",
        f"- noise: {run.get('noise_factor')} x embedding std {s.get('noise_std', 0):.4g}, "
        f"{run.get('samples')} noise sample(s) per restoration, window {run.get('window')}",
        f"- mean probability of the true object: clean {s['mean_high']:.4f}, corrupted "
        f"{s['mean_low']:.4f}",
        f"- time per record: {s['seconds_per_record']:.1f} s",
        "",
        "Peak layer of the average indirect effect at the subject's last token:",
        "",
    ]
    for kind, layer in peak.items():
        curve = s["averages"][kind]["last_subject"]
        lines.append(f"- {kind}: layer {layer} (effect {curve[layer]:.4f})")
    if s.get("chosen"):
        lines += [
            "",
            f"ROME's layer: {s['chosen']['rome']}; MEMIT's layers: {s['chosen']['memit']} "
            "(ROME: the peak; MEMIT: the 5 consecutive layers of highest mean MLP effect).",
        ]
    if s.get("support"):
        support = s["support"]

        def share(table: dict[str, float]) -> str:
            return ", ".join(f"{k}: {100 * v:.0f} %" for k, v in list(table.items())[:4])

        lines += [
            "",
            f"Chosen in {support['resamples']} bootstrap resamples of the traced records: "
            f"ROME's layer {share(support['rome'])}; MEMIT's layers {share(support['memit'])}.",
        ]
    return "\n".join(lines) + "\n"


def load_trace(out: str | Path) -> TraceResult:
    """Read a finished run folder's summary back (no model needed).

    Raises:
        InputError: no readable ``summary.json`` there.
    """
    out = Path(out)
    try:
        summary = json.loads((out / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{out} is not a finished tracing folder ({exc})") from None
    return TraceResult(out, summary, int(summary["n_traced"]), dict(summary["skipped"]))
