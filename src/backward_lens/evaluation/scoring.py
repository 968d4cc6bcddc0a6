"""Teacher-forced scoring of many (prompt, target) pairs in few padded forward passes.

CounterFact metrics only need, per pair, the NLL of every target token given the prompt and the
tokens before it, and whether each token is the greedy argmax at its position. All pairs go into
left-padded batches (sorted by length so little is padding) with explicit position ids, and only
the last ``max(m)`` positions are unembedded, so the cost is one forward per batch.

``on_batch(indices)`` is called before each forward with the indices of the sequences in it; the
harness uses it to tell per-row edit hooks which record each row belongs to.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from backward_lens.batching import eval_mode, input_device, model_inputs, pad_batch, pad_id
from backward_lens.models import LensModel
from backward_lens.tokens import EncodedRequest, encode_request

BatchCallback = Callable[[list[int]], None]
"""Called with the input indices of each batch before its forward pass (per-row edits hook in)."""


@dataclass(frozen=True)
class TargetScore:
    """How well a model predicts one target after one prompt (teacher-forced).

    Attributes:
        prompt / target: the texts scored (``target`` as tokenised, space included).
        token_ids: the target's token ids.
        nlls: NLL (nats) of each target token.
        correct: whether each target token is the argmax at its position.
    """

    prompt: str
    target: str
    token_ids: tuple[int, ...]
    nlls: tuple[float, ...]
    correct: tuple[bool, ...]

    @property
    def mean_nll(self) -> float:
        """Mean per-token NLL: what ROME/MEMIT's evaluator compares between targets."""
        return sum(self.nlls) / len(self.nlls)

    @property
    def prob(self) -> float:
        """exp(-mean NLL): the per-token geometric-mean probability (ROME's magnitude uses it)."""
        return math.exp(-self.mean_nll)

    @property
    def all_correct(self) -> bool:
        """Greedy exact match: every target token is the argmax (the paper's accuracy)."""
        return all(self.correct)


def encode_pair(lm: LensModel, prompt: str, target: str) -> EncodedRequest:
    """Encode one pair for teacher forcing (every target token scored).

    Raises:
        InputError: the encoding errors of :func:`backward_lens.tokens.encode_request`.
    """
    return encode_request(
        lm.tokenizer, prompt, target, multi_token="teacher_forced", max_length=lm.context_length
    )


@torch.no_grad()
def score_sequences(
    lm: LensModel,
    sequences: Sequence[Sequence[int]],
    n_scored: Sequence[int],
    *,
    batch_size: int = 32,
    on_batch: BatchCallback | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Per-token NLL and argmax hit of the last ``n_scored[i]`` tokens of each sequence.

    The model runs in eval mode (dropout off; its modes are restored afterwards), so two runs
    give the same numbers whatever mode the model was left in.

    Args:
        lm: the model.
        sequences: token ids; token ``j`` is predicted from tokens ``< j``.
        n_scored: how many final tokens of each sequence to score (``1 <= n < len``).
        batch_size: sequences per forward pass (1 = one sequence at a time).
        on_batch: called with the sequence indices of each batch before its forward pass.

    Returns:
        For each sequence, ``(nll [n], correct [n] bool)`` on the CPU, in input order; NLLs in
        nats, computed in float32.
    """
    model = lm.model
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(sequences)
    step = max(1, batch_size)
    with eval_mode(model):
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            batch = pad_batch(
                [list(sequences[i][:-1]) for i in idx],
                pad_id(lm.tokenizer),
                device=input_device(model),
            )
            n_keep = max(n_scored[i] for i in idx)
            if on_batch is not None:
                on_batch(idx)
            kwargs = model_inputs(model, batch, logits_to_keep=n_keep)
            logits = model(**kwargs).logits[:, -n_keep:]  # [B, n_keep, V]
            for b, i in enumerate(idx):
                m = n_scored[i]
                rows = logits[b, n_keep - m :].float()  # [m, V]
                ids = torch.tensor(sequences[i][-m:], dtype=torch.long, device=rows.device)
                nll = -rows.log_softmax(-1).gather(-1, ids[:, None])[:, 0]
                correct = rows.argmax(-1) == ids
                out[i] = (nll.cpu(), correct.cpu())
    return [o for o in out if o is not None]


def score_targets(
    lm: LensModel,
    pairs: Sequence[tuple[str, str]] | Sequence[EncodedRequest],
    *,
    batch_size: int = 32,
    on_batch: BatchCallback | None = None,
) -> list[TargetScore]:
    """Score ``(prompt, target)`` pairs (or pre-encoded requests) in padded batches.

    Pairs are encoded under the package's contract (``tokens.encode_request``): white space at
    a prompt's end moves into the target, a space is prepended to a target that lacks one (the
    official code's convention), and the target's tokens are those that follow the prompt.

    Args:
        lm: the model.
        pairs: ``(prompt, target)`` strings, or requests already encoded.
        batch_size: sequences per forward pass.
        on_batch: called with the pair indices of each batch before its forward pass.

    Returns:
        One :class:`TargetScore` per pair, in input order.

    Raises:
        InputError: a pair that cannot be encoded (see :func:`encode_pair`).
    """
    encoded = [p if isinstance(p, EncodedRequest) else encode_pair(lm, *p) for p in pairs]
    seqs = [r.prompt_ids + r.target_ids for r in encoded]
    results = score_sequences(
        lm, seqs, [len(r.target_ids) for r in encoded], batch_size=batch_size, on_batch=on_batch
    )
    return [
        TargetScore(
            prompt=r.prompt,
            target=r.target_text,
            token_ids=r.target_ids,
            nlls=tuple(float(v) for v in nll),
            correct=tuple(bool(v) for v in ok),
        )
        for r, (nll, ok) in zip(encoded, results, strict=True)
    ]
