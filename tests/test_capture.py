"""Captured factors against autograd's weight.grad, for every architecture family."""

from __future__ import annotations

import pytest
import torch

from backward_lens.capture import Capture, capture, resolve_layers
from backward_lens.errors import InputError
from backward_lens.models import LensModel
from tests.tiny import TINY_CONFIGS, make_tiny

PROMPTS = [
    "Paris",
    "The Eiffel Tower is located in",
    "Danielle Darrieux's mother tongue is, as everybody in the city of Paris knows,",
]


def _autograd_grads(lm: LensModel, cap: Capture) -> dict[str, torch.Tensor]:
    """weight.grad of every parameter after a plain loss.backward() on the same loss."""
    model = lm.model
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    try:
        ids = torch.tensor([cap.request.input_ids])
        m = cap.request.n_loss_positions
        logp = model(ids).logits[0, -m:].float().log_softmax(-1)
        targets = torch.tensor(cap.request.target_ids)
        (-logp.gather(-1, targets[:, None]).sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(flags[n])


def _assert_relatively_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to ~1e-5 of the matrix's largest entry (float32 sums in another order)."""
    scale = float(expected.abs().max())  # 0 for q, k of a 1-token prompt: softmax over one key
    assert float((actual - expected).abs().max()) <= 2e-5 * scale


def _part(lm: LensModel, layer: int, name: str, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    res = lm.arch.resolve(layer, name)
    pname = next(n for n, p in lm.model.named_parameters() if p is res.module.weight)
    g = grads[pname]
    if res.part is not None:
        g = g[:, res.part] if res.layout == "in_out" else g[res.part]
    return g


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("prompt", PROMPTS)
def test_dense_equals_autograd_for_every_matrix(model_type: str, prompt: str, tokenizer) -> None:
    lm = make_tiny(model_type, tokenizer)
    cap = capture(lm, prompt, " Rome", attention=True)
    assert isinstance(cap, Capture)
    grads = _autograd_grads(lm, cap)
    names = lm.arch.matrix_names(attention=True)
    assert {"ff1", "ff2", "q", "k", "v", "o"} <= set(names)
    for layer in range(lm.n_layers):
        for name in names:
            g = cap.gradient(layer, name)
            expected = _part(lm, layer, name, grads)
            _assert_relatively_close(g.dense(), expected)
            assert g.rank() == int(torch.linalg.matrix_rank(expected))
    # Lemma 4.1: rank <= n, and the last MLP layer has rank 1 (only position n reaches the loss)
    last = lm.n_layers - 1
    for name in lm.arch.matrix_names():
        assert cap.gradient(last, name).rank() == 1
        assert all(cap.gradient(layer, name).rank() <= cap.n for layer in range(lm.n_layers))
    with torch.no_grad():
        logits = lm.model(torch.tensor([cap.request.input_ids])).logits[0, -1].float()
    assert cap.loss == pytest.approx(float(-logits.log_softmax(-1)[cap.target_id]), rel=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt", "gemma3_text"])
def test_batch_equals_single_prompts(model_type: str, tokenizer) -> None:
    lm = make_tiny(model_type, tokenizer, seed=1)
    targets = [" Rome", " French", " the"]
    batch = capture(lm, PROMPTS, targets)
    assert isinstance(batch, list)
    for prompt, target, b in zip(PROMPTS, targets, batch, strict=True):
        one = capture(lm, prompt, target)
        assert isinstance(one, Capture)
        assert b.tokens == one.tokens and b.loss == pytest.approx(one.loss, rel=1e-5)
        for name in one.gradients:
            for layer in range(lm.n_layers):
                gb, g1 = b.gradient(layer, name), one.gradient(layer, name)
                torch.testing.assert_close(gb.x, g1.x, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(gb.delta, g1.delta, rtol=1e-4, atol=1e-6)
                assert gb.rank() == g1.rank()


def test_teacher_forced_multi_token_target_matches_autograd(tokenizer) -> None:
    lm = make_tiny("llama", tokenizer)
    cap = capture(lm, "The capital of France is", " Paris-sur-Seine", multi_token="teacher_forced")
    assert isinstance(cap, Capture)
    m = cap.request.n_loss_positions
    assert m > 1 and cap.n == len(cap.request.prompt_ids) + m - 1
    grads = _autograd_grads(lm, cap)
    for layer in range(lm.n_layers):
        expected = _part(lm, layer, "ff2", grads)
        _assert_relatively_close(cap.gradient(layer, "ff2").dense(), expected)
    first = capture(lm, "The capital of France is", " Paris-sur-Seine", multi_token="first")
    assert isinstance(first, Capture)
    assert first.request.target_ids == cap.request.target_ids[:1]


def test_capture_leaves_no_trace_even_when_it_fails(tokenizer) -> None:
    lm = make_tiny("gpt2", tokenizer)
    model = lm.model
    model.train()
    frozen = next(iter(model.parameters()))
    frozen.requires_grad_(False)
    seen: list[int] = []
    user_hook = model.transformer.h[0].mlp.c_fc.register_forward_hook(
        lambda m, a, o: seen.append(1)
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks_before = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())

    def explode(module, args, output):
        raise RuntimeError("boom")

    bomb = model.transformer.h[1].register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        capture(lm, "Paris is", " big")
    bomb.remove()
    cap = capture(lm, "Paris is", " big")
    assert isinstance(cap, Capture)
    hooks_after = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    assert hooks_after == hooks_before  # ours are gone, the user's is still there
    assert len(seen) == 2  # the user's hook ran in both passes
    user_hook.remove()
    assert model.training  # mode restored
    assert not frozen.requires_grad and all(p.requires_grad for p in list(model.parameters())[1:])
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient written
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_layer_selection_and_errors(tokenizer) -> None:
    lm = make_tiny("qwen2", tokenizer)
    cap = capture(lm, "Paris is", " big", layers=[-1, 0], matrices=["ff2"])
    assert isinstance(cap, Capture)
    assert cap.layers == [0, 2] and list(cap.gradients) == ["ff2"]
    assert cap.gradient(-1, "ff2").rank() == 1
    with pytest.raises(InputError, match="out of range"):
        resolve_layers([3], 3)
    with pytest.raises(InputError, match="not captured"):
        cap.gradient(1, "ff2")
    with pytest.raises(InputError, match="not captured"):
        cap.gradient(0, "ff1")
