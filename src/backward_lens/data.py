"""Fact records from CounterFact (EasyEdit or ROME layout), ROME's known_1000, or a user's JSONL.

Every layout is read into the same :class:`FactRecord`, so the analyses and the editing harness
never look at file formats. The layout is detected from the first record's keys.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from backward_lens.errors import DataError


@dataclass(frozen=True)
class FactRecord:
    """One fact (and, for CounterFact, its requested rewrite).

    Attributes:
        case_id: the record's id in its file.
        prompt: the full prompt, subject included, e.g. "The Eiffel Tower is located in".
        subject: the subject as it appears in ``prompt``.
        target_new: the new object of a rewrite (None for known-facts data).
        target_true: the true object (None if the file does not give it).
        paraphrase_prompts / neighborhood_prompts / generation_prompts: CounterFact's extra
            prompts (the EasyEdit layout has one paraphrase and one neighbourhood prompt).
        neighborhood_true: the expected answer of each neighbourhood prompt (EasyEdit gives it
            per prompt; in the ROME layout it is ``target_true``).
    """

    case_id: int | str
    prompt: str
    subject: str
    target_new: str | None = None
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    neighborhood_true: tuple[str, ...] = ()
    layout: str = field(default="", compare=False)

    @property
    def template(self) -> str:
        """The prompt with its first occurrence of the subject replaced by ``{}``.

        Raises:
            DataError: the subject does not occur in the prompt.
        """
        i = self.prompt.find(self.subject)
        if i < 0:
            raise DataError(f"record {self.case_id}: subject {self.subject!r} not in the prompt")
        return self.prompt[:i] + "{}" + self.prompt[i + len(self.subject) :]

    @property
    def target(self) -> str | None:
        """The target of the analyses: the new object if there is one, else the true one."""
        return self.target_new if self.target_new is not None else self.target_true

    def to_dict(self) -> dict[str, Any]:
        """The record's fields as a JSON-ready dict (tuples stay tuples; ``layout`` included)."""
        return asdict(self)


def _from_easyedit(r: dict[str, Any]) -> FactRecord:
    loc = r.get("locality_prompt")
    return FactRecord(
        case_id=r.get("case_id", r.get("id", -1)),
        prompt=r["prompt"],
        subject=r["subject"],
        target_new=r.get("target_new"),
        target_true=r.get("ground_truth"),
        paraphrase_prompts=tuple(_as_list(r.get("rephrase_prompt"))),
        neighborhood_prompts=tuple(_as_list(loc)),
        neighborhood_true=tuple(_as_list(r.get("locality_ground_truth"))),
        layout="easyedit",
    )


def _from_rome(r: dict[str, Any]) -> FactRecord:
    rw = r["requested_rewrite"]
    true = rw.get("target_true", {}).get("str")
    neighborhood = tuple(r.get("neighborhood_prompts", []))
    return FactRecord(
        case_id=r.get("case_id", -1),
        prompt=rw["prompt"].format(rw["subject"]),
        subject=rw["subject"],
        target_new=rw["target_new"]["str"],
        target_true=true,
        paraphrase_prompts=tuple(r.get("paraphrase_prompts", [])),
        neighborhood_prompts=neighborhood,
        generation_prompts=tuple(r.get("generation_prompts", [])),
        neighborhood_true=tuple([true] * len(neighborhood)) if true is not None else (),
        layout="rome",
    )


def _from_known(r: dict[str, Any]) -> FactRecord:
    return FactRecord(
        case_id=r.get("known_id", -1),
        prompt=r["prompt"],
        subject=r["subject"],
        target_true=r["attribute"],
        layout="known",
    )


def _from_user(r: dict[str, Any]) -> FactRecord:
    return FactRecord(
        case_id=r.get("id", r.get("case_id", -1)),
        prompt=r["prompt"],
        subject=r["subject"],
        target_new=r.get("target_new", r.get("target")),
        target_true=r.get("target_true"),
        paraphrase_prompts=tuple(_as_list(r.get("paraphrase_prompts"))),
        neighborhood_prompts=tuple(_as_list(r.get("neighborhood_prompts"))),
        neighborhood_true=tuple(_as_list(r.get("neighborhood_true"))),
        layout="jsonl",
    )


