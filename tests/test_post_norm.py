"""MEMIT through FF2's post-norm (Gemma-2/3, OLMo-2): the residual moves by what was asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import backward_lens.editing.memit as memit_module
from backward_lens.adapters import ADAPTERS
from backward_lens.editing import RewriteRequest, get_editor
from backward_lens.editing.post_norm import ff2_output_change
from backward_lens.editing.rome import module_io_at, prompts_at_subject
from tests.tiny import TINY_CONFIGS, make_tiny

REQ = RewriteRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome")
SMALL = {
    "layers": [0, 1, 2],
    "stats_samples": 16,  # 256 tokens: a full-rank key covariance (d_ff = 48)
    "stats_length": 16,
    "context": [],  # no prefixes: the key is the plain prompt's, where the residual is read
    "v_steps": 4,
    "v_lr": 0.02,  # a small z step: a residual change an RMS-normalised FF2 output can make
    "mom2_update_weight": 1e-4,  # the key is matched (almost) exactly: FF2 changes by r there
}
POST_NORM_FAMILIES = ("gemma2", "gemma3_text", "olmo2")


def test_no_post_norm_is_the_identity() -> None:
    """Without a post-norm the residual's change is asked of FF2's output as it is."""
    resid = torch.randn(3, 8, dtype=torch.float64)
    assert ff2_output_change(None, torch.randn(3, 8), resid) is resid


@pytest.mark.parametrize("family", POST_NORM_FAMILIES)
def test_change_through_the_norm_reaches_the_target(tokenizer: Any, family: str) -> None:
    """norm(x + change) = norm(x) + r for a reachable r, to float32 precision."""
    lm = make_tiny(family, tokenizer, seed=3)
    norm = lm.arch.ff2_post_norm(1)
    assert norm is not None
    with torch.no_grad():  # a gain that is not all ones
        for p in norm.parameters():
            p.normal_(0.0, 0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=g) * 3.0
    x_moved = x + torch.randn(4, 32, generator=g)
    with torch.no_grad():
        resid = norm(x_moved) - norm(x)
        change = ff2_output_change(norm, x, resid)
        reached = norm(x + change)
    torch.testing.assert_close(reached, norm(x) + resid, atol=5e-4, rtol=1e-4)
    # a plain r (as without the mapping) would miss: the norm rescales what FF2 adds
    with torch.no_grad():
        assert float((norm(x + resid) - norm(x) - resid).norm()) > 0.1 * float(resid.norm())


def test_adapters_name_every_post_norm(tokenizer: Any) -> None:
    """Every tiny family whose blocks normalise FF2's output has it in the adapter table."""
    for family in TINY_CONFIGS:
        lm = make_tiny(family, tokenizer)
        has = hasattr(lm.arch.layers[0], "post_feedforward_layernorm")
        assert (ADAPTERS[family].ff2_post_norm is not None) == has, family
        assert (lm.arch.ff2_post_norm(0) is not None) == has, family


def _memit_misses_z(lm: Any, monkeypatch: pytest.MonkeyPatch) -> float:
    """Relative distance of the last edited block's output from MEMIT's z after the edit."""
    seen: list[Any] = []
    optimize = memit_module.optimize_value

    def record(*args: Any, **kwargs: Any) -> Any:
        seen.append(optimize(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(memit_module, "optimize_value", record)
    edit = get_editor("memit", **SMALL)(lm, [REQ])
    z = seen[0].target
    block = lm.arch.layers[edit.hparams["layers"][-1]]
    plain = [prompts_at_subject(lm, REQ, [""])[0]]
    params = dict(lm.model.named_parameters())
    with torch.no_grad():
        for name, delta in edit.deltas.items():
            params[name].add_(delta.to(params[name].dtype))
        _, out = module_io_at(lm, block, plain)
        for name, delta in edit.deltas.items():
            params[name].sub_(delta.to(params[name].dtype))
    return float((out[0] - z).norm() / (z - seen[0].init).norm())


@pytest.mark.parametrize("family", ["gemma3_text", "llama"])
def test_memit_reaches_z_through_the_post_norm(
    tokenizer: Any, family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a vanishing lambda the edited model's hidden state at the subject is MEMIT's z.

    Gemma-3 adds norm(FF2 output) to the residual; asked for r directly (the mapping switched
    off) its layers miss z by far more than the mapping does.
    """
    monkeypatch.setenv("BACKWARD_LENS_CACHE", str(tmp_path / "cache"))
    lm = make_tiny(family, tokenizer, seed=1)
    if family == "gemma3_text":
        with torch.no_grad():  # gains away from one, as in a trained Gemma
            for layer in range(lm.n_layers):
                for p in lm.arch.ff2_post_norm(layer).parameters():  # type: ignore[union-attr]
                    p.normal_(0.0, 0.3)
    miss = _memit_misses_z(lm, monkeypatch)
    assert miss < (0.1 if family == "gemma3_text" else 1e-3), miss
    if family == "gemma3_text":
        monkeypatch.setattr(memit_module, "ff2_output_change", lambda norm, x, r: r)
        assert _memit_misses_z(lm, monkeypatch) > 5 * miss  # measured: 0.50 against 0.054
