"""Scoring and metrics of the evaluation harness against plain forward passes and hand values."""

from __future__ import annotations

import math

import pytest
import torch

from backward_lens.editing.base import Edit, RewriteRequest
from backward_lens.evaluation.metrics import (
    RecordPrompts,
    fluency,
    generate_texts,
    ngram_entropy,
    perplexities,
    word_tokenize,
)
from backward_lens.evaluation.rowedits import RowEdits, hookable
from backward_lens.evaluation.scoring import TargetScore, score_sequences, score_targets
from tests.tiny import make_tiny

PAIRS = [
    ("The Eiffel Tower is in", "Rome"),
    ("Danielle Darrieux speaks", "English and French"),
    ("A", " Paris Hilton"),
    ("The mother tongue of Michel Rocard is the language called", "French"),
]


@pytest.fixture(scope="module")
def tiny(tokenizer):  # type: ignore[no-untyped-def]
    return make_tiny("llama", tokenizer, seed=1)


def plain_scores(lm, prompt: str, target: str) -> tuple[list[float], list[bool]]:  # type: ignore[no-untyped-def]
    """NLL and argmax hit of every target token, from one unpadded forward pass."""
    tok = lm.tokenizer
    target = target if target.startswith(" ") else " " + target
    p = tok(prompt)["input_ids"]
    t = tok(target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + t])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0].double()
    rows = logits[len(p) - 1 : len(p) - 1 + len(t)]
    logp = rows.log_softmax(-1)
    nll = [-float(logp[j, t[j]]) for j in range(len(t))]
    hit = [int(rows[j].argmax()) == t[j] for j in range(len(t))]
    return nll, hit


def test_word_tokenize_splits_words_and_punctuation() -> None:
    assert word_tokenize("Don't stop, he said.") == ["Don't", "stop", ",", "he", "said", "."]


def test_ngram_entropy_by_hand() -> None:
    # words a b a b: bigrams ab, ba, ab -> p = 2/3, 1/3; trigrams aba, bab -> p = 1/2, 1/2
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    # all n-grams distinct: H_n = log2(count)
    assert ngram_entropy("w x y z v") == pytest.approx((2 / 3 * 2.0 + 4 / 3 * math.log2(3)) / 2)
    assert fluency(["a b a b", "a a a a"]) == pytest.approx(((2 / 3 * h2 + 4 / 3) / 2 + 0) / 2)


def test_score_targets_matches_plain_forward(tiny) -> None:  # type: ignore[no-untyped-def]
    scores = score_targets(tiny, PAIRS, batch_size=8)
    for (prompt, target), s in zip(PAIRS, scores, strict=True):
        nll, hit = plain_scores(tiny, prompt, target)
        assert s.nlls == pytest.approx(nll, abs=1e-4)
        assert list(s.correct) == hit
        assert s.prob == pytest.approx(math.exp(-sum(nll) / len(nll)), rel=1e-4)


