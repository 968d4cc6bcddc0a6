"""Turning a (prompt, target) pair into token ids, with the checks the paper's recipe needs.

The paper's loss is the NLL of one target token at the last prompt position; its code prepends a
space to the target. Users trip over leading spaces, BOS tokens and multi-token targets, so every
choice made here is explicit in :class:`EncodedRequest` and reported back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from backward_lens.errors import (
    EmptyPromptError,
    MultiTokenTargetError,
    PromptTooLongError,
    TargetError,
)

MultiTokenPolicy = Literal["error", "first", "teacher_forced"]


@dataclass(frozen=True)
class EncodedRequest:
    """Token ids of one prompt and its target.

    Attributes:
        prompt: the prompt text as given.
        target_text: the target text actually tokenised (a space may have been prepended).
        prompt_ids: prompt token ids, BOS included if the tokenizer adds one.
        target_ids: target ids used by the loss: one id, or all of them when teacher forcing.
        all_target_ids: every id of the tokenised target.
        input_ids: what the model reads: the prompt, followed by ``target_ids[:-1]`` when teacher
            forcing (so that position ``len(prompt_ids) - 1 + j`` predicts ``target_ids[j]``).
    """

    prompt: str
    target_text: str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    all_target_ids: tuple[int, ...]

    @property
    def input_ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.target_ids[:-1]

    @property
    def n_loss_positions(self) -> int:
        return len(self.target_ids)


def context_length(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode_request(
    tokenizer: Any,
    prompt: str,
    target: str,
    *,
    multi_token: MultiTokenPolicy = "error",
    add_space: bool = True,
    max_length: int | None = None,
) -> EncodedRequest:
    """Tokenise and validate one request.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt: the text before the target.
        target: the new object, e.g. ``" Rome"``.
        multi_token: what to do when the target is several tokens: ``"error"`` (default, the
            paper's single-token loss), ``"first"`` (use the first token, as the paper's editing
            code does) or ``"teacher_forced"`` (sum the NLL of every token, teacher-forced).
        add_space: prepend a space to the target when neither it starts with nor the prompt ends
            with white space (the official code's convention).
        max_length: the model's context size; longer inputs are refused.
    """
    if not prompt or not prompt.strip():
        raise EmptyPromptError("the prompt is empty; give the text that precedes the target")
    if not target or not target.strip():
        raise TargetError(
            "the target is empty; give the token the model should predict, e.g. ' Rome'"
        )
    if add_space and not target[0].isspace() and not prompt[-1].isspace():
        target = " " + target
    prompt_ids = tuple(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    target_ids = tuple(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not target_ids:
        raise TargetError(f"the target {target!r} encodes to no token")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in target_ids:
        raise TargetError(
            f"the target {target!r} contains characters this tokenizer does not know "
            f"(it encodes to the unknown token {tokenizer.unk_token!r}); choose another target"
        )
    used = target_ids
    if len(target_ids) > 1:
        pieces = [tokenizer.decode([t]) for t in target_ids]
        if multi_token == "error":
            raise MultiTokenTargetError(
                f"the target {target!r} is {len(target_ids)} tokens {pieces}; the paper's loss "
                f"uses one token: pass a one-token target such as {pieces[0]!r}, or choose "
                "--first-token (use the first token) or --teacher-forced (all tokens)"
            )
        if multi_token == "first":
            used = target_ids[:1]
        elif multi_token != "teacher_forced":
            raise ValueError(f"unknown multi_token policy {multi_token!r}")
    request = EncodedRequest(prompt, target, prompt_ids, used, target_ids)
    if max_length is not None and len(request.input_ids) > max_length:
        raise PromptTooLongError(
            f"the prompt is {len(request.input_ids)} tokens but the model's context holds "
            f"{max_length}; shorten the prompt"
        )
    return request
