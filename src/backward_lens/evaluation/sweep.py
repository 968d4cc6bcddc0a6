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

Split over processes (``--shard K/N``), shard K computes the grid points ``p mod N == K`` (each
point is independent of the others) and writes ``sweep.shard-K-of-N.json``; :func:`merge_parts`
joins the parts into the same table an unsplit sweep gives.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
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
from backward_lens.evaluation.metrics import RecordPrompts
from backward_lens.evaluation.scoring import encode_pair, score_sequences
from backward_lens.io import atomic_write_text
from backward_lens.models import LensModel


@dataclass(frozen=True)
class SweepPoint:
    """Mean metrics of one (layer, eta) over the sweep's records (eta 0 = unedited)."""

    layer: int
    eta: float
    efficacy_acc: float
    paraphrase_acc: float
    neighborhood_acc: float
    neighborhood_score: float
    records: int


@dataclass
class _Case:
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
    """x_n at each layer's FF2 input [R, d_ff], and whether each prompt already predicts its
    target [R]."""
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

    Returns:
        One row per grid point (:class:`SweepPoint` fields), indexed by grid position.

    Raises:
        InputError: a layer the model lacks, no or bad etas, no usable record.
    """
    shard = shard or Shard()
    checks.layers("layers", list(layers), lm.n_layers)
    layers = [layer % lm.n_layers for layer in layers]
    if not etas:
        raise InputError("give at least one eta")
    etas = [checks.eta("eta", e) for e in etas]  # finite, in (0, MAX_ETA]: shared with the CLI
    cases = _prepare(lm, records)
    x_by_layer, predicted = _probe(lm, cases, layers, batch_size)
    unembed = lm.arch.unembedding()[0].detach().float().cpu()
    e_t = unembed[torch.tensor([c.target_id for c in cases])]
    seqs, n_scored, owner = [], [], []
    for r, c in enumerate(cases):
        seqs += c.seqs
        n_scored += c.n_scored
        owner += [r] * len(c.seqs)
    owner_t = torch.tensor(owner)

    points = []
    grid = [(layers[0], 0.0)] + [(layer, eta) for layer in layers for eta in etas]
    mine = [p for p in range(len(grid)) if shard.owns(p)]
    desc = f"sweep {shard}" if shard.sharded else "sweep"
    for layer, eta in tqdm([grid[p] for p in mine], desc=desc, unit="pt", disable=not progress):
        rows = _ShiftRows(x_by_layer[layer], e_t, ~predicted)
        rows.eta = eta
        module = lm.arch.resolve(layer, "ff2").module

        def on_batch(idx: list[int], rows: _ShiftRows = rows) -> None:
            rows.rows = owner_t[idx]

        with Hooks() as hooks:
            hooks.forward(module, rows.hook)
            scored = score_sequences(lm, seqs, n_scored, batch_size=batch_size, on_batch=on_batch)
        points.append(_point(layer if eta else -1, eta, cases, scored))
    columns = [f.name for f in fields(SweepPoint)]
    return pd.DataFrame([asdict(p) for p in points], index=mine, columns=columns)


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


def _point(
    layer: int, eta: float, cases: Sequence[_Case], scored: Sequence[tuple[Tensor, Tensor]]
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

    return SweepPoint(layer, eta, mean(eff), mean(para), mean(nacc), mean(nscore), len(cases))


def choose(df: pd.DataFrame, min_efficacy: float = 0.95) -> pd.Series:
    """The chosen point (see the module docstring); falls back to the best efficacy."""
    edited = df[df.eta > 0]
    ok = edited[edited.efficacy_acc >= min_efficacy]
    if ok.empty:
        best = edited.efficacy_acc.max()
        ok = edited[edited.efficacy_acc >= best]
    ranked = ok.sort_values(
        ["neighborhood_score", "paraphrase_acc", "eta"], ascending=[False, False, True]
    )
    return ranked.iloc[0]


def plot_sweep(df: pd.DataFrame, chosen: pd.Series, path: str | Path, title: str = "") -> Path:
    """Efficacy and neighbourhood score per (layer, eta) as heatmaps, and their trade-off."""
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
