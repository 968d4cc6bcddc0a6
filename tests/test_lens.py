"""The vocabulary lens against the model's own logits and a brute-force ranking."""

from __future__ import annotations

import pytest
import torch

from backward_lens.models import LensModel
from tests.tiny import make_tiny


def _final_hidden(lm: LensModel, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input of the final norm, model logits) at every position."""
    store: dict[str, torch.Tensor] = {}
    norm = lm.arch.final_norm_modules()[0]
    handle = norm.register_forward_hook(lambda m, a, o: store.update(h=a[0].detach()))
    try:
        with torch.no_grad():
            logits = lm.model(**lm.tokenizer(text, return_tensors="pt")).logits[0]
    finally:
        handle.remove()
    return store["h"][0], logits


@pytest.mark.parametrize("model_type", ["gpt2", "gptj", "opt", "llama", "gemma2", "gemma3_text"])
def test_lens_of_last_hidden_state_is_the_models_output(model_type: str, tokenizer) -> None:
    lm = make_tiny(model_type, tokenizer)
    h, logits = _final_hidden(lm, "The Eiffel Tower is in Paris")
    torch.testing.assert_close(lm.lens.logits(h), logits.float(), rtol=1e-4, atol=1e-4)
    proj = lm.lens.project(h, k=5, target=int(logits[-1].argmax()))
    assert proj.top_ids[:, 0].tolist() == logits.argmax(-1).tolist()
    assert proj.bottom_ids[:, 0].tolist() == logits.argmin(-1).tolist()
    assert proj.target_rank is not None and int(proj.target_rank[-1]) == 0


def test_top_bottom_probs_and_ranks_by_brute_force(tokenizer) -> None:
    lm = make_tiny("llama", tokenizer)
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(7, 32, generator=g)
    targets = torch.tensor([0, 5, 99, 1000, lm.vocab_size - 1, 7, 7])  # the last id too
    proj = lm.lens.project(vectors, k=4, target=targets, chunk_size=3)
    probs = lm.lens.probs(vectors)
    for i in range(7):
        order = probs[i].argsort(descending=True)
        assert proj.top_ids[i].tolist() == order[:4].tolist()
        assert proj.bottom_ids[i].tolist() == probs[i].argsort()[:4].tolist()
        torch.testing.assert_close(proj.top_probs[i], probs[i][order[:4]])
        logits = lm.lens.logits(vectors[i])
        assert int(proj.target_rank[i]) == int((logits > logits[targets[i]]).sum())  # type: ignore[index]
    torch.testing.assert_close(proj.norm, vectors.norm(dim=-1))
    rank_of = lm.lens.rank_of(vectors, 99)
    assert int(rank_of[2]) == int(proj.target_rank[2])  # type: ignore[index]


def test_normalized_lens_is_lens_of_unit_vectors(tokenizer) -> None:
    lm = make_tiny("gpt2", tokenizer)
    v = torch.randn(3, 32) * 1e-3  # tiny VJPs are where LayerNorm's epsilon bites (spec 2.2)
    unit = v / v.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(lm.lens.logits(v, normalized=True), lm.lens.logits(unit))
    assert not torch.allclose(lm.lens.logits(v), lm.lens.logits(unit))


def test_projection_reshape_keeps_grid(tokenizer) -> None:
    lm = make_tiny("llama", tokenizer)
    vectors = torch.randn(2 * 3 * 4, 32)
    flat = lm.lens.project(vectors, k=2, target=3)
    grid = flat.reshape(2, 3, 4)
    assert grid.top_ids.shape == (2, 3, 4, 2) and grid.target_rank.shape == (2, 3, 4)  # type: ignore[union-attr]
    assert torch.equal(grid.top_ids[1, 2, 3], flat.top_ids[1 * 12 + 2 * 4 + 3])
