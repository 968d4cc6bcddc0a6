r"""The one encoding contract: prompts, targets, subjects and token labels for any tokenizer.

Every entry point (capture and explain, scoring and evaluation, the study's segments, every editor,
the viewer) tokenises through this module, so one (prompt, target) pair means the same tokens
everywhere. The contract, following lm-evaluation-harness (``_encode_pair``):

1. White space at the prompt's end moves into the target (``"...city of " + "Rome"`` is the prompt
   ``"...city of"`` and the target ``" Rome"``; a target with white space of its own keeps only
   that). A target that then starts without white space gets one space (the paper's code prepends
   one), unless ``add_space=False``.
2. The target's tokens are those that follow the prompt's tokens in the tokenizer's own encoding of
   ``prompt + target``: ``" Rome"`` is ``▁Rome`` after a Phi-3 prompt, although ``" Rome"`` alone
   encodes to ``['▁', '▁Rome']``. If the tokenizer merges the prompt's end with the target's start,
   the pair is refused rather than trained on a token the model never sees after that prompt.
3. Special tokens come from the tokenizer's post-processor, once: its prefix (BOS) is put before
   the prompt unless the prompt already starts with it; its suffix (an EOS some tokenizers append)
   is dropped, so the loss is read at the prompt's last real token.
4. A subject is located by character offsets in the prompt, after stripping its surrounding white
   space; the subject's tokens are those whose characters overlap it.
5. Token labels are readable and distinct: byte pieces of multi-byte characters are shown as
   ``\xNN`` escapes instead of ``'�'``, SentencePiece's ``▁`` as a space.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from backward_lens.errors import (
    EmptyPromptError,
    InputError,
    MultiTokenTargetError,
    PromptTooLongError,
    TargetError,
)

MultiTokenPolicy = Literal["error", "first", "teacher_forced"]
MULTI_TOKEN_POLICIES: tuple[str, ...] = ("error", "first", "teacher_forced")


@dataclass(frozen=True)
class EncodedRequest:
    """Token ids of one prompt and its target, under the encoding contract of this module.

    Attributes:
        prompt: the prompt as encoded (white space at its end moved into the target).
        target_text: the target as encoded (the moved white space or an added space included).
        prompt_ids: prompt token ids, the tokenizer's prefix special tokens (BOS) included.
        target_ids: target ids used by the loss: one id, or all of them when teacher forcing.
        all_target_ids: every id of the target, as it follows the prompt.
    """

    prompt: str
    target_text: str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    all_target_ids: tuple[int, ...]

    @property
    def input_ids(self) -> tuple[int, ...]:
        """What the model reads: the prompt, then ``target_ids[:-1]`` (teacher forcing).

        Position ``len(prompt_ids) - 1 + j`` predicts ``target_ids[j]``; the length is the n of
        every captured factor.
        """
        return self.prompt_ids + self.target_ids[:-1]

    @property
    def n_loss_positions(self) -> int:
        """How many positions the loss reads (1 for the paper's single-token loss)."""
        return len(self.target_ids)


def context_length(config: Any) -> int | None:
    """The model's context size from its config, or None if the config does not say."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# --------------------------------------------------------------------------- special tokens


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def special_affixes(tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The special tokens the tokenizer's post-processor puts before and after a text.

    Found by encoding a probe with and without special tokens (works for BOS-adding
    SentencePiece tokenizers, EOS-appending ones and tokenizers that add nothing).

    Returns:
        ``(prefix, suffix)`` token ids, e.g. ``((1,), ())`` for Llama-2.
    """
    probe = "a b"
    plain = _ids(tokenizer, probe, False)
    full = _ids(tokenizer, probe, True)
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return tuple(full[:i]), tuple(full[i + len(plain) :])
    return (), ()


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a text read on its own: the prefix special tokens once, no suffix.

    This is what a prompt is when nothing follows it (generation, perplexity, the viewer's
    predictions). A text that already starts with the prefix (a literal ``<s>``) keeps one.
    """
    plain = _ids(tokenizer, text, False)
    prefix, _ = special_affixes(tokenizer)
    if prefix and plain[: len(prefix)] == list(prefix):
        return plain
    return [*prefix, *plain]


def move_space(prompt: str, target: str, add_space: bool = True) -> tuple[str, str]:
    """Move white space at the prompt's end into the target; add a space if the target has none.

    ``("...of ", "Rome")`` -> ``("...of", " Rome")``; ``("...of", "Rome")`` -> ``("...of",
    " Rome")`` (the paper's convention) unless ``add_space`` is False. A target that starts
    with white space of its own keeps it and the prompt's trailing white space is dropped
    (``("...of ", " Rome")`` -> ``("...of", " Rome")``): a space typed on both sides means one
    separator, not two.
    """
    stripped = prompt.rstrip()
    if not target[:1].isspace():
        target = prompt[len(stripped) :] + target
    if add_space and target and not target[0].isspace():
        target = " " + target
    return stripped, target


def encode_continuation(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Split ``tok(prompt + target)`` into the prompt's ids and the target's ids.

    No white space is moved here (see :func:`move_space`); the prompt's ids carry the prefix
    special tokens, the target's ids never carry special tokens.

    Raises:
        TargetError: the target encodes to no token, or the tokenizer merges the prompt's last
            characters with the target's first ones (the prompt's tokens are not a prefix of the
            whole's), so no token sequence of the prompt is followed by the target.
    """
    plain_prompt = _ids(tokenizer, prompt, False)
    whole = _ids(tokenizer, prompt + target, False)
    if whole[: len(plain_prompt)] != plain_prompt:
        raise TargetError(
            f"this tokenizer merges the end of the prompt {prompt[-20:]!r} with the start of the "
            f"target {target!r} into one token; end the prompt at a word boundary or start the "
            "target with a space"
        )
    target_ids = whole[len(plain_prompt) :]
    if not target_ids:
        raise TargetError(f"the target {target!r} encodes to no token")
    prefix, _ = special_affixes(tokenizer)
    if prefix and plain_prompt[: len(prefix)] != list(prefix):
        plain_prompt = [*prefix, *plain_prompt]
    return plain_prompt, target_ids


def continuation_text(tokenizer: Any, context: Sequence[int], ids: Sequence[int]) -> str:
    r"""The text ``ids`` add after ``context``.

    Decoded in context, so SentencePiece's leading ``▁`` becomes a space; contains ``'\ufffd'``
    if ``ids`` end inside a character.
    """
    before = tokenizer.decode(list(context), skip_special_tokens=True)
    after = tokenizer.decode([*context, *ids], skip_special_tokens=True)
    return after[len(before) :] if after.startswith(before) else tokenizer.decode(list(ids))


def encode_request(
    tokenizer: Any,
    prompt: str,
    target: str,
    *,
    multi_token: MultiTokenPolicy = "error",
    add_space: bool = True,
    max_length: int | None = None,
) -> EncodedRequest:
    """Tokenise and validate one (prompt, target) pair under the module's contract.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt: the text before the target; white space at its end moves into the target.
        target: the new object, e.g. ``" Rome"``.
        multi_token: what to do when the target is several tokens: ``"error"`` (default, the
            paper's single-token loss), ``"first"`` (use the first token, as the paper's editing
            code does) or ``"teacher_forced"`` (sum the NLL of every token, teacher-forced).
        add_space: prepend a space to a target that starts without white space (the official
            code's convention).
        max_length: the model's context size; longer inputs are refused.

    Raises:
        EmptyPromptError: the prompt is empty or white space.
        TargetError: the target is empty, unknown to the tokenizer or merges with the prompt.
        MultiTokenTargetError: several target tokens under ``multi_token="error"``.
        PromptTooLongError: the input does not fit ``max_length``.
        InputError: an unknown ``multi_token`` policy.
    """
    if multi_token not in MULTI_TOKEN_POLICIES:
        raise InputError(
            f"unknown multi-token policy {multi_token!r}; use one of "
            f"{', '.join(MULTI_TOKEN_POLICIES)}"
        )
    if not prompt or not prompt.strip():
        raise EmptyPromptError("the prompt is empty; give the text that precedes the target")
    if not target or not target.strip():
        raise TargetError(
            "the target is empty; give the token the model should predict, e.g. ' Rome'"
        )
    prompt, target = move_space(prompt, target, add_space)
    prompt_ids, target_ids = encode_continuation(tokenizer, prompt, target)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in target_ids:
        raise TargetError(
            f"the target {target!r} contains characters this tokenizer does not know "
            f"(it encodes to the unknown token {tokenizer.unk_token!r}); choose another target"
        )
    used = target_ids
    if len(target_ids) > 1:
        if multi_token == "error":
            pieces = token_labels(tokenizer, target_ids)
            first = continuation_text(tokenizer, prompt_ids, target_ids[:1])
            hint = (
                f"pass a one-token target such as {first!r}, or choose"
                if first.strip() and "\ufffd" not in first
                else "choose"
            )
            raise MultiTokenTargetError(
                f"the target {target!r} is {len(target_ids)} tokens {pieces}; the paper's loss "
                f"uses one token: {hint} --first-token (use the first token) or --teacher-forced "
                "(all tokens)"
            )
        if multi_token == "first":
            used = target_ids[:1]
    request = EncodedRequest(prompt, target, tuple(prompt_ids), tuple(used), tuple(target_ids))
    if max_length is not None and len(request.input_ids) > max_length:
        raise PromptTooLongError(
            f"the prompt is {len(request.input_ids)} tokens but the model's context holds "
            f"{max_length}; shorten the prompt"
        )
    return request


# --------------------------------------------------------------------------- subjects


def locate_subject(
    tokenizer: Any,
    prompt: str,
    subject: str,
    *,
    ids: Sequence[int] | None = None,
    occurrence: int = 0,
    search_from: int = 0,
) -> tuple[list[int], tuple[int, int]]:
    """Find the subject's tokens in ``prompt``, encoded as :func:`encode_text` unless ``ids`` given.

    The subject is stripped of surrounding white space and found in the prompt's characters
    (``occurrence``-th occurrence at or after character ``search_from``, 0 = first; ROME puts
    sampled prefixes before the prompt and searches after them); its tokens are those whose
    character offsets overlap it, so a leading-space token (``" Tower"``) or a token merged with a
    neighbour (``"Messi's"``) counts, and a token outside the subject (``" is"``) never does.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt: the text holding the subject.
        subject: the subject's words.
        ids: the prompt's ids if already encoded (must be :func:`encode_text` of ``prompt``).
        occurrence: which occurrence of the subject (0 = first).
        search_from: the character of ``prompt`` the search starts at.

    Returns:
        ``(ids, (start, end))``: the prompt's ids (prefix special tokens included) and the
        subject's token range ``[start, end)`` in them; ``end - 1`` is the subject's last token.

    Raises:
        InputError: the subject is empty, not in the prompt, or covered by no token.
    """
    text = subject.strip()
    if not text:
        raise InputError("the subject is empty; give the words of the prompt the fact is about")
    c0 = search_from - 1
    for _ in range(occurrence + 1):
        c0 = prompt.find(text, c0 + 1)
        if c0 < 0:
            raise InputError(f"the subject {text!r} was not found in the prompt {prompt!r}")
    c1 = c0 + len(text)
    ids = encode_text(tokenizer, prompt) if ids is None else list(ids)
    spans = token_spans(tokenizer, prompt, ids)
    covered = [i for i, (a, b) in enumerate(spans) if b > a and a < c1 and b > c0]
    if not covered:
        raise InputError(f"no token covers the subject {text!r} in {prompt!r}")
    return ids, (covered[0], covered[-1] + 1)


def token_spans(tokenizer: Any, text: str, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character span ``[a, b)`` of each token of ``ids`` (= :func:`encode_text` of ``text``).

    Special tokens get ``(0, 0)``. Fast tokenizers report offsets; for slow ones growing
    prefixes are decoded (O(n^2) decoding, fine for prompts) and each token gets the characters
    it adds.
    """
    ids = list(ids)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        plain, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        start = len(ids) - len(plain)
        if start >= 0 and ids[start:] == plain:
            found = [(0, 0)] * start + [(int(a), int(b)) for a, b in offsets]
            return [(0, 0) if t in special else s for t, s in zip(ids, found, strict=True)]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        pass
    spans: list[tuple[int, int]] = []
    previous = 0
    kept: list[int] = []
    for token_id in ids:
        if token_id in special:
            spans.append((0, 0))
            continue
        kept.append(token_id)
        decoded = tokenizer.decode(kept, skip_special_tokens=True)
        end = min(len(decoded), len(text))
        spans.append((previous, max(previous, end)))
        previous = max(previous, end)
    return spans


# --------------------------------------------------------------------------- labels


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte.

    Source: Radford et al. 2019, ``bytes_to_unicode`` in the GPT-2 release.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _scheme(tokenizer: Any) -> str:
    """How vocabulary pieces spell bytes.

    Returns:
        ``"byte_level"`` (GPT-2 ``Ġ``), ``"sentencepiece"`` (``▁`` and ``<0xNN>``) or ``"text"``
        (anything else: labels come from ``decode``).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = str(getattr(backend, "decoder", "")) if backend is not None else ""
    if "ByteLevel" in decoder:
        return "byte_level"
    if "▁" in decoder or "ByteFallback" in decoder or "Metaspace" in decoder:
        return "sentencepiece"
    return "text"


def _piece_bytes(piece: str, scheme: str) -> bytes | None:
    if scheme == "byte_level":
        table = _byte_decoder()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return None
    if scheme == "sentencepiece":
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("▁", " ").encode("utf-8")
    return None


def token_labels(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    r"""A readable, context-free label for each token id.

    Whole characters read as text, with a leading space where the token has one (SentencePiece
    ``▁Rome`` -> ``" Rome"``); bytes that are not a whole UTF-8 character are escaped
    (``'\xf0\x9f'``), so the pieces of one emoji get distinct labels instead of ``'�'`` each;
    special tokens keep their names (``<s>``). Token ids stay the identity: JSON outputs carry them.
    """
    scheme = _scheme(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pieces = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    labels: list[str] = []
    for token_id, piece in zip(ids, pieces, strict=True):
        tid = int(token_id)
        data = None if piece is None or tid in special else _piece_bytes(piece, scheme)
        if data is not None:
            labels.append(data.decode("utf-8", errors="backslashreplace"))
        elif piece is not None and tid in special:
            labels.append(piece)
        else:
            text = tokenizer.decode([tid])
            labels.append(piece if piece is not None and "\ufffd" in text else text)
    return labels
