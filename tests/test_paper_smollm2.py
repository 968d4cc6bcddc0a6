"""The paper's claims, checked on the real default model (SmolLM2-135M)."""

from __future__ import annotations

import pytest

from backward_lens.capture import Capture, capture
from backward_lens.explain import explain
from backward_lens.models import LensModel

pytestmark = pytest.mark.slow

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def eiffel(smollm2: LensModel) -> Capture:
    cap = capture(smollm2, PROMPT, " Rome")
    assert isinstance(cap, Capture)
    return cap


def test_lemma_4_1_ranks(smollm2: LensModel, eiffel: Capture) -> None:
    """Rank n in every layer but the last, whose MLP gradient has rank 1."""
    n, last = eiffel.n, smollm2.n_layers - 1
    assert n == 10
    for name in ("ff1", "gate", "ff2"):
        ranks = [eiffel.gradient(layer, name).rank() for layer in range(smollm2.n_layers)]
        assert ranks[:last] == [n] * last and ranks[last] == 1


def test_ff2_vjp_of_last_token_encodes_the_target(smollm2: LensModel, eiffel: Capture) -> None:
    """FF2 VJPs put ' Rome' at the very bottom of the vocabulary in the top layers."""
    v = smollm2.vocab_size
    deltas = eiffel.stack("ff2", "delta")[:, -1]  # [layers, d] at the last token
    ranks = smollm2.lens.rank_of(deltas, eiffel.target_id).tolist()
    n_layers = smollm2.n_layers
    last_quarter = [r for layer, r in enumerate(ranks) if layer >= 0.75 * n_layers]
    top_third = [r for layer, r in enumerate(ranks) if layer >= 2 * n_layers / 3]
    assert last_quarter and all(r == v - 1 for r in last_quarter)
    assert top_third and all(r >= 0.95 * v for r in top_third)


def test_lemma_5_1_vjp_at_the_final_hidden_state(smollm2: LensModel, eiffel: Capture) -> None:
    """dL/dh = -(1 - p_t) D[t] + sum_{k != t} p_k D[k], computed by hand from the logits."""
    p = eiffel.logits[0].double().softmax(-1)
    t = eiffel.target_id
    d_t = smollm2.arch.unembedding()[0].detach().double()  # rows are D^T[k]
    coef = p.clone()
    coef[t] = p[t] - 1.0
    by_hand = coef @ d_t
    assert float(coef[t]) < 0 and float(coef[t]) == pytest.approx(-(1 - float(p[t])))
    error = (eiffel.head_vjp[-1].double() - by_hand).abs().max()
    assert float(error) <= 1e-4 * float(by_hand.abs().max())  # float32 autograd vs float64


def test_explain_reads_rome_as_the_shift_of_the_last_token(smollm2: LensModel) -> None:
    expl = explain(smollm2, PROMPT, " Rome", top_k=3)
    assert expl.prediction.token == " Paris" and expl.target.token == " Rome"
    top = expl.layers[-2]
    assert top.ff2.positions[-1].bottom[0] == " Rome"
    assert top.ff2.positions[-1].target_rank == smollm2.vocab_size - 1
    # FF1 at the last position of the top layers reads the model's own answer (forward lens)
    assert expl.layers[-1].ff1.positions[-1].top[0] == " Paris"
    # norms in the table are the factors' norms
    cap = capture(smollm2, PROMPT, " Rome")
    assert isinstance(cap, Capture)
    assert top.ff2.positions[3].norm == pytest.approx(
        float(cap.gradient(top.layer, "ff2").delta[3].norm()), rel=1e-4
    )
