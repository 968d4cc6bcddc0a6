"""Choosing forward pass shift's layer and eta on a held-out split.

For every candidate (layer, eta) the shift of every record is applied at once, one record per
batch row: FF2_l <- FF2_l + eta * x_n^T e_t changes FF2's output at any position with input x by
eta * (x . x_n) * e_t, so a forward hook adds exactly that with each row's own x_n and e_t. One
probe pass records x_n at every candidate layer; each grid point then costs one batched scoring
pass. As in the official code, a record whose prompt already predicts the target gets no shift.

The choice: among points whose efficacy accuracy reaches ``min_efficacy``, the one with the best
neighbourhood score (ROME's P(true) > P(new) on neighbourhood prompts), then paraphrase accuracy,
then the smaller eta. Neighbourhood *accuracy* is near zero for small models even before any edit
(the true object is rarely their argmax), so it cannot rank the points; it is reported as well.

Fluency is protected: every grid point also samples continuations of the generation prompts of
the first ``FluencySettings.records`` records (ROME's n-gram entropy) and scores the first
``FluencySettings.ppl_texts`` perplexity texts with each of those records' shift, and
:func:`choose` never picks a point whose mean entropy is more than 5 % below the unedited one or
whose mean perplexity is more than 10 % above it (:func:`fluency_rejections`). Gemma-3-270M's
first default (layer 15, eta 0.2, chosen without this rule) brought the entropy of its
continuations from 616 to 86.

:func:`editor_sweep` applies the same rule to one hyper-parameter of any registered editor
(MEMIT's covariance weight ``mom2_update_weight``, ROME's layer...), through the evaluation
harness: one method per value, on the same records, with the same fluency measurements.

Split over processes (``--shard K/N``), shard K computes the grid points ``p mod N == K`` (each
point is independent of the others) and writes ``sweep.shard-K-of-N.json``; :func:`merge_parts`
joins the parts into the same table an unsplit sweep gives.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from backward_lens import checks
from backward_lens.batching import Hooks
from backward_lens.data import FactRecord
from backward_lens.distributed.shards import Shard, layout_problem, shard_files
from backward_lens.errors import BackwardLensError, DataError, InputError
from backward_lens.evaluation.harness import UNEDITED, EvalSettings, MethodSpec, evaluate
from backward_lens.evaluation.metrics import RecordPrompts, fluency, generate_texts, perplexities
from backward_lens.evaluation.scoring import encode_pair, score_sequences
from backward_lens.evaluation.summary import read_results
from backward_lens.evaluation.texts import PERPLEXITY_TEXTS
from backward_lens.io import atomic_write_text
from backward_lens.models import LensModel

MAX_ENTROPY_DROP = 0.05
"""A chosen point's mean n-gram entropy may be at most this fraction below the unedited one."""
MAX_PERPLEXITY_RISE = 0.10
"""A chosen point's mean perplexity may be at most this fraction above the unedited one."""


@dataclass(frozen=True)
class FluencySettings:
    """How a sweep measures fluency at each grid point (the harness's measurements, fewer texts).

    Attributes:
        records: the first this-many usable records of the split give the fluency samples (their
            generation prompts; the EasyEdit layout has one, the rewrite prompt) and the
            perplexity (0: measure nothing, and the rule cannot protect fluency).
        ppl_texts: how many of ``PERPLEXITY_TEXTS`` each of those records' edit is scored on.
        generation_length: tokens per sample, prompt included (ROME: 100).
        top_k: top-k sampling (ROME: 5).
        ppl_max_tokens: perplexity texts are cut to this many tokens.
        seed: base seed of the sampling (each record's seeds as in the harness).
    """

    # The metadata makes the command-line options (backward_lens.commands.options).
    records: int = field(
        default=8,
        metadata={
            "help": "records whose fluency samples and perplexity each point measures; 0: none",
            "flag": "--fluency-records",
            "metavar": "K",
        },
    )
    ppl_texts: int = field(
        default=8, metadata={"help": "perplexity texts scored per fluency record", "metavar": "K"}
    )
    generation_length: int = 100
    top_k: int = 5
    ppl_max_tokens: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse negative counts and a non-positive length or top-k.

        Raises:
            InputError: a bad value.
        """
        if self.records < 0 or not 0 <= self.ppl_texts <= len(PERPLEXITY_TEXTS):
            raise InputError(
                f"fluency records must be >= 0 and perplexity texts in 0..{len(PERPLEXITY_TEXTS)}"
                f" (got {self.records}, {self.ppl_texts})"
            )
        if self.generation_length < 2 or self.top_k < 1 or self.ppl_max_tokens < 2:
            raise InputError("generation length and perplexity tokens must be >= 2, top-k >= 1")


def fluency_seeds(seed: int, case_id: int | str, count: int) -> list[int]:
    """Sampling seeds of a record's ``count`` generation prompts (as the evaluation harness)."""
    base = zlib.crc32(f"{seed}:{case_id}".encode())
    return [(base + j) % (2**31) for j in range(count)]


