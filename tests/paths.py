"""Test data bundled with the repository (``tests/data``, provenance in its README).

The suite passes on a fresh clone with nothing beside it. ``BACKWARD_LENS_TEST_DATA`` may point
to another EasyEdit-format CounterFact file (e.g. the whole ``counterfact-edit.json``).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "tests" / "data"
COUNTERFACT_EDIT = Path(
    os.environ.get("BACKWARD_LENS_TEST_DATA", DATA_DIR / "counterfact-edit-sample.json")
)
"""The first 300 records of EasyEdit's ``counterfact-edit.json``."""
