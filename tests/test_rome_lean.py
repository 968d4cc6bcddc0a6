"""ROME's and MEMIT's lean passes (``rome.LEAN``) give the same edit, bit for bit.

The reference is the earlier whole-model key pass and separate initial-value pass.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from backward_lens.editing import RewriteRequest, get_editor
from backward_lens.editing import rome as rome_module
from tests.tiny import make_tiny
from tests.tokenizers import real_tokenizer

REQ = RewriteRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome")
SMALL = {"stats_samples": 4, "stats_length": 8, "context": [[3, 2]], "v_steps": 4}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("BACKWARD_LENS_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize(
    ("method", "hparams"), [("rome", {"layer": 1}), ("memit", {"layers": [0, 1]})]
)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lean_passes_give_the_same_edit(
    family: str, method: str, hparams: dict[str, Any], monkeypatch: Any
) -> None:
    lm = make_tiny(family, real_tokenizer("gpt-2"), seed=1)
    lean = get_editor(method, **hparams, **SMALL)(lm, [REQ])
    monkeypatch.setattr(rome_module, "LEAN", False)
    before = get_editor(method, **hparams, **SMALL)(lm, [REQ])
    assert lean.deltas.keys() == before.deltas.keys()
    for name, delta in lean.deltas.items():
        assert torch.equal(delta, before.deltas[name]), name
    assert lean.info["v_losses"] == before.info["v_losses"]
