"""Fine-tuning data: ``{"text": ...}`` records in a JSON-lines file, tokenised and padded.

Every record is one training sequence: tokenised with the tokenizer's defaults (BOS where the
tokenizer adds one), cut to ``max_length`` tokens. A batch is right-padded; the labels are the
input ids with -100 on padding, so the causal-LM loss covers every real next-token prediction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from backward_lens.batching import pad_batch, pad_id
from backward_lens.errors import DataError
from backward_lens.tokens import encode_text
from backward_lens.training.anyloss import IGNORE_INDEX


def load_texts(path: str | Path) -> list[str]:
    """The ``text`` of every record of a JSONL file (blank lines skipped).

    Raises:
        DataError: a missing file or a folder, not UTF-8, a line that is not a JSON object with
            a non-empty string ``text``, or no record at all (the message names the line).
    """
    p = Path(path)
    if p.is_dir():
        raise DataError(f'{p} is a folder; give a .jsonl file with one {{"text": ...}} per line')
    if not p.is_file():
        raise DataError(f'{p} does not exist; give a .jsonl file with one {{"text": ...}} per line')
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{p} is not UTF-8 text; save it as UTF-8 JSON lines") from None
    texts = []
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{p}, line {k}: not JSON ({exc.msg}); write one JSON object per line"
            ) from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f'{p}, line {k}: expected {{"text": "..."}} with non-empty text')
        texts.append(text)
    if not texts:
        raise DataError(f'{p} has no records; write one {{"text": "..."}} per line')
    return texts


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, cut to ``max_length`` tokens.

    Encoded as ``tokens.encode_text`` does: BOS once where the tokenizer adds one, no EOS.

    Raises:
        DataError: a text that tokenises to fewer than 2 tokens (nothing to predict).
    """
    out = []
    for text in texts:
        ids = encode_text(tokenizer, text)[:max_length]
        if len(ids) < 2:
            raise DataError(f"{text!r} is one token; a training text needs at least two")
        out.append(ids)
    return out


class TokenDataset(torch.utils.data.Dataset):
    """Tokenised sequences, one ``{"input_ids": [...]}`` item each.

    Args:
        sequences: token ids of each training text (see :func:`tokenize`).
    """

    def __init__(self, sequences: list[list[int]]) -> None:
        self.sequences = sequences

    def __len__(self) -> int:
        """Number of sequences."""
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        """Item ``i`` as ``{"input_ids": [...]}`` (what :class:`Collator` takes)."""
        return {"input_ids": self.sequences[i]}


@dataclass
class Collator:
    """Right-pads a list of items into ``input_ids``, ``attention_mask`` and ``labels`` [B, T].

    The labels are the ids, with -100 (ignored by the loss) on padding.

    Attributes:
        pad: the pad token id (masked, so any id works).
    """

    pad: int

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> Collator:
        """A collator padding with ``tokenizer``'s pad id (0 if it has none)."""
        return cls(pad_id(tokenizer))

    def __call__(self, items: list[dict[str, list[int]]]) -> dict[str, Tensor]:
        """Collate ``items`` (each ``{"input_ids": [...]}``) into one right-padded batch."""
        batch = pad_batch([it["input_ids"] for it in items], self.pad, side="right")
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, IGNORE_INDEX)
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "labels": labels,
        }
