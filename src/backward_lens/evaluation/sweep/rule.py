"""The rule that picks a sweep's point: fluency first, then efficacy, specificity, generality.

The choice: among points whose efficacy accuracy reaches ``min_efficacy``, the one with the best
neighbourhood score (ROME's P(true) > P(new) on neighbourhood prompts), then paraphrase accuracy,
then the smaller eta (shift sweep) or the earlier value (editor sweep). Neighbourhood *accuracy*
is near zero for small models even before any edit (the true object is rarely their argmax), so
it cannot rank the points; it is reported as well.

Fluency is protected: every point also samples continuations of the generation prompts of the first
``FluencySettings.records`` records (ROME's n-gram entropy) and scores the first
``FluencySettings.ppl_texts`` perplexity texts (the editor sweep: all of them) with each of those
records' edit, and :func:`choose` never picks a point whose mean entropy is more than 5 % below the
unedited one or whose mean perplexity is more than 10 % above it (:func:`fluency_rejections`).
Gemma-3-270M's first default (layer 15, eta 0.2, chosen without this rule) brought the entropy of
its continuations from 616 to 86.

The rule reads either table: :func:`~backward_lens.evaluation.sweep.shift.shift_sweep`'s (its
unedited row has eta 0) and :func:`~backward_lens.evaluation.sweep.editor.editor_sweep`'s (its
unedited row has no value).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import pandas as pd

from backward_lens.errors import InputError
from backward_lens.evaluation.texts import PERPLEXITY_TEXTS

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
