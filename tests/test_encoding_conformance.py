"""The encoding contract on real tokenizers, through every entry point (issue 9's matrix).

Each real tokenizer (GPT-2, Llama-2, Llama-3, Phi-3 from ``tests/data/tokenizers``; SmolLM2's and
Gemma-3's own in the slow tier) is paired with a small random model of its family. For each, the
trained-on token is the one that follows the prompt in the tokenizer's own encoding of
prompt + target, at every entry point; ranks are n (1 at the last layer); a batch equals single
runs; prompts with and without a trailing space agree.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from backward_lens.capture import Capture, capture
from backward_lens.editing import RewriteRequest
from backward_lens.editing.request_tokens import edit_tokens
from backward_lens.editing.rome import prompts_at_subject
from backward_lens.errors import MultiTokenTargetError
from backward_lens.evaluation.scoring import score_targets
from backward_lens.explain import explain
from backward_lens.models import LensModel
from backward_lens.study.segments import segment_prompt
from backward_lens.tokens import encode_request, token_labels
from tests.tiny import make_tiny
from tests.tokenizers import REAL_TOKENIZERS, real_tokenizer

P = "The Eiffel Tower is located in the city of"
P2 = "Danielle Darrieux's mother tongue is"

ROME_PIECE = {
    "gpt-2": "ĠRome",
    "llama-spm": "▁Rome",
    "llama-bpe": "ĠRome",
    "phi-3": "▁Rome",
    "smollm2": "ĠRome",
    "gemma3": "▁Rome",
}
"""The vocabulary piece of " Rome" after the prompt, read off each tokenizer by hand."""

NAMES = [
    *REAL_TOKENIZERS,
    pytest.param("smollm2", marks=pytest.mark.slow),
    pytest.param("gemma3", marks=pytest.mark.slow),
]
_FAMILY = {**REAL_TOKENIZERS, "smollm2": "llama", "gemma3": "gemma3_text"}
_PAIRS: dict[str, LensModel] = {}


@pytest.fixture(params=NAMES)
def pair(request: pytest.FixtureRequest) -> tuple[str, LensModel]:
    """(name, a tiny random model of the tokenizer's family with that real tokenizer)."""
    name = request.param
    if name not in _PAIRS:
        if name in REAL_TOKENIZERS:
            tok = real_tokenizer(name)
        else:
            tok = request.getfixturevalue(name).tokenizer
        _PAIRS[name] = make_tiny(_FAMILY[name], tok)
    return name, _PAIRS[name]


def _reference_token(tok: Any, prompt: str, target: str) -> int:
    """The token after the prompt in ``tok(prompt + target)``, read directly off the tokenizer."""
    whole = tok(prompt + target)["input_ids"]
    alone = tok(prompt)["input_ids"]
    assert whole[: len(alone)] == alone
    return int(whole[len(alone)])


def test_target_is_the_token_after_the_prompt_at_every_entry_point(pair) -> None:  # type: ignore[no-untyped-def]
    name, lm = pair
    tok = lm.tokenizer
    rome = _reference_token(tok, P, " Rome")
    assert tok.convert_ids_to_tokens(rome) == ROME_PIECE[name]
    # The encoding itself, with the target's space on either side or missing.
    for prompt, target in [(P, " Rome"), (P + " ", "Rome"), (P, "Rome"), (P + " ", " Rome")]:
        r = encode_request(tok, prompt, target)
        assert r.target_ids == (rome,) and r.all_target_ids == (rome,)
        assert r.prompt_ids == tuple(tok(P)["input_ids"])
    # capture / explain (with --first-token too)
    cap = capture(lm, P + " ", "Rome")
    assert isinstance(cap, Capture) and cap.target_id == rome
    first = capture(lm, P, " Rome", multi_token="first")
    assert isinstance(first, Capture) and first.target_id == rome
    e = explain(lm, P, " Rome", top_k=2)
    assert e.target.token_id == rome and e.target.token == " Rome"
    assert e.token_ids == list(tok(P)["input_ids"])
    # scoring (evaluation, sweep and the study's original-rank score through it)
    (score,) = score_targets(lm, [(P + " ", "Rome")])
    assert score.token_ids == (rome,)
    nll = -cap.logits[0].log_softmax(-1)[rome]
    assert score.nlls[0] == pytest.approx(float(nll), rel=1e-5, abs=1e-6)
    # every editor's tokens
    assert edit_tokens(lm, P + " ", "Rome").target_ids == [rome]


def test_ranks_are_n_and_one_at_the_last_layer(pair) -> None:  # type: ignore[no-untyped-def]
    _, lm = pair
    cap = capture(lm, P, " Rome")
    assert isinstance(cap, Capture)
    last = lm.n_layers - 1
    for name in ("ff1", "ff2"):
        for layer in cap.layers:
            expected = 1 if layer == last else cap.n
            assert cap.gradient(layer, name).rank() == expected, (name, layer)


def test_batch_equals_single_and_trailing_space_agrees(pair) -> None:  # type: ignore[no-untyped-def]
    _, lm = pair
    batch = capture(lm, [P, P2], [" Rome", " English"])
    assert isinstance(batch, list)
    for got, (prompt, target) in zip(batch, [(P, " Rome"), (P2, " English")], strict=True):
        alone = capture(lm, prompt, target)
        spaced = capture(lm, prompt + " ", target.lstrip())
        assert isinstance(alone, Capture) and isinstance(spaced, Capture)
        assert got.request.input_ids == alone.request.input_ids == spaced.request.input_ids
        for name in ("ff1", "ff2"):
            grads = zip(
                got.gradients[name], alone.gradients[name], spaced.gradients[name], strict=True
            )
            for a, b, c in grads:
                torch.testing.assert_close(a.x, b.x, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(a.delta, b.delta, rtol=1e-4, atol=1e-6)
                assert torch.equal(b.x, c.x) and torch.equal(b.delta, c.delta)
        assert got.loss == pytest.approx(alone.loss, rel=1e-5)


def test_subject_with_surrounding_spaces_one_answer(pair) -> None:  # type: ignore[no-untyped-def]
    """Issue 9 item 3: ROME/MEMIT key on the subject's last token, as the study segments it."""
    _, lm = pair
    tok = lm.tokenizer
    for subject in ("Eiffel Tower", " Eiffel Tower ", "Eiffel Tower "):
        request = RewriteRequest(P, subject, " Rome")
        (plain,) = prompts_at_subject(lm, request, [""])
        (prefixed,) = prompts_at_subject(lm, request, ["The Eiffel Tower. "])
        ids = list(encode_request(tok, P, " Rome").prompt_ids)
        seg = segment_prompt(tok, P, subject, ids)
        assert plain.ids == ids and plain.index == seg.subject[1] - 1
        assert token_labels(tok, [ids[plain.index]]) == [" Tower"]
        assert token_labels(tok, [ids[plain.index + 1]]) == [" is"]
        # The prefix mentions the subject too: the key is still in the prompt, after it.
        assert token_labels(tok, [prefixed.ids[prefixed.index]]) == [" Tower"]
        assert prefixed.ids[prefixed.index + 1 :] == ids[plain.index + 1 :]


def test_labels_of_byte_pieces_are_distinct_and_json_has_ids(pair) -> None:  # type: ignore[no-untyped-def]
    r"""Issue 9 item 7: no '\ufffd' labels; different ids never share a label here."""
    _, lm = pair
    prompt = "東京タワーは🗼 and 🍣 are in the city of"
    e = explain(lm, prompt, " Tokyo", multi_token="first", top_k=1)
    ids = e.token_ids
    assert ids == list(encode_request(lm.tokenizer, prompt, " Tokyo").prompt_ids)
    assert all("\ufffd" not in t for t in e.tokens)
    by_label: dict[str, set[int]] = {}
    for token_id, label in zip(ids, e.tokens, strict=True):
        by_label.setdefault(label, set()).add(token_id)
    assert all(len(v) == 1 for v in by_label.values()), by_label
    data = e.to_dict()
    assert data["token_ids"] == ids
    assert data["layers"][0]["ff1"]["positions"][0]["token_id"] == ids[0]
    assert len(data["layers"][0]["ff2"]["positions"][-1]["bottom_ids"]) == 1


def test_multi_token_refusal_suggests_usable_text(pair) -> None:  # type: ignore[no-untyped-def]
    _, lm = pair
    with pytest.raises(MultiTokenTargetError) as err:
        encode_request(lm.tokenizer, P, " New York City hall")
    assert "\ufffd" not in str(err.value) and "' New'" in str(err.value)
    with pytest.raises(MultiTokenTargetError) as err:
        encode_request(lm.tokenizer, P, " 🗼🗼")
    assert "\ufffd" not in str(err.value) and "''" not in str(err.value)


def test_no_special_token_twice(pair) -> None:  # type: ignore[no-untyped-def]
    _, lm = pair
    tok = lm.tokenizer
    r = encode_request(tok, P, " Rome")
    if tok.bos_token and r.prompt_ids[0] == tok.bos_token_id:
        literal = encode_request(tok, tok.bos_token + P, " Rome")
        assert literal.prompt_ids.count(tok.bos_token_id) == 1
        assert literal.target_ids == r.target_ids


# --------------------------------------------------------------------------- single items


def test_teacher_forced_ranks_each_position_against_its_own_token() -> None:
    """Issue 9 item 5: the last position is trained to emit ' York', and ranks ' York'."""
    lm = make_tiny("llama", real_tokenizer("gpt-2"))
    e = explain(lm, P, " New York", multi_token="teacher_forced", top_k=1)
    new, york = e.target.trained_token_ids
    assert token_labels(lm.tokenizer, [new, york]) == [" New", " York"]
    cap = capture(lm, P, " New York", multi_token="teacher_forced")
    assert isinstance(cap, Capture)
    n_prompt = len(cap.request.prompt_ids)
    assert cap.position_targets().tolist() == [new] * n_prompt + [york]
    for k, layer in enumerate(e.layers):
        last = layer.ff2.positions[-1]
        assert last.target_id == york
        vector = cap.gradients["ff2"][k].delta[-1:]
        assert last.target_rank == int(lm.lens.rank_of(vector, york)[0])
        assert layer.ff2.positions[n_prompt - 1].target_id == new


def test_train_mode_model_scores_like_eval_mode(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Issue 9 item 6: dropout is off while scoring, and the user's train mode comes back."""
    import transformers as tf

    from backward_lens.evaluation.metrics import perplexities
    from backward_lens.models import wrap

    torch.manual_seed(0)
    config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(tokenizer))
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.5
    lm = wrap(tf.GPT2LMHeadModel(config), tokenizer)
    pairs = [(P, " Rome"), (P2, " French")]
    reference = score_targets(lm, pairs)
    lm.model.train()
    lm.model.transformer.h[0].eval()  # a mixed state must come back as it was
    first, second = score_targets(lm, pairs), score_targets(lm, pairs)
    assert first == second == reference
    assert perplexities(lm, [P, P2]) == perplexities(lm, [P, P2])
    assert lm.model.training and not lm.model.transformer.h[0].training
    assert lm.model.transformer.h[1].training


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_prompt_ending_in_space_reads_like_the_spaced_target(name, request) -> None:  # type: ignore[no-untyped-def]
    """Issue 9 item 2 on the real models: "...city of " + "Rome" is "...city of" + " Rome".

    It used to train on a lone space token and the no-space "Rome": P(target) 760x lower.
    """
    lm = request.getfixturevalue(name)
    spaced = explain(lm, P + " ", "Rome", layers=[-1], top_k=1)
    plain = explain(lm, P, " Rome", layers=[-1], top_k=1)
    assert spaced.tokens == plain.tokens and spaced.target == plain.target
    assert spaced.target.token == " Rome"
    assert spaced.target_prob == pytest.approx(plain.target_prob, rel=1e-5)
    assert spaced.prediction == plain.prediction