def test_greedy_continuation_counts_as_correct(tiny) -> None:  # type: ignore[no-untyped-def]
    """A target built from the model's own argmax tokens must be all-correct."""
    ids = tiny.tokenizer("The capital of France is")["input_ids"]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(3):
            seq.append(int(tiny.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    (_nll, ok), (_, ok_other) = score_sequences(
        tiny, [seq, [*seq[:-1], (seq[-1] + 1) % 1000]], [3, 3]
    )
    assert bool(ok.all())
    assert not bool(ok_other[-1])


def test_batched_scoring_equals_one_by_one(tiny) -> None:  # type: ignore[no-untyped-def]
    batched = score_targets(tiny, PAIRS, batch_size=16)
    single = score_targets(tiny, PAIRS, batch_size=1)
    for a, b in zip(batched, single, strict=True):
        assert a.token_ids == b.token_ids
        assert a.nlls == pytest.approx(b.nlls, abs=1e-4)
        assert a.correct == b.correct


def _ts(nll: float, correct: bool, n: int = 1) -> TargetScore:
    return TargetScore("p", "t", tuple(range(n)), (nll,) * n, (correct,) * n)


def test_record_metrics_by_hand() -> None:
    rp = RecordPrompts(
        rewrite=("r",),
        paraphrase=("p1", "p2"),
        neighborhood=("n1", "n2"),
        neighborhood_true=("T", "T"),
        target_new="N",
        target_true="T",
        generation=("r",),
    )
    assert rp.pairs() == [
        ("r", "N"),
        ("r", "T"),
        ("p1", "N"),
        ("p1", "T"),
        ("p2", "N"),
        ("p2", "T"),
        ("n1", "N"),
        ("n1", "T"),
        ("n2", "N"),
        ("n2", "T"),
    ]
    scores = [
        _ts(0.5, True),
        _ts(2.0, False),  # rewrite: new wins, new argmax
        _ts(1.0, False),
        _ts(0.2, True),  # p1: true wins
        _ts(0.1, True, 2),
        _ts(3.0, False),  # p2: new wins, both new tokens argmax
        _ts(2.0, False),
        _ts(1.0, True),  # n1: true wins and is argmax
        _ts(0.3, True),
        _ts(0.4, False),  # n2: new wins
    ]
    m = rp.metrics(scores)
    e = math.exp
    assert m["efficacy_acc"] == 1.0
    assert m["efficacy_score"] == 1.0
    assert m["efficacy_magnitude"] == pytest.approx(e(-0.5) - e(-2.0))
    assert m["paraphrase_acc"] == 0.5
    assert m["paraphrase_score"] == 0.5
    assert m["paraphrase_magnitude"] == pytest.approx(
        ((e(-1.0) - e(-0.2)) + (e(-0.1) - e(-3.0))) / 2
    )
    assert m["neighborhood_acc"] == 0.5
    assert m["neighborhood_score"] == 0.5
    assert m["neighborhood_magnitude"] == pytest.approx(
        ((e(-1.0) - e(-2.0)) + (e(-0.4) - e(-0.3))) / 2
    )


def test_perplexity_matches_plain_forward(tiny) -> None:  # type: ignore[no-untyped-def]
    texts = ["The river flows south to the sea.", "Bread is made from flour and water."]
    got = perplexities(tiny, texts, batch_size=2)
    for text, value in zip(texts, got, strict=True):
        ids = torch.tensor([tiny.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            logp = tiny.model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
        nll = -logp.gather(-1, ids[0, 1:, None]).mean()
        assert value == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_generation_is_seeded_per_row(tiny) -> None:  # type: ignore[no-untyped-def]
    prompts = ["The river", "A long prompt about the history of the old city and", "Bread"]
    seeds = [1, 2, 3]
    together = generate_texts(tiny, prompts, seeds, max_length=20, batch_size=8)
    alone = [
        generate_texts(tiny, [p], [s], max_length=20, batch_size=1)[0]
        for p, s in zip(prompts, seeds, strict=True)
    ]
    assert together == alone
    other = generate_texts(tiny, prompts, [4, 5, 6], max_length=20)
    assert other != together
    n = len(tiny.tokenizer(together[2])["input_ids"])
    assert 15 <= n <= 22  # ~max_length tokens in total, prompt included


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_row_edits_equal_applied_weights(tokenizer, family: str) -> None:  # type: ignore[no-untyped-def]
    lm = make_tiny(family, tokenizer, seed=2)
    edits = []
    for k, layer in enumerate([0, 2]):
        module = lm.arch.resolve(layer, "ff2").module
        name = next(n for n, m in lm.model.named_modules() if m is module) + ".weight"
        torch.manual_seed(10 + k)
        delta = 0.3 * torch.randn_like(module.weight)
        req = RewriteRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome")
        edits.append(Edit.from_deltas(lm, {name: delta}, "test", {}, [req]))
    assert all(hookable(lm.model, e) for e in edits)
    owner = [0, 0, 1, 1, None, None, 1, 0]
    pairs = PAIRS * 2
    hooks = RowEdits(lm.model, edits)
    with hooks.installed():
        got = score_targets(
            lm, pairs, batch_size=8, on_batch=lambda idx: hooks.set_rows([owner[i] for i in idx])
        )
    for pair, who, g in zip(pairs, owner, got, strict=True):
        if who is None:
            want = score_targets(lm, [pair])[0]
        else:
            with edits[who].applied(lm.model):
                want = score_targets(lm, [pair])[0]
        assert g.nlls == pytest.approx(want.nlls, abs=1e-4)
        assert g.correct == want.correct
    base = score_targets(lm, pairs[:1])[0]
    assert got[0].nlls != pytest.approx(base.nlls, abs=1e-3)  # the edit did change something
