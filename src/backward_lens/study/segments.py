"""ROME's prompt segmentation, with the subject found from token offsets.

ROME's causal-tracing figures (and the Backward Lens paper's Figs. 5-6) average over six segments:
first subject token, middle subject tokens, last subject token, first subsequent token, further
tokens and the last token. We follow ROME's indexing exactly (``experiments/causal_trace.py``):
with subject tokens ``[s, e)`` and n positions, first = s, middle = s+1..e-2, last subject = e-1,
first subsequent = e, further = e+1..n-2, last = n-1. So a one-token subject is both first and last
subject token, and the first subsequent token may be the last token (ROME counts it in both).
Positions ROME ignores get their own segments: ``bos`` (special tokens such as BOS) and
``prefix`` (ordinary tokens before the subject, common in CounterFact prompts).

The subject span is located in the prompt *text* (the given occurrence) and mapped to the tokens
whose character offsets overlap it. That is robust to leading spaces (" Paris" tokens), BOS tokens
and tokenisers that merge the subject with a neighbour ("Messi's" -> one token): we never
re-tokenise template pieces, which breaks on all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backward_lens.errors import DataError, InputError
from backward_lens.tokens import locate_subject, token_spans

SEGMENTS: tuple[str, ...] = (
    "bos",
    "prefix",
    "first_subject",
    "middle_subject",
    "last_subject",
    "first_subsequent",
    "further",
    "last",
)
"""Segment keys in display order; the six after ``prefix`` are ROME's."""

SEGMENT_LABELS: dict[str, str] = {
    "bos": "BOS / special",
    "prefix": "tokens before the subject",
    "first_subject": "first subject token",
    "middle_subject": "middle subject tokens",
    "last_subject": "last subject token",
    "first_subsequent": "first subsequent token",
    "further": "further tokens",
    "last": "last token",
}


@dataclass(frozen=True)
class Segmentation:
    """Which positions of one prompt belong to which segment.

    Attributes:
        n: number of prompt positions.
        subject: token range ``[start, end)`` of the subject.
        positions: segment key -> sorted positions (segments may overlap, as in ROME; a segment
            may be empty, e.g. ``middle_subject`` for a two-token subject).
    """

    n: int
    subject: tuple[int, int]
    positions: dict[str, list[int]]

    def to_dict(self) -> dict[str, Any]:
        """The segmentation as JSON: ``{"n": int, "subject": [start, end], "positions": {...}}``."""
        return {"n": self.n, "subject": list(self.subject), "positions": self.positions}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Segmentation:
        """Inverse of :meth:`to_dict` (as read back from a run's JSONL)."""
        start, end = data["subject"]
        return cls(int(data["n"]), (int(start), int(end)), dict(data["positions"]))


def segment_prompt(
    tokenizer: Any,
    prompt: str,
    subject: str,
    prompt_ids: list[int] | tuple[int, ...],
    occurrence: int = 0,
) -> Segmentation:
    """Segment ``prompt`` (tokenised as ``prompt_ids``) around ``subject``.

    Args:
        tokenizer: the Hugging Face tokenizer that produced ``prompt_ids``.
        prompt: the full prompt text.
        subject: the subject as it appears in the prompt (surrounding white space is ignored).
        prompt_ids: the prompt's token ids, special tokens (BOS) included.
        occurrence: which occurrence of a repeated subject to use (0 = the first, as
            ``prompt.format(subject)`` of a one-slot template puts it).

    Raises:
        DataError: the subject is empty or not in the prompt, or no token covers it.
    """
    try:
        ids, (start, end) = locate_subject(
            tokenizer, prompt, subject, ids=prompt_ids, occurrence=occurrence
        )
    except InputError as exc:
        raise DataError(str(exc)) from None
    spans = token_spans(tokenizer, prompt, ids)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    n = len(ids)
    last = n - 1
    bos = [i for i in range(start) if ids[i] in special or spans[i][1] <= spans[i][0]]
    positions = {
        "bos": bos,
        "prefix": [i for i in range(start) if i not in bos],
        "first_subject": [start],
        "middle_subject": list(range(start + 1, end - 1)),
        "last_subject": [end - 1],
        "first_subsequent": [end] if end < n else [],
        "further": list(range(end + 1, last)),
        "last": [last],
    }
    return Segmentation(n, (start, end), positions)
