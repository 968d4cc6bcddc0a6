"""ROME segmentation from token offsets, on the prompts that break template re-tokenising."""

from __future__ import annotations

import copy

import pytest
from tokenizers.processors import TemplateProcessing

from backward_lens.data import load_records
from backward_lens.errors import DataError
from backward_lens.study.segments import SEGMENTS, segment_prompt
from tests.paths import COUNTERFACT_EDIT

COUNTERFACT = str(COUNTERFACT_EDIT)


def _seg(tok, prompt: str, subject: str, occurrence: int = 0):
    ids = tok(prompt, add_special_tokens=True)["input_ids"]
    return ids, segment_prompt(tok, prompt, subject, ids, occurrence)


def _span_text(tok, ids, seg) -> str:
    return tok.decode(ids[seg.subject[0] : seg.subject[1]])


def _check_rome_indexing(seg) -> None:
    """The six ROME segments, exactly as causal_trace.py indexes them."""
    s, e = seg.subject
    p = seg.positions
    assert p["first_subject"] == [s] and p["last_subject"] == [e - 1]
    assert p["middle_subject"] == list(range(s + 1, e - 1))
    assert p["first_subsequent"] == ([e] if e < seg.n else [])
    assert p["further"] == list(range(e + 1, seg.n - 1))
    assert p["last"] == [seg.n - 1]
    assert set(p) == set(SEGMENTS)
    covered = {i for pos in p.values() for i in pos}
    assert covered == set(range(seg.n))  # every position belongs to some segment


def test_subject_in_the_middle(tokenizer) -> None:
    prompt = "The mother tongue of Danielle Darrieux is"
    ids, seg = _seg(tokenizer, prompt, "Danielle Darrieux")
    assert _span_text(tokenizer, ids, seg).strip() == "Danielle Darrieux"
    before = tokenizer.decode(ids[: seg.subject[0]])
    assert before == "The mother tongue of"
    assert seg.positions["prefix"] == list(range(seg.subject[0])) and seg.positions["bos"] == []
    _check_rome_indexing(seg)


def test_subject_at_the_start(tokenizer) -> None:
    ids, seg = _seg(tokenizer, "Danielle Darrieux was born in", "Danielle Darrieux")
    assert seg.subject[0] == 0 and seg.positions["prefix"] == []
    assert _span_text(tokenizer, ids, seg) == "Danielle Darrieux"
    _check_rome_indexing(seg)


def test_one_token_subject_and_subject_at_the_end(tokenizer) -> None:
    _, seg = _seg(tokenizer, "The capital of France is Paris", "Paris")
    s, e = seg.subject
    assert e - s == 1 and e == seg.n  # one token, at the very end
    p = seg.positions
    assert p["first_subject"] == p["last_subject"] == p["last"] == [seg.n - 1]
    assert p["first_subsequent"] == [] and p["middle_subject"] == []
    _check_rome_indexing(seg)


def test_repeated_subject_uses_the_given_occurrence(tokenizer) -> None:
    prompt = "Paris is Paris, and Paris lies in"
    ids, first = _seg(tokenizer, prompt, "Paris", 0)
    _, third = _seg(tokenizer, prompt, "Paris", 2)
    assert first.subject[0] == 0
    assert third.subject[0] > first.subject[0]
    assert tokenizer.decode(ids[third.subject[0] : third.subject[1]]).strip() == "Paris"
    assert tokenizer.decode(ids[: third.subject[0]]) == "Paris is Paris, and"
    with pytest.raises(DataError):
        _seg(tokenizer, prompt, "Paris", 3)


def test_subject_split_mid_token_or_merged_with_neighbours(tokenizer) -> None:
    # "Dan" ends inside the token " Danielle"-piece: the whole covering token is the subject.
    ids, seg = _seg(tokenizer, "The mother tongue of Danielle is", "Dan")
    text = _span_text(tokenizer, ids, seg)
    assert "Dan" in text and seg.subject[1] - seg.subject[0] == 1
    # A possessive glued to the subject: the subject span covers the subject, not " is".
    ids, seg = _seg(tokenizer, "Lionel Messi's club is", "Lionel Messi")
    text = _span_text(tokenizer, ids, seg)
    assert text.startswith("Lionel Messi") and "club" not in text
    _check_rome_indexing(seg)


def test_subject_missing_or_empty(tokenizer) -> None:
    ids = tokenizer("Rome is nice", add_special_tokens=True)["input_ids"]
    with pytest.raises(DataError, match="not found"):
        segment_prompt(tokenizer, "Rome is nice", "Paris", ids)
    with pytest.raises(DataError, match="empty"):
        segment_prompt(tokenizer, "Rome is nice", "  ", ids)


def _with_bos(tokenizer):
    """A copy of the BOS-less tokenizer (SmolLM2's special tokens) that prepends BOS, as Llama."""
    tok = copy.deepcopy(tokenizer)
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    return tok, bos


def test_bos_tokenizer_puts_bos_in_its_own_segment(tokenizer) -> None:
    tok, bos = _with_bos(tokenizer)
    prompt = "Danielle Darrieux was born in"
    ids, seg = _seg(tok, prompt, "Danielle Darrieux")
    assert ids[0] == bos and seg.positions["bos"] == [0]
    assert seg.subject[0] == 1 and seg.positions["prefix"] == []
    plain_ids, plain = _seg(tokenizer, prompt, "Danielle Darrieux")
    assert ids[1:] == plain_ids
    assert (seg.subject[0] - 1, seg.subject[1] - 1) == plain.subject
    _check_rome_indexing(seg)


def test_slow_tokenizer_fallback_matches_offsets(tokenizer) -> None:
    """Without offsets (slow tokenisers) the decode-prefix fallback finds the same span."""

    class NoOffsets:
        def __init__(self, tok) -> None:
            self.tok = tok
            self.all_special_ids = tok.all_special_ids

        def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
            if return_offsets_mapping:
                raise NotImplementedError
            return self.tok(text, add_special_tokens=add_special_tokens)

        def decode(self, ids, **kw):
            return self.tok.decode(ids, **kw)

    for prompt, subject in [
        ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
        ("Lionel Messi's club is", "Lionel Messi"),
        ("Toko Yasuda, the", "Toko Yasuda"),
    ]:
        ids, fast = _seg(tokenizer, prompt, subject)
        slow = segment_prompt(NoOffsets(tokenizer), prompt, subject, ids)
        assert slow == fast


def test_every_counterfact_subject_is_found(tokenizer) -> None:
    """200 real records: the decoded span always contains the subject and nothing before it."""
    for r in load_records(COUNTERFACT, sample=200, seed=1):
        ids, seg = _seg(tokenizer, r.prompt, r.subject)
        s, e = seg.subject
        assert r.subject.strip() in tokenizer.decode(ids[s:e])
        assert r.subject.strip() not in tokenizer.decode(ids[s + 1 : e])  # no extra token before
        _check_rome_indexing(seg)


@pytest.mark.slow
def test_gemma_tokenizer_with_real_bos(gemma3) -> None:
    tok = gemma3.tokenizer
    for prompt, subject in [
        ("Danielle Darrieux was born in", "Danielle Darrieux"),
        ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
        ("Lionel Messi's club is", "Lionel Messi"),
    ]:
        ids, seg = _seg(tok, prompt, subject)
        assert ids[0] == tok.bos_token_id and seg.positions["bos"] == [0]
        assert tok.decode(ids[seg.subject[0] : seg.subject[1]]).strip().startswith(subject)
        _check_rome_indexing(seg)
