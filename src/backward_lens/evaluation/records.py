"""Records of an evaluation run: stable keys, and each record checked and encoded once."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from backward_lens.data import FactRecord
from backward_lens.editing.base import RewriteRequest
from backward_lens.errors import BackwardLensError
from backward_lens.evaluation.metrics import RecordPrompts
from backward_lens.evaluation.scoring import encode_pair
from backward_lens.models import LensModel


def wants(limit: int | None, index: int) -> bool:
    """Whether the record at ``index`` is among the first ``limit`` (None: all)."""
    return limit is None or index < limit


@dataclass
class PreparedRecord:
    """A record checked and encoded for evaluation.

    Attributes:
        index: its position in the run's records.
        record: the record.
        prompts: its prompts and targets.
        request: the rewrite the editors compute.
    """

    index: int
    record: FactRecord
    prompts: RecordPrompts
    request: RewriteRequest


Skipped = tuple[int, FactRecord, str]
"""A record that cannot be evaluated: (position, record, reason)."""


def prepare_record(index: int, record: FactRecord, lm: LensModel) -> PreparedRecord | Skipped:
    """Validate and encode one record; a bad one becomes ``(index, record, reason)``."""
    try:
        prompts = RecordPrompts.from_record(record)
        for prompt, target in prompts.pairs():
            encode_pair(lm, prompt, target)
        request = RewriteRequest(
            record.prompt, record.subject, prompts.target_new, prompts.target_true
        )
        return PreparedRecord(index, record, prompts, request)
    except BackwardLensError as exc:
        return (index, record, str(exc))


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
