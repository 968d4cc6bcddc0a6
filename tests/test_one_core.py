"""One way to encode and one way to hook: no module tokenises or registers hooks on its own.

Issue 9 found padding written six times and hooks registered by hand at ten places; every entry
point now goes through ``tokens`` (encoding) and ``batching`` (padding, forward arguments, eval
mode, hooks that are always removed). This test keeps it that way.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "backward_lens"

RULES = {
    "tokens.py": [
        re.compile(r"add_special_tokens\s*="),
        re.compile(r"\.tokenizer\(|\btok(enizer)?\((?!\))"),
    ],
    "batching.py": [
        re.compile(r"register_forward(_pre)?_hook\("),
        re.compile(r"inspect\.signature\("),
    ],
}
"""Owner module -> patterns that may appear in that module only."""


@pytest.mark.parametrize("owner", sorted(RULES))
def test_only_the_core_does_it(owner: str) -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == owner and path.parent == SRC:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if any(p.search(line) for p in RULES[owner]):
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not offenders, f"use backward_lens.{owner[:-3]} instead:\n" + "\n".join(offenders)
