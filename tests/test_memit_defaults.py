"""MEMIT's covariance weight (lambda) comes from the per-model defaults unless given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import backward_lens.editing.memit as memit_module
from backward_lens.editing import RewriteRequest, get_editor
from backward_lens.editing.memit import MOM2_UPDATE_WEIGHT
from tests.tiny import make_tiny

REQ = RewriteRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome")
SMALL = {"layers": [0, 1], "stats_samples": 4, "stats_length": 8, "context": [[3, 2]], "v_steps": 2}


def test_memit_weight_defaults_per_model(  # type: ignore[no-untyped-def]
    tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unlisted models get MEMIT's GPT-2 xl lambda; a listed lambda is used and recorded."""
    monkeypatch.setenv("BACKWARD_LENS_CACHE", str(tmp_path / "cache"))
    lm = make_tiny("llama", tokenizer, seed=1)
    plain = get_editor("memit", **SMALL)(lm, [REQ])
    assert plain.hparams["mom2_update_weight"] == MOM2_UPDATE_WEIGHT == 20000.0

    def tuned(lm: Any, method: str) -> dict[str, Any]:
        return {"layers": [0, 1], "mom2_update_weight": 5.0}

    monkeypatch.setattr(memit_module, "editor_defaults", tuned)
    by_default = get_editor("memit", **SMALL)(lm, [REQ])
    given = get_editor("memit", **SMALL, mom2_update_weight=5.0)(lm, [REQ])
    assert by_default.hparams["mom2_update_weight"] == 5.0
    for name, delta in given.deltas.items():
        torch.testing.assert_close(by_default.deltas[name], delta)
        assert not torch.allclose(plain.deltas[name], delta)  # lambda matters
