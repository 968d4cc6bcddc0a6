"""Half precision: ranks, norms and the lens agree with float32 (issue 9, item 4).

A bfloat16 or float16 model keeps its factors in its own dtype, but ranks (float64, tolerance in
``LowRankGradient.rank``), norms (float32 or better) and lens logits (float32 head) must give the
float32 answers. "Equal up to near-ties" for lens ranks: a token whose logit gap to the target is
within the bf16 rounding of the two compared logits may swap; every other token must keep its side.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import backward_lens as bl
from backward_lens.capture import Capture
from backward_lens.lowrank import LowRankGradient
from backward_lens.models import LensModel, wrap
from tests.tiny import make_tiny

PROMPT = "The Eiffel Tower is located in the city of"
HALF = [torch.bfloat16, torch.float16]
FAMILIES = ["gpt2", "gptj", "gpt_neox", "opt", "llama", "qwen3", "gemma3_text", "phi3"]
# bf16 unit roundoff: rounding a weight to bf16 moves it by at most this fraction of itself
U_BF16 = 2.0**-8


def _as(lm: LensModel, dtype: torch.dtype) -> LensModel:
    return wrap(copy.deepcopy(lm.model).to(dtype), lm.tokenizer, f"{lm.name}-{dtype}")


def _ranks(cap: Capture, names: list[str] | None = None) -> dict[tuple[str, int], int]:
    return {
        (name, k): g.rank()
        for name, grads in cap.gradients.items()
        if names is None or name in names
        for k, g in enumerate(grads)
    }


def _capture(lm: LensModel, attention: bool = False) -> Capture:
    cap = bl.capture(lm, PROMPT, " Rome", attention=attention)
    assert isinstance(cap, Capture)
    return cap


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_half_precision_factors_keep_their_rank(dtype: torch.dtype) -> None:
    # 6 positions, the last two inputs copies of the first: rank 4 in every dtype (was 0 in half)
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(6, 64, generator=g), torch.randn(6, 48, generator=g)
    x[4] = x[0]
    x[5] = x[0]
    grad = LowRankGradient(x.to(dtype), d.to(dtype))
    assert grad.rank() == 4
    exact = LowRankGradient(x.to(dtype).double(), d.to(dtype).double()).dense()
    assert grad.rank() == int(torch.linalg.matrix_rank(exact))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_mlp_ranks_equal_float32_ranks(model_type: str, tokenizer: Any) -> None:
    lm = make_tiny(model_type, tokenizer)
    cap32 = _capture(lm, attention=True)
    # the MLP (the paper's matrices) and q/o; k/v: see LowRankGradient.rank's "Limit"
    names = ["ff1", "gate", "ff2", "q", "o"]
    expected = _ranks(cap32, names)
    assert expected[("ff2", 2)] == 1 and expected[("ff2", 0)] == cap32.n
    for dtype in HALF:
        assert _ranks(_capture(_as(lm, dtype), attention=True), names) == expected, dtype


@pytest.mark.parametrize("dtype", HALF)
def test_norms_are_float32_and_right(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x, d = torch.randn(5, 40, generator=g).to(dtype), torch.randn(5, 24, generator=g).to(dtype)
    grad = LowRankGradient(x, d)
    dense = d.double().T @ x.double()  # [d_out, d_in] in float64, from the stored factors
    assert grad.norm() == pytest.approx(float(dense.norm()), rel=1e-12)
    pos = grad.position_norms()
    assert pos.dtype == torch.float32
    ref = x.double().norm(dim=1) * d.double().norm(dim=1)
    torch.testing.assert_close(pos.double(), ref, rtol=1e-6, atol=0)
    for got, want in [
        (grad.input_space_neuron_norms(), dense.norm(dim=1)),
        (grad.output_space_neuron_norms(), dense.norm(dim=0)),
    ]:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert grad.input_space_neurons().dtype == torch.float32


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
def test_half_model_lens_computes_in_float32(
    model_type: str, dtype: torch.dtype, tokenizer: Any
) -> None:
    half = _as(make_tiny(model_type, tokenizer), dtype)
    upcast = wrap(copy.deepcopy(half.model).float(), tokenizer)  # the same weights, in float32
    v = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    got = half.lens.logits(v)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, upcast.lens.logits(v), rtol=1e-5, atol=1e-5)
    # differentiable towards the vectors (ROME and fine-tuning optimise through it)
    v.requires_grad_(True)
    half.lens(v)[:, 0].sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_half_model_lens_sees_edited_weights(tokenizer: Any) -> None:
    half = _as(make_tiny("llama", tokenizer), torch.bfloat16)
    v = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    before = half.lens.logits(v)
    with torch.no_grad():
        half.lens.unembed[7].mul_(-1)  # in place, as an edit does: the float32 copy must follow
    after = half.lens.logits(v)
    torch.testing.assert_close(after[:, 7], -before[:, 7])


def _assert_same_side_but_near_ties(lm32: LensModel, lm16: LensModel, vectors: torch.Tensor) -> int:
    """Every token off a near-tie is on the same side of the target in both lenses.

    Returns:
        How many (row, token) pairs were compared.
    """
    l32, l16 = lm32.lens.logits(vectors), lm16.lens.logits(vectors)
    target = l32.argsort(-1, descending=True)[:, 100]  # a mid-ranking target per row
    norms, weight, _ = lm32.lens._float32_head()
    h = vectors.float()
    for module in norms:
        h = module(h)
    # rounding the final norm's and the unembedding's weights to bf16 moves logit j by at most
    # 2 * u * sum_k |h_k W_jk| (u = 2^-8): the bf16 rounding of the compared logits
    bound = 2 * U_BF16 * (h.abs() @ weight.abs().T)
    rows = torch.arange(len(vectors))
    t32, t16 = l32[rows, target][:, None], l16[rows, target][:, None]
    near = (l32 - t32).abs() <= bound + bound[rows, target][:, None]
    above32, above16 = l32 > t32, l16 > t16
    assert torch.equal(above32[~near], above16[~near])
    ranks32, ranks16 = above32.sum(-1), above16.sum(-1)
    assert ((ranks32 - ranks16).abs() <= near.sum(-1)).all()
    assert (~near).float().mean() > 0.9  # the check is not vacuous
    return int((~near).sum())


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])  # RMSNorm heads
def test_lens_ranks_equal_float32_up_to_near_ties(model_type: str, tokenizer: Any) -> None:
    lm = make_tiny(model_type, tokenizer)
    vectors = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    assert _assert_same_side_but_near_ties(lm, _as(lm, torch.bfloat16), vectors) > 0


@pytest.mark.slow
def test_smollm2_ranks_and_lens_in_half_precision(smollm2: LensModel) -> None:
    cap32 = _capture(smollm2, attention=True)
    expected = _ranks(cap32)
    assert expected[("ff2", 29)] == 1 and expected[("ff1", 0)] == cap32.n
    for dtype in HALF:
        half = _as(smollm2, dtype)
        assert _ranks(_capture(half, attention=True)) == expected, dtype
        if dtype == torch.bfloat16:
            vectors = torch.cat([cap32.gradients["ff2"][k].delta for k in (5, 15, 25)])
            vectors = vectors[vectors.norm(dim=-1) > 0]
            _assert_same_side_but_near_ties(smollm2, half, vectors)
    # the projection itself: computed from the float32 vectors, not rounded to bf16
    assert F.normalize(cap32.gradients["ff2"][0].delta, dim=-1).dtype == torch.float32


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_half_model_loss_is_computed_in_float32(model_type: str, tokenizer: Any) -> None:
    """The capture's logits and loss come from the head's input through a float32 head.

    The head includes Gemma's soft-capping; the model's bfloat16 logits are not used.
    """
    lm = make_tiny(model_type, tokenizer)
    lm.model.to(torch.bfloat16)
    prompt = "The Eiffel Tower is located in the city of"
    cap = bl.capture(lm, prompt, " Rome")
    assert isinstance(cap, Capture) and cap.logits.dtype == torch.float32
    ids = torch.tensor([list(cap.request.input_ids)])
    with torch.no_grad():
        out = lm.model(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states[-1][0, -1]  # the head's input (final norm applied)
    weight, bias = lm.arch.unembedding()
    reference = hidden.float() @ weight.detach().float().T
    if bias is not None:
        reference = reference + bias.detach().float()
    softcap = lm.arch.logit_softcap()
    if softcap:
        reference = torch.tanh(reference / softcap) * softcap
    torch.testing.assert_close(cap.logits[0], reference, rtol=1e-5, atol=1e-5)
    nll = -reference.log_softmax(-1)[cap.target_id]
    assert cap.loss == pytest.approx(float(nll), rel=1e-5)
    # The model's own logits are bfloat16-rounded: the float32 loss is not that one.
    assert out.logits.dtype == torch.bfloat16
    assert not torch.equal(out.logits[0, -1].float(), cap.logits[0])
