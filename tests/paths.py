"""Where the tests find the shared CounterFact data: ``../shared`` beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(
    os.environ.get("BACKWARD_LENS_TEST_DATA", REPO.parent / "shared" / "data" / "counterfact")
)
COUNTERFACT_EDIT = DATA_DIR / "easyedit_format" / "counterfact-edit.json"
