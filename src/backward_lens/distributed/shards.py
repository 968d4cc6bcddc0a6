"""Shards: one job split over N independent processes, started by any launcher.

A job's records (in file order, or the study's sample order) are cut into batches that depend
only on positions: batch ``b`` holds positions ``[b*B, (b+1)*B)`` for the run's batch size ``B``
(:func:`batch_ranges`). Shard ``K`` of ``N`` (``K`` counts from 0) takes whole batches, those with
``b mod N == K`` (:meth:`Shard.batches`): deterministic, balanced to within one batch, and stable
when more records are added at the end (positions count from the start of the data file, and
``--records`` keeps a prefix). Because every process (a shard, a Ray worker, a resumed run)
computes exactly the same batches, merged results equal the unsplit run's bit for bit. Each shard
appends to its own file, ``<stem>.shard-K-of-N<suffix>`` (e.g. ``results.shard-0-of-4.jsonl``) in
the shared run folder, so shards never write the same file; the summary reads them all. With
``N == 1`` the file keeps its plain name, so ``WORLD_SIZE=1`` is the same as no shard at all.

Where the shard comes from, first match wins:

1. ``--shard K/N`` on the command line;
2. ``RANK`` and ``WORLD_SIZE`` (``torchrun``, ``accelerate launch``, MPI wrappers);
3. ``SLURM_ARRAY_TASK_ID`` and ``SLURM_ARRAY_TASK_COUNT`` (a Slurm job array; ``K`` is the task
   id minus ``SLURM_ARRAY_TASK_MIN``, so arrays numbered from 1 work too).

When both 2 and 3 are set they must agree; a half-set pair, a non-number or ``K`` outside
``0..N-1`` is a one-line :class:`~backward_lens.errors.InputError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from backward_lens.errors import InputError

__all__ = [
    "Shard",
    "batch_ranges",
    "parse_shard",
    "resolve_shard",
    "shard_files",
    "shard_from_env",
]


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``index`` counts from 0).

    Attributes:
        index: this process's shard, ``0 <= index < count``.
        count: how many shards the job is split into (1: not split).
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        """Refuse an index outside the split.

        Raises:
            InputError: ``count`` below 1, or ``index`` outside ``[0, count)``.
        """
        if self.count < 1 or not 0 <= self.index < self.count:
            raise InputError(
                f"shard {self.index}/{self.count} is out of range; K/N needs N >= 1 and "
                f"0 <= K < N (K counts from 0)"
            )

    @property
    def sharded(self) -> bool:
        """True when the job is split (``count > 1``)."""
        return self.count > 1

    def owns(self, unit: int) -> bool:
        """Whether unit ``unit`` (0-based: a batch, or a sweep's grid point) is this shard's.

        It is when ``unit mod N == K``.
        """
        return unit % self.count == self.index

    def batches(self, n: int, size: int) -> list[range]:
        """This shard's batches of ``n`` positions cut ``size`` at a time.

        Batch ``b`` of :func:`batch_ranges` is this shard's when ``b mod N == K``.

        Args:
            n: how many positions (records) the whole job has.
            size: positions per batch (at least 1).

        Returns:
            The owned batches, in order, each a range of positions.
        """
        return [r for b, r in enumerate(batch_ranges(n, size)) if self.owns(b)]

    def file_name(self, base: str) -> str:
        """``results.jsonl`` -> ``results.shard-K-of-N.jsonl`` (unchanged when not split)."""
        if not self.sharded:
            return base
        stem, dot, suffix = base.partition(".")
        return f"{stem}.shard-{self.index}-of-{self.count}{dot}{suffix}"

    def __str__(self) -> str:
        """``K/N``, as the command line writes it."""
        return f"{self.index}/{self.count}"


def batch_ranges(n: int, size: int) -> list[range]:
    """Positions ``0..n-1`` cut into batches of ``size``: ``[0, size), [size, 2*size), ...``.

    The one batching rule of every run that can be split or resumed: a batch depends only on
    positions, never on which shard, worker or resumed process computes it.

    Args:
        n: how many positions.
        size: positions per batch (values below 1 count as 1).

    Returns:
        The batches in order; the last may be shorter.
    """
    size = max(1, size)
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def parse_shard(text: str, what: str = "--shard") -> Shard:
    """``"K/N"`` -> :class:`Shard` (``K`` from 0).

    Raises:
        InputError: not two integers separated by ``/``, or out of range.
    """
    match = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", text)
    if not match:
        raise InputError(
            f"{what}: cannot read {text!r}; write K/N, e.g. 0/4 for the first of 4 shards "
            "(K counts from 0)"
        )
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise InputError(
            f"{what} {text.strip()} is out of range; K/N needs N >= 1 and 0 <= K < N "
            f"(K counts from 0: the shards of {max(count, 1)} are 0/{max(count, 1)} .. "
            f"{max(count, 1) - 1}/{max(count, 1)})"
        )
    return Shard(index, count)


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name].strip()
    try:
        return int(value)
    except ValueError:
        raise InputError(
            f"the environment variable {name}={value!r} is not an integer; fix it, unset it, "
            "or pass --shard K/N"
        ) from None


def _pair(environ: Mapping[str, str], k_name: str, n_name: str) -> tuple[int, int] | None:
    has_k, has_n = k_name in environ, n_name in environ
    if not has_k and not has_n:
        return None
    if has_k != has_n:
        missing = n_name if has_k else k_name
        given = k_name if has_k else n_name
        raise InputError(
            f"{given} is set but {missing} is not; set both, unset {given}, or pass --shard K/N"
        )
    return _int(environ, k_name), _int(environ, n_name)


def shard_from_env(environ: Mapping[str, str] | None = None) -> Shard | None:
    """The shard given by ``RANK``/``WORLD_SIZE`` or a Slurm array, or None when neither is set.

    Raises:
        InputError: half a pair set, a non-integer, out of range, or the two sources disagree.
    """
    env = os.environ if environ is None else environ
    torch_pair = _pair(env, "RANK", "WORLD_SIZE")
    slurm = _pair(env, "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
    if slurm is not None and "SLURM_ARRAY_TASK_MIN" in env:
        slurm = (slurm[0] - _int(env, "SLURM_ARRAY_TASK_MIN"), slurm[1])
    if torch_pair is not None and slurm is not None and torch_pair != slurm:
        raise InputError(
            f"RANK/WORLD_SIZE say shard {torch_pair[0]}/{torch_pair[1]} but the Slurm array says "
            f"{slurm[0]}/{slurm[1]}; unset one of them or pass --shard K/N"
        )
    pair = torch_pair or slurm
    if pair is None:
        return None
    source = "RANK/WORLD_SIZE" if torch_pair is not None else "SLURM_ARRAY_TASK_ID/COUNT"
    index, count = pair
    if count < 1 or not 0 <= index < count:
        raise InputError(
            f"{source} give shard {index}/{count}, which is out of range (need N >= 1 and "
            "0 <= K < N); fix the launcher's variables or pass --shard K/N"
        )
    return Shard(index, count)


def resolve_shard(text: str | None, environ: Mapping[str, str] | None = None) -> Shard:
    """The shard of this process: ``--shard`` when given, else the environment, else 0/1.

    Raises:
        InputError: see :func:`parse_shard` and :func:`shard_from_env`.
    """
    if text is not None:
        return parse_shard(text)
    return shard_from_env(environ) or Shard()


def shard_files(folder: str | Path, base: str) -> list[tuple[Shard, Path]]:
    """Every results file of ``base`` in ``folder``, ordered by (N, K).

    The plain one counts as shard 0/1; each shard's is ``<stem>.shard-K-of-N<suffix>``.

    Returns:
        (shard, path) pairs, only for files that exist.
    """
    folder = Path(folder)
    stem, dot, suffix = base.partition(".")
    pattern = re.compile(rf"{re.escape(stem)}\.shard-(\d+)-of-(\d+){re.escape(dot + suffix)}")
    found: list[tuple[Shard, Path]] = []
    if (folder / base).is_file():
        found.append((Shard(), folder / base))
    if folder.is_dir():
        for path in folder.iterdir():
            m = pattern.fullmatch(path.name)
            if m and path.is_file():
                index, count = int(m.group(1)), int(m.group(2))
                if 0 <= index < count:
                    found.append((Shard(index, count), path))
    return sorted(found, key=lambda sp: (sp[0].count, sp[0].index))


def layout_problem(files: list[tuple[Shard, Path]], shard: Shard, folder: Path) -> str | None:
    """A one-line reason why ``shard`` may not add to a folder holding ``files``, or None.

    It may not when the folder holds non-empty results of another split.
    """
    other = sorted({s.count for s, p in files if s.count != shard.count and p.stat().st_size})
    if not other:
        return None
    held = " and ".join("unsplit" if n == 1 else f"split into {n} shards" for n in other)
    asked = "unsplit" if shard.count == 1 else f"split into {shard.count} shards"
    return (
        f"{folder} holds results of a run {held}, and this run is {asked}; use the same N "
        "(--shard K/N) as that run or another --out"
    )
