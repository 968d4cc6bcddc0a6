"""Request encoding: every bad input gets its own error and a message saying what to do."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from backward_lens.errors import (
    EmptyPromptError,
    MultiTokenTargetError,
    PromptTooLongError,
    TargetError,
)
from backward_lens.tokens import encode_request
from tokenizers import Tokenizer, models, pre_tokenizers


def test_single_token_target_with_space_prepended(tokenizer) -> None:
    r = encode_request(tokenizer, "The Eiffel Tower is located in the city of", "Rome")
    assert r.target_text == " Rome"
    assert r.target_ids == tuple(tokenizer(" Rome", add_special_tokens=False)["input_ids"])
    assert r.input_ids == r.prompt_ids and r.n_loss_positions == 1
    # White space at the prompt's end moves into the target (issue 9, item 2): the model is
    # trained on " Rome" after "of", never on "Rome" after a lone space token.
    moved = encode_request(tokenizer, "in the city of ", "Rome")
    assert moved.prompt == "in the city of" and moved.target_text == " Rome"
    assert moved.target_ids == r.target_ids


def test_multi_token_target_policies(tokenizer) -> None:
    with pytest.raises(MultiTokenTargetError) as err:
        encode_request(tokenizer, "Her name is", " Danielle Darrieux")
    message = str(err.value)
    assert "tokens" in message and "--first-token" in message and "\n" not in message
    first = encode_request(tokenizer, "Her name is", " Danielle Darrieux", multi_token="first")
    forced = encode_request(
        tokenizer, "Her name is", " Danielle Darrieux", multi_token="teacher_forced"
    )
    assert len(first.target_ids) == 1 and first.target_ids[0] == forced.target_ids[0]
    assert forced.input_ids == forced.prompt_ids + forced.target_ids[:-1]


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_empty_prompt(tokenizer, prompt: str) -> None:
    with pytest.raises(EmptyPromptError, match="empty"):
        encode_request(tokenizer, prompt, " Rome")


@pytest.mark.parametrize("target", ["", "  "])
def test_empty_target(tokenizer, target: str) -> None:
    with pytest.raises(TargetError, match="empty"):
        encode_request(tokenizer, "The city of", target)


def test_prompt_longer_than_context(tokenizer) -> None:
    with pytest.raises(PromptTooLongError, match="shorten"):
        encode_request(tokenizer, "word " * 40, " Rome", max_length=32)


def test_unknown_target_token() -> None:
    vocab = {"[UNK]": 0, "the": 1, "city": 2, "of": 3, "Rome": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    assert encode_request(tok, "the city of", "Rome").target_ids == (4,)
    with pytest.raises(TargetError, match="unknown token"):
        encode_request(tok, "the city of", "Atlantis")