@dataclass(frozen=True)
class SweepPoint:
    """Mean metrics of one (layer, eta) over the sweep's records (eta 0 = unedited).

    ``fluency`` (n-gram entropy, bits, x100 in the tables) and ``perplexity`` are means over the
    first :attr:`FluencySettings.records` records (NaN when not measured).
    """

    layer: int
    eta: float
    efficacy_acc: float
    paraphrase_acc: float
    neighborhood_acc: float
    neighborhood_score: float
    records: int
    fluency: float = math.nan
    perplexity: float = math.nan


@dataclass
class _Case:
    case_id: int | str
    prompts: RecordPrompts
    target_id: int
    seqs: list[list[int]]  # rewrite (new), paraphrases (new), neighbours (true), neighbours (new)
    n_scored: list[int]


class _ShiftRows:
    """Forward hook on one FF2 adding eta * (x . x_n[r]) * e_t[r] for each row's record r."""

    def __init__(self, x_n: Tensor, e_t: Tensor, active: Tensor) -> None:
        self.x_n, self.e_t, self.active = x_n, e_t, active  # [R, d_ff], [R, d], [R] bool
        self.eta = 0.0
        self.rows = torch.zeros(0, dtype=torch.long)

    def hook(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        """FF2's output [B, T, d] plus each row's shift (unchanged while ``eta`` is 0)."""
        if self.eta == 0.0:
            return output
        x = args[0]
        batch = len(self.rows)
        xs = x.reshape(batch, -1, x.shape[-1])
        coef = torch.einsum("btm,bm->bt", xs, self.x_n[self.rows].to(xs.dtype))
        scale = (self.eta * self.active[self.rows].to(xs.dtype))[:, None]
        extra = (coef * scale)[..., None] * self.e_t[self.rows].to(xs.dtype)[:, None, :]
        return output + extra.reshape(output.shape)


def _prepare(lm: LensModel, records: Sequence[FactRecord]) -> list[_Case]:
    cases = []
    for record in records:
        try:
            prompts = RecordPrompts.from_record(record)
            new = [
                encode_pair(lm, p, prompts.target_new) for p in prompts.rewrite + prompts.paraphrase
            ]
            true = [
                encode_pair(lm, p, t)
                for p, t in zip(prompts.neighborhood, prompts.neighborhood_true, strict=True)
            ]
            nb_new = [encode_pair(lm, p, prompts.target_new) for p in prompts.neighborhood]
        except BackwardLensError:
            continue
        encoded = new + true + nb_new
        cases.append(
            _Case(
                record.case_id,
                prompts,
                new[0].target_ids[0],
                [list(r.prompt_ids + r.target_ids) for r in encoded],
                [len(r.target_ids) for r in encoded],
            )
        )
    if not cases:
        raise InputError("no usable record for the sweep (each needs prompt, subject, targets)")
    return cases


def _offset(order: list[int], start: int) -> Callable[[list[int]], None]:
    def record(idx: list[int]) -> None:
        order.extend(start + i for i in idx)

    return record


@torch.no_grad()
def _probe(
    lm: LensModel, cases: Sequence[_Case], layers: Sequence[int], batch_size: int
) -> tuple[dict[int, Tensor], Tensor]:
    """Probe every record once.

    Returns:
        x_n at each layer's FF2 input [R, d_ff], and whether each prompt already predicts its
        target [R] bool.
    """
    modules = {layer: lm.arch.resolve(layer, "ff2").module for layer in layers}
    store: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    current: dict[str, int] = {"batch": 0}

    def keep(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            x = args[0]
            store[layer].append(x.reshape(current["batch"], -1, x.shape[-1])[:, -1].float().cpu())

        return hook

    predicted = []
    order: list[int] = []
    with Hooks() as hooks:
        for layer in layers:
            hooks.forward(modules[layer], keep(layer))
        prompt_seqs = [[*c.seqs[0][: len(c.seqs[0]) - c.n_scored[0]], c.target_id] for c in cases]
        for start in range(0, len(cases), batch_size):
            chunk = prompt_seqs[start : start + batch_size]
            current["batch"] = len(chunk)
            scored = score_sequences(
                lm,
                chunk,
                [1] * len(chunk),
                batch_size=len(chunk),
                on_batch=_offset(order, start),
            )
            predicted += [bool(ok[0]) for _, ok in scored]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return {layer: torch.cat(v)[inverse] for layer, v in store.items()}, torch.tensor(predicted)


def shift_sweep(
    lm: LensModel,
    records: Sequence[FactRecord],
    layers: Sequence[int],
    etas: Sequence[float],
    *,
    batch_size: int = 64,
    progress: bool = True,
    shard: Shard | None = None,
    fluency_settings: FluencySettings | None = None,
) -> pd.DataFrame:
    """Metrics of forward pass shift for every (layer, eta), plus the unedited row (eta 0).

    Args:
        lm: the model (left unchanged: the shift is a forward hook).
        records: the held-out split.
        layers: candidate layers (negative counts from the end).
        etas: candidate etas, each in (0, MAX_ETA].
        batch_size: sequences per forward pass.
        progress: show a progress bar.
        shard: compute only the grid points ``p`` with ``p mod N == K`` (grid order: the unedited
            point, then layer-major, eta-minor). Every point is computed independently from the
            same probe of all records, so the parts concatenated equal the unsplit table exactly.
        fluency_settings: how each point's n-gram entropy and perplexity are measured (default
            :class:`FluencySettings`; ``records=0`` leaves them NaN).

    Returns:
        One row per grid point (:class:`SweepPoint` fields), indexed by grid position.

    Raises:
        InputError: a layer the model lacks, no or bad etas, no usable record.
    """
    shard = shard or Shard()
    sweep = ShiftSweep(
        lm, records, layers, etas, batch_size=batch_size, fluency_settings=fluency_settings
    )
    mine = sweep.points(shard)
    desc = f"sweep {shard}" if shard.sharded else "sweep"
    points = [sweep.point(p) for p in tqdm(mine, desc=desc, unit="pt", disable=not progress)]
    return sweep_table(points, mine)


def sweep_table(points: Sequence[SweepPoint], index: Sequence[int]) -> pd.DataFrame:
    """One row per point (:class:`SweepPoint` fields), indexed by grid position ``index``."""
    columns = [f.name for f in fields(SweepPoint)]
    return pd.DataFrame([asdict(p) for p in points], index=list(index), columns=columns)


class ShiftSweep:
    """The sweep's records prepared and probed once; then any grid point is computed on its own.

    Used whole by :func:`shift_sweep`, and by each Ray worker of ``sweep --workers`` (each
    probes the records itself and computes the grid points it is handed), so a point's numbers
    do not depend on which process computes it.

    Args:
        lm: the model (left unchanged: the shift is a forward hook).
        records: the held-out split.
        layers: candidate layers (negative counts from the end).
        etas: candidate etas, each in (0, MAX_ETA].
        batch_size: sequences per forward pass.
        fluency_settings: how each point's n-gram entropy and perplexity are measured.

    Raises:
        InputError: a layer the model lacks, no or bad etas, no usable record.
    """

    def __init__(
        self,
        lm: LensModel,
        records: Sequence[FactRecord],
        layers: Sequence[int],
        etas: Sequence[float],
        *,
        batch_size: int = 64,
        fluency_settings: FluencySettings | None = None,
    ) -> None:
        """Check the grid, prepare the records and probe x_n at every candidate layer."""
        self.lm, self.batch_size = lm, batch_size
        self.fluency_settings = fluency_settings or FluencySettings()
        checks.layers("layers", list(layers))  # a non-empty list of integers
        layers = [lm.arch.layer_index(layer, "layers") for layer in layers]
        if not etas:
            raise InputError("give at least one eta")
        etas = [checks.eta("eta", e) for e in etas]  # finite, in (0, MAX_ETA]: as the CLI
        self.cases = _prepare(lm, records)
        self.x_by_layer, self.predicted = _probe(lm, self.cases, layers, batch_size)
        unembed = lm.arch.unembedding()[0].detach().float().cpu()
        self.e_t = unembed[torch.tensor([c.target_id for c in self.cases])]
        self.seqs: list[list[int]] = []
        self.n_scored: list[int] = []
        owner: list[int] = []
        for r, c in enumerate(self.cases):
            self.seqs += c.seqs
            self.n_scored += c.n_scored
            owner += [r] * len(c.seqs)
        self.owner = torch.tensor(owner)
        self.grid = [(layers[0], 0.0)] + [(layer, eta) for layer in layers for eta in etas]
        """(layer, eta) of every point: the unedited point, then layer-major, eta-minor."""

    def points(self, shard: Shard | None = None) -> list[int]:
        """Grid positions of ``shard`` (``p mod N == K``; None: every point)."""
        shard = shard or Shard()
        return [p for p in range(len(self.grid)) if shard.owns(p)]

    def point(self, p: int) -> SweepPoint:
        """The mean metrics of grid point ``p`` over the records."""
        layer, eta = self.grid[p]
        lm = self.lm
        rows = _ShiftRows(self.x_by_layer[layer], self.e_t, ~self.predicted)
        rows.eta = eta
        module = lm.arch.resolve(layer, "ff2").module

        def on_batch(idx: list[int]) -> None:
            rows.rows = self.owner[idx]

        with Hooks() as hooks:
            hooks.forward(module, rows.hook)
            scored = score_sequences(
                lm, self.seqs, self.n_scored, batch_size=self.batch_size, on_batch=on_batch
            )
            flu, ppl = _fluency_of(
                lm, self.cases, self.fluency_settings, self.batch_size, rows, eta > 0
            )
        return _point(layer if eta else -1, eta, self.cases, scored, flu, ppl)


EDITOR_COLUMNS = (
    "method",
    "param",
    "value",
    "efficacy_acc",
    "paraphrase_acc",
    "neighborhood_acc",
    "neighborhood_score",
    "fluency",
    "perplexity",
    "records",
)
"""Columns of :func:`editor_sweep`'s table (the unedited row has no value)."""


def editor_sweep(
    lm: LensModel,
    records: Sequence[FactRecord],
    method: str,
    param: str,
    values: Sequence[Any],
    out_dir: str | Path,
    *,
    fixed: dict[str, Any] | None = None,
    fluency_settings: FluencySettings | None = None,
    batch_size: int = 32,
    data: str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Metrics of one editor for every value of one hyper-parameter, plus the unedited row.

    Each value is one method of an evaluation run in ``out_dir`` (``METHOD:PARAM=VALUE``; single
    edits, exactly as ``backward-lens evaluate`` measures them), so the run is resumable and its
    ``results.jsonl`` keeps every record's numbers. Fluency is measured on the first
    ``fluency_settings.records`` records (n-gram entropy of the harness's samples, perplexity on
    all of ``PERPLEXITY_TEXTS``); choose a value with :func:`choose`, which applies the same
    fluency rule as to the shift sweep. MEMIT's covariance weight: ``method="memit",
    param="mom2_update_weight"``.

    Args:
        lm: the model (left unchanged).
        records: the held-out split.
        method: a registered editor (``memit``, ``rome``, ``ft``...).
        param: one of its hyper-parameters.
        values: the candidate values (JSON-representable; each distinct).
        out_dir: the evaluation run's folder.
        fixed: the editor's other hyper-parameters, the same at every value (default: its own
            defaults, per model for layers).
        fluency_settings: records, sampling and perplexity cut (``ppl_texts`` is not used here).
        batch_size: sequences per forward pass.
        data: the data file's name, recorded in the run (a resumed run must match it).
        resume: continue the run in ``out_dir``.
        progress: show a progress bar.

    Returns:
        One row per value (:data:`EDITOR_COLUMNS`), the unedited row first (``value`` NaN);
        metrics are means over the records whose edit succeeded.

    Raises:
        InputError: no values, a repeated value, an unknown editor or parameter, bad values, an
            occupied ``out_dir`` without ``resume``.
    """
    fs = fluency_settings or FluencySettings()
    if not values:
        raise InputError(f"give at least one value of {param}")
    labels = [f"{method}:{param}={json.dumps(v)}" for v in values]
    if len(set(labels)) != len(labels):
        raise InputError(f"the values of {param} repeat: {list(values)}")
    specs = [
        MethodSpec(method, {**(fixed or {}), param: v}, label)
        for v, label in zip(values, labels, strict=True)
    ]
    settings = EvalSettings(
        batch_size=batch_size,
        fluency_records=fs.records,
        ppl_records=fs.records,
        generation_length=fs.generation_length,
        top_k=fs.top_k,
        ppl_max_tokens=fs.ppl_max_tokens,
        seed=fs.seed,
    )
    evaluate(
        lm,
        records,
        [MethodSpec(UNEDITED, {}, UNEDITED), *specs],
        out_dir,
        settings=settings,
        data=data,
        resume=resume,
        progress=progress,
    )
    rows = read_results(out_dir)
    table = [_editor_row(rows, UNEDITED, UNEDITED, param, math.nan)]
    table += [
        _editor_row(rows, label, method, param, v) for v, label in zip(values, labels, strict=True)
    ]
    return pd.DataFrame(table, columns=list(EDITOR_COLUMNS))


def _editor_row(
    rows: Sequence[dict[str, Any]], label: str, method: str, param: str, value: Any
) -> dict[str, Any]:
    ok = [r["metrics"] for r in rows if r["label"] == label and r.get("status") == "ok"]

    def mean(key: str) -> float:
        got = [float(m[key]) for m in ok if m.get(key) is not None]
        return sum(got) / len(got) if got else math.nan

    metrics = EDITOR_COLUMNS[3:-1]
    return {
        "method": method,
        "param": param,
        "value": value,
        **{k: mean(k) for k in metrics},
        "records": len(ok),
    }


PART = "sweep.json"
"""Base name of a shard's part: ``sweep.shard-K-of-N.json`` (settings and its grid points)."""


def write_part(out: Path, shard: Shard, settings: dict[str, Any], df: pd.DataFrame) -> Path:
    """Write one shard's grid points (atomically) with the settings they were computed with.

    Raises:
        InputError: the folder holds parts of another split or with other settings.
    """
    check_parts(out, shard, settings)
    rows = [
        {"point": int(i), **row} for i, row in zip(df.index, df.to_dict("records"), strict=True)
    ]
    body = {"shard": str(shard), "settings": settings, "points": rows}
    return atomic_write_text(out / shard.file_name(PART), json.dumps(body, indent=1) + "\n")


def _read_part(path: Path) -> dict[str, Any]:
    try:
        part = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(part, dict) or "points" not in part or "settings" not in part:
            raise ValueError
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{path} is damaged; run that shard again") from None
    return part


def check_parts(out: Path, shard: Shard, settings: dict[str, Any]) -> None:
    """Refuse to add a part to a folder holding parts of another split or other settings.

    Raises:
        InputError: a different N, or different settings (model, data, records, grid).
    """
    files = shard_files(out, PART)
    problem = layout_problem(files, shard, out)
    if problem:
        raise InputError(problem)
    for other, path in files:
        if other == shard:
            continue
        old = _read_part(path)["settings"]
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise InputError(
                f"{path.name} in {out} was computed with different {', '.join(diff)} "
                f"({old.get(diff[0])!r}); run every shard with the same settings or use "
                "another --out"
            )


def merge_parts(out: Path) -> tuple[pd.DataFrame | None, dict[str, Any], list[int], int]:
    """The shards' parts in ``out`` merged into the full table (grid order), when all are there.

    Returns:
        (the table, or None while a part is missing; the settings; the shards present; N).

    Raises:
        DataError: no part in ``out``, or a damaged one.
        InputError: parts of different splits or settings.
    """
    files = [(s, p) for s, p in shard_files(out, PART) if s.sharded]
    if not files:
        raise DataError(f"no sweep part (sweep.shard-K-of-N.json) in {out}; run the shards first")
    counts = {s.count for s, _ in files}
    if len(counts) > 1:
        raise InputError(
            f"{out} holds sweep parts of splits into {sorted(counts)} shards; keep one split "
            "(move the others aside) and try again"
        )
    count = counts.pop()
    parts = [(s, _read_part(p)) for s, p in files]
    settings = parts[0][1]["settings"]
    for s, part in parts[1:]:
        if part["settings"] != settings:
            raise InputError(
                f"sweep part {s} in {out} was computed with other settings than part "
                f"{parts[0][0]}; run every shard with the same settings"
            )
    present = [s.index for s, _ in parts]
    if len(present) < count:
        return None, settings, present, count
    rows = sorted((r for _, part in parts for r in part["points"]), key=lambda r: r["point"])
    index = [r.pop("point") for r in rows]
    columns = [f.name for f in fields(SweepPoint)]
    return pd.DataFrame(rows, index=index, columns=columns), settings, present, count


def _fluency_of(
    lm: LensModel,
    cases: Sequence[_Case],
    settings: FluencySettings,
    batch_size: int,
    rows: _ShiftRows,
    edited: bool,
) -> tuple[float, float]:
    """Mean n-gram entropy and mean perplexity over the first ``settings.records`` cases.

    Each case is measured with its own record's shift (``rows``, already hooked in); NaN when not
    measured. The unedited model's perplexity is the same for every record: scored once.
    """
    mine = list(cases[: settings.records])
    if not mine:
        return math.nan, math.nan
    prompts: list[str] = []
    seeds: list[int] = []
    owner: list[int] = []
    for r, c in enumerate(mine):
        prompts += c.prompts.generation
        seeds += fluency_seeds(settings.seed, c.case_id, len(c.prompts.generation))
        owner += [r] * len(c.prompts.generation)
    owner_t = torch.tensor(owner)

    def set_rows(idx: list[int]) -> None:
        rows.rows = owner_t[idx]

    texts = generate_texts(
        lm,
        prompts,
        seeds,
        max_length=settings.generation_length,
        top_k=settings.top_k,
        batch_size=batch_size,
        on_batch=set_rows,
    )
    per_record = [
        fluency([t for t, o in zip(texts, owner, strict=True) if o == r]) for r in range(len(mine))
    ]
    values = [e for e in per_record if e is not None]
    entropy = sum(values) / len(values) if values else math.nan
    ppl_texts = list(PERPLEXITY_TEXTS[: settings.ppl_texts])
    if not ppl_texts:
        return entropy, math.nan
    # the unedited model gives every record the same perplexity: score the texts once
    n_rec = len(mine) if edited else 1
    ppl_owner = torch.tensor([r for r in range(n_rec) for _ in ppl_texts])

    def set_ppl_rows(idx: list[int]) -> None:
        rows.rows = ppl_owner[idx]

    ppls = perplexities(
        lm,
        ppl_texts * n_rec,
        max_tokens=settings.ppl_max_tokens,
        batch_size=batch_size,
        on_batch=set_ppl_rows,
    )
    return entropy, sum(ppls) / len(ppls)


def _point(
    layer: int,
    eta: float,
    cases: Sequence[_Case],
    scored: Sequence[tuple[Tensor, Tensor]],
    entropy: float = math.nan,
    ppl: float = math.nan,
) -> SweepPoint:
    eff, para, nacc, nscore = [], [], [], []
    i = 0
    for c in cases:
        n_new = len(c.prompts.rewrite) + len(c.prompts.paraphrase)
        n_nb = len(c.prompts.neighborhood)
        new = scored[i : i + n_new]
        true = scored[i + n_new : i + n_new + n_nb]
        nb_new = scored[i + n_new + n_nb : i + n_new + 2 * n_nb]
        i += n_new + 2 * n_nb
        eff.append(float(bool(new[0][1].all())))
        if n_new > 1:
            para.append(sum(float(bool(ok.all())) for _, ok in new[1:]) / (n_new - 1))
        if n_nb:
            nacc.append(sum(float(bool(ok.all())) for _, ok in true) / n_nb)
            nscore.append(
                sum(float(t.mean() < n.mean()) for (t, _), (n, _) in zip(true, nb_new, strict=True))
                / n_nb
            )

    def mean(v: list[float]) -> float:
        return sum(v) / len(v) if v else float("nan")

    return SweepPoint(
        layer, eta, mean(eff), mean(para), mean(nacc), mean(nscore), len(cases), entropy, ppl
    )


def _unedited(df: pd.DataFrame) -> pd.Series:
    """Which rows are the unedited baseline: eta 0 (shift sweep) or no value (editor sweep)."""
    return df.eta == 0 if "eta" in df.columns else df.value.isna()


def fluency_rejections(
    df: pd.DataFrame,
    max_entropy_drop: float = MAX_ENTROPY_DROP,
    max_perplexity_rise: float = MAX_PERPLEXITY_RISE,
) -> pd.Series:
    """Why each grid point breaks fluency ('' when it does not), against the unedited row.

    A point is rejected when its mean n-gram entropy is below ``(1 - max_entropy_drop)`` times the
    unedited one, or its mean perplexity above ``(1 + max_perplexity_rise)`` times the unedited
    one, or when it lacks a value the unedited row has. When the unedited row has no value (the
    sweep measured no fluency), nothing is rejected for that measure.

    Args:
        df: a sweep table (:func:`shift_sweep` or :func:`editor_sweep`) with its unedited row.
        max_entropy_drop: allowed relative drop of the entropy (0.05 = 5 %).
        max_perplexity_rise: allowed relative rise of the perplexity (0.10 = 10 %).

    Returns:
        One string per row (same index), e.g. ``"entropy 86.2 < 585.7"``; '' for the unedited row.

    Raises:
        InputError: the table has no unedited row.
    """
    base_rows = df[_unedited(df)]
    if base_rows.empty:
        raise InputError("the sweep table has no unedited row to compare fluency against")
    base = base_rows.iloc[0]
    reasons = []
    for i, row in df.iterrows():
        why = []
        if not _unedited(df).loc[i]:
            entropy = row.get("fluency", math.nan)
            base_entropy = base.get("fluency", math.nan)
            if not math.isnan(base_entropy):
                floor = (1 - max_entropy_drop) * base_entropy
                if math.isnan(entropy) or entropy < floor:
                    why.append(f"entropy {entropy * 100:.1f} < {floor * 100:.1f}")
            ppl = row.get("perplexity", math.nan)
            base_ppl = base.get("perplexity", math.nan)
            if not math.isnan(base_ppl):
                ceiling = (1 + max_perplexity_rise) * base_ppl
                if math.isnan(ppl) or ppl > ceiling:
                    why.append(f"perplexity {ppl:.2f} > {ceiling:.2f}")
        reasons.append("; ".join(why))
    return pd.Series(reasons, index=df.index, dtype=object)


def with_verdicts(
    df: pd.DataFrame,
    max_entropy_drop: float = MAX_ENTROPY_DROP,
    max_perplexity_rise: float = MAX_PERPLEXITY_RISE,
) -> pd.DataFrame:
    """The table plus ``rejected`` (bool) and ``rejected_because`` (what ``sweep.csv`` holds).

    See :func:`fluency_rejections` for the rule and the reasons' format.
    """
    reasons = fluency_rejections(df, max_entropy_drop, max_perplexity_rise)
    return df.assign(rejected=reasons != "", rejected_because=reasons)


def choose(
    df: pd.DataFrame,
    min_efficacy: float = 0.95,
    *,
    max_entropy_drop: float = MAX_ENTROPY_DROP,
    max_perplexity_rise: float = MAX_PERPLEXITY_RISE,
) -> pd.Series:
    """The chosen point: never one that breaks fluency, then efficacy, specificity, generality.

    Points rejected by :func:`fluency_rejections` are out. Among the others whose efficacy
    accuracy reaches ``min_efficacy`` (if none does: those of the best efficacy), the best
    neighbourhood score, then paraphrase accuracy, then the smaller eta (shift sweep) or the
    earlier grid value (editor sweep).

    Args:
        df: a sweep table with its unedited row.
        min_efficacy: efficacy accuracy a chosen point must reach, 0..1.
        max_entropy_drop: allowed relative drop of the n-gram entropy.
        max_perplexity_rise: allowed relative rise of the perplexity.

    Returns:
        The chosen row.

    Raises:
        InputError: no unedited row, or every edited point breaks fluency.
    """
    reasons = fluency_rejections(df, max_entropy_drop, max_perplexity_rise)
    edited = df[~_unedited(df)]
    if edited.empty:
        raise InputError("the sweep table has no edited point to choose from")
    ok = edited[reasons[edited.index] == ""]
    if ok.empty:
        raise InputError(
            f"every one of the {len(edited)} edited points lowers the n-gram entropy by more "
            f"than {max_entropy_drop:.0%} or raises the perplexity by more than "
            f"{max_perplexity_rise:.0%}; try smaller etas / weaker settings"
        )
    reach = ok[ok.efficacy_acc >= min_efficacy]
    if reach.empty:
        reach = ok[ok.efficacy_acc >= ok.efficacy_acc.max()]
    keys = ["neighborhood_score", "paraphrase_acc"] + (["eta"] if "eta" in df.columns else [])
    ranked = reach.sort_values(keys, ascending=[False, False, True][: len(keys)], kind="stable")
    return ranked.iloc[0]


def plot_sweep(df: pd.DataFrame, chosen: pd.Series, path: str | Path, title: str = "") -> Path:
    """Efficacy and neighbourhood score per (layer, eta) as heatmaps, and their trade-off.

    Points that break fluency (a ``rejected`` column, see :func:`with_verdicts`) are crossed out
    on the heatmaps; the chosen one is framed in red.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from backward_lens.io import atomic_write

    edited = df[df.eta > 0]
    base = df[df.eta == 0].iloc[0]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, col, name in zip(
        axes[:2],
        ["efficacy_acc", "neighborhood_score"],
        ["efficacy accuracy", "neighbourhood score"],
        strict=True,
    ):
        grid = edited.pivot(index="layer", columns="eta", values=col)
        im = ax.imshow(
            grid.values * 100, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=100
        )
        ax.set_xticks(range(len(grid.columns)), [f"{e:g}" for e in grid.columns], rotation=45)
        ax.set_yticks(range(len(grid.index)), [str(i) for i in grid.index])
        ax.set_xlabel("eta")
        ax.set_ylabel("layer (FF2 edited)")
        ax.set_title(name + (" (unedited %.0f)" % (base[col] * 100)))
        fig.colorbar(im, ax=ax)
        r = list(grid.index).index(chosen.layer)
        c = list(grid.columns).index(chosen.eta)
        ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=2))
        if "rejected" in edited.columns:
            for _, point in edited[edited.rejected.astype(bool)].iterrows():
                x = list(grid.columns).index(point.eta)
                y = list(grid.index).index(point.layer)
                ax.text(x, y, "×", ha="center", va="center", color="white", fontsize=12)
    if "rejected" in edited.columns and edited.rejected.astype(bool).any():
        axes[0].text(
            0.0, -0.28, "×: breaks fluency (not chosen)", transform=axes[0].transAxes, fontsize=8
        )
    ax = axes[2]
    for layer, g in edited.groupby("layer"):
        ax.plot(
            g.efficacy_acc * 100,
            g.neighborhood_score * 100,
            marker="o",
            ms=3,
            label=f"layer {layer}",
        )
    ax.scatter(
        [chosen.efficacy_acc * 100],
        [chosen.neighborhood_score * 100],
        s=120,
        facecolors="none",
        edgecolors="red",
        lw=2,
        label="chosen",
        zorder=5,
    )
    ax.axhline(base.neighborhood_score * 100, color="gray", ls="--", lw=1, label="unedited")
    ax.set_xlabel("efficacy accuracy (%)")
    ax.set_ylabel("neighbourhood score (%)")
    ax.set_title("trade-off (each line: eta grows)")
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)

    def save(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    atomic_write(out, save)
    plt.close(fig)
    return out