def _as_list(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, list) else [value]


def detect_layout(record: dict[str, Any]) -> str:
    """``rome``, ``easyedit``, ``known`` or ``jsonl``, from one record's keys.

    Raises:
        DataError: the keys match none of the four layouts.
    """
    if "requested_rewrite" in record:
        return "rome"
    if "rephrase_prompt" in record or "ground_truth" in record:
        return "easyedit"
    if "known_id" in record or ("attribute" in record and "template" in record):
        return "known"
    if {"prompt", "subject"} <= record.keys() and (
        "target" in record or "target_new" in record or "target_true" in record
    ):
        return "jsonl"
    raise DataError(
        f"unrecognised record layout with keys {sorted(record)}; expected CounterFact (EasyEdit "
        "or ROME layout), known_1000, or JSONL lines with prompt, subject and target"
    )


_READERS = {
    "rome": _from_rome,
    "easyedit": _from_easyedit,
    "known": _from_known,
    "jsonl": _from_user,
}


def read_raw(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON list file or a JSONL file, as dicts.

    Raises:
        DataError: missing file, a folder, not UTF-8, not JSON, or no records.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; give a JSON or JSONL data file")
    if not path.is_file():
        raise DataError(f"no such data file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 JSON or JSONL"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is neither a JSON list nor JSON lines: {exc}") from exc
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path} holds no records (expected a list of JSON objects)")
    return data


def parse_records(raw: Iterable[dict[str, Any]]) -> list[FactRecord]:
    """Read each raw record into a :class:`FactRecord` (layout detected from the first).

    Raises:
        DataError: a record lacks a field of its layout or has a field of the wrong type (a
            number where text is expected, say); the message names the record and the field.
    """
    raw = list(raw)
    if not raw:
        raise DataError("no records")
    layout = detect_layout(raw[0])
    out = []
    for i, r in enumerate(raw):
        try:
            record = _READERS[layout](r)
        except KeyError as exc:
            raise DataError(f"record {i} does not fit the {layout} layout: missing {exc}") from None
        except (TypeError, AttributeError, IndexError, ValueError) as exc:
            raise DataError(f"record {i} does not fit the {layout} layout ({exc})") from None
        _check_types(i, record)
        out.append(record)
    return out


def _check_types(index: int, record: FactRecord) -> None:
    """Text fields must be text, ids a string or an integer (JSON numbers are not targets)."""
    cid = record.case_id
    where = f"record {index}" + (f" ({cid})" if cid != -1 else "")
    if isinstance(cid, bool) or not isinstance(cid, (int, str)):
        raise DataError(f"record {index}: the id must be a string or an integer, got {cid!r}")
    for name in ("prompt", "subject"):
        value = getattr(record, name)
        if not isinstance(value, str):
            raise DataError(f"{where}: {name} must be text, got {value!r}")
    for name in ("target_new", "target_true"):
        value = getattr(record, name)
        if value is not None and not isinstance(value, str):
            raise DataError(f'{where}: {name} must be text such as " Rome", got {value!r}')
    for name in (
        "paraphrase_prompts",
        "neighborhood_prompts",
        "generation_prompts",
        "neighborhood_true",
    ):
        for value in getattr(record, name):
            if not isinstance(value, str):
                raise DataError(f"{where}: {name} must hold text, got {value!r}")


def load_records(
    path: str | Path,
    limit: int | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> list[FactRecord]:
    """Read fact records from ``path``.

    Args:
        path: a CounterFact file (EasyEdit or ROME layout), known_1000.json, or a JSONL file.
        limit: keep the first ``limit`` records (the paper's protocol: the first 1000).
        sample: instead, draw ``sample`` records at random with ``seed`` (file order kept).
        seed: the sampling seed.

    Returns:
        The records, in file order.

    Raises:
        DataError: see :func:`read_raw` and :func:`parse_records`.
    """
    records = parse_records(read_raw(path))
    if sample is not None and sample < len(records):
        keep = sorted(random.Random(seed).sample(range(len(records)), sample))
        records = [records[i] for i in keep]
    if limit is not None:
        records = records[:limit]
    return records
