"""A rewrite request's prompt and new target as token ids, and the subject check.

Every editor tokenises through here (and so through ``tokens.encode_request``): the prompt with
BOS when the tokenizer adds one, the target with a space prepended when missing, as the paper's
code does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from backward_lens.errors import InputError
from backward_lens.models import LensModel
from backward_lens.tokens import encode_request, locate_subject


@dataclass(frozen=True)
class EditTokens:
    """Token ids of one rewrite: the prompt and the new target.

    Attributes:
        prompt_ids: the prompt, BOS included if the tokenizer adds one.
        target_ids: the new target, a space prepended when missing (as the paper's code does).
        target_text: the target text as encoded.
    """

    prompt_ids: list[int]
    target_ids: list[int]
    target_text: str

    @property
    def first_target(self) -> int:
        """The new target's first token id (what forward pass shift writes towards)."""
        return self.target_ids[0]


def edit_tokens(lm: LensModel, prompt: str, target: str) -> EditTokens:
    """Tokenise a prompt and its new target with the package's checks.

    Raises:
        EmptyPromptError: an empty prompt.
        TargetError: an empty target, unknown to the tokenizer or merging with the prompt.
        PromptTooLongError: prompt plus target longer than the model's context.
    """
    enc = encode_request(
        lm.tokenizer, prompt, target, multi_token="teacher_forced", max_length=lm.context_length
    )
    return EditTokens(list(enc.prompt_ids), list(enc.all_target_ids), enc.target_text)


def require_subjects(lm: LensModel, requests: Sequence[Any], method: str) -> None:
    """Check that every request's subject is located in its prompt, before any expensive work.

    ROME and MEMIT key on the subject's last token (``tokens.locate_subject``).

    Raises:
        InputError: an empty subject, or one the prompt does not contain.
    """
    for request in requests:
        if not request.subject or not request.subject.strip():
            raise InputError(
                f"{method} edits at the subject's last token: give the subject, e.g. "
                "subject='Eiffel Tower' (--subject on the command line)"
            )
        locate_subject(lm.tokenizer, request.prompt, request.subject)
