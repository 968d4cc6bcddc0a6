"""Per-record CounterFact metrics, in both definitions in use, plus fluency and perplexity.

Two families of metrics share names in the literature, so every key here says which it is:

* ``*_acc`` - the Backward Lens paper's Table 1 (MEMIT code's ``post_*_acc``): a prompt counts
  when **every** token of the target is the greedy argmax under teacher forcing; efficacy and
  paraphrase use ``target_new``, neighbourhood uses the true object (it must stay the argmax).
* ``*_score`` - ROME's Efficacy/Paraphrase/Neighborhood Score (``post_*_success``): a prompt
  counts when P(new) > P(true) (the reverse for neighbourhood prompts), with P = exp(-mean
  per-token NLL); ``*_magnitude`` is ROME's EM/PM/NM, the mean of P(new) - P(true) (reversed for
  neighbourhood).

Each per-record value is the mean over that record's prompts of the kind; the summary then takes
mean and std over records. Fluency is ROME's n-gram entropy; perplexity uses a fixed text set.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from backward_lens.batching import (
    cache_inputs,
    eval_mode,
    input_device,
    model_inputs,
    pad_batch,
    pad_id,
)
from backward_lens.data import FactRecord
from backward_lens.errors import InputError
from backward_lens.evaluation.scoring import BatchCallback, TargetScore, score_sequences
from backward_lens.models import LensModel
from backward_lens.tokens import encode_text

KINDS = ("efficacy", "paraphrase", "neighborhood")


@dataclass(frozen=True)
class RecordPrompts:
    """The prompts and targets one CounterFact record is scored on.

    Attributes:
        rewrite / paraphrase / neighborhood: prompts of each kind (EasyEdit layout: one each;
            ROME layout: 1, 2 and 10).
        neighborhood_true: the true object of each neighbourhood prompt.
        target_new / target_true: the record's new and true objects.
        generation: prompts for the fluency samples (ROME layout: ``generation_prompts``; the
            EasyEdit layout has none, so the rewrite prompt is used).
    """

    rewrite: tuple[str, ...]
    paraphrase: tuple[str, ...]
    neighborhood: tuple[str, ...]
    neighborhood_true: tuple[str, ...]
    target_new: str
    target_true: str
    generation: tuple[str, ...]

    @classmethod
    def from_record(cls, record: FactRecord) -> RecordPrompts:
        """Validate ``record`` and collect its prompts for scoring.

        Raises:
            InputError: (naming what is wrong) an empty prompt, a subject not in the prompt,
                an empty ``target_new`` or ``target_true``, the two equal, or neighbourhood
                prompts without one non-empty true object each.
        """
        if not record.prompt or not record.prompt.strip():
            raise InputError("the prompt is empty")
        if not record.subject or record.subject not in record.prompt:
            raise InputError(f"the subject {record.subject!r} does not occur in the prompt")
        if not record.target_new or not record.target_new.strip():
            raise InputError("target_new is empty")
        if not record.target_true or not record.target_true.strip():
            raise InputError("target_true is missing or empty")
        if record.target_new.strip() == record.target_true.strip():
            raise InputError("target_new equals target_true")
        truths = record.neighborhood_true or tuple(
            [record.target_true] * len(record.neighborhood_prompts)
        )
        if len(truths) != len(record.neighborhood_prompts):
            raise InputError("neighborhood prompts and their true objects differ in number")
        if any(not t or not t.strip() for t in truths):
            raise InputError("a neighborhood prompt has an empty true object")
        return cls(
            rewrite=(record.prompt,),
            paraphrase=tuple(record.paraphrase_prompts),
            neighborhood=tuple(record.neighborhood_prompts),
            neighborhood_true=tuple(truths),
            target_new=record.target_new,
            target_true=record.target_true,
            generation=tuple(record.generation_prompts) or (record.prompt,),
        )

    def pairs(self) -> list[tuple[str, str]]:
        """(prompt, target) pairs to score: for every prompt, its new then its true object."""
        out: list[tuple[str, str]] = []
        for p in self.rewrite + self.paraphrase:
            out += [(p, self.target_new), (p, self.target_true)]
        for p, true in zip(self.neighborhood, self.neighborhood_true, strict=True):
            out += [(p, self.target_new), (p, true)]
        return out

    def metrics(self, scores: Sequence[TargetScore]) -> dict[str, float | None]:
        """Accuracy, score and magnitude of each kind from the scores of :meth:`pairs`."""
        groups = {
            "efficacy": len(self.rewrite),
            "paraphrase": len(self.paraphrase),
            "neighborhood": len(self.neighborhood),
        }
        out: dict[str, float | None] = {}
        i = 0
        for kind in KINDS:
            acc, score, mag = [], [], []
            for _ in range(groups[kind]):
                new, true = scores[i], scores[i + 1]
                i += 2
                if kind == "neighborhood":
                    acc.append(float(true.all_correct))
                    score.append(float(true.mean_nll < new.mean_nll))
                    mag.append(true.prob - new.prob)
                else:
                    acc.append(float(new.all_correct))
                    score.append(float(new.mean_nll < true.mean_nll))
                    mag.append(new.prob - true.prob)
            out[f"{kind}_acc"] = _mean(acc)
            out[f"{kind}_score"] = _mean(score)
            out[f"{kind}_magnitude"] = _mean(mag)
        return out


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------
# Fluency: n-gram entropy

_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    """Words and punctuation marks, a regex stand-in for NLTK's ``word_tokenize``.

    ROME tokenises with NLTK's punkt-based tokenizer, whose data cannot be downloaded offline.
    This regex keeps runs of word characters (with an inner apostrophe: "don't") and each
    punctuation mark as tokens; it differs from NLTK only on contractions and a few symbols.
    """
    return _WORD.findall(text)


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's ``compute_n_gram_entropy``: mean over n of weight_n * H_n (bits).

    H_n is the entropy (log2) of the frequency distribution of word n-grams of ``text``. With the
    defaults this is (2/3 * H2 + 4/3 * H3) / 2; the tables multiply it by 100 (GPT-2 xl: ~627).
    """
    words = word_tokenize(text)
    values = []
    for n, w in zip(ns, weights, strict=True):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        values.append(w * h)
    return sum(values) / len(values)


def fluency(texts: Sequence[str]) -> float | None:
    """Mean n-gram entropy over texts (ROME's ``n_gram_entropy`` with arithmetic mean)."""
    return _mean([ngram_entropy(t) for t in texts])


@torch.no_grad()
def generate_texts(
    lm: LensModel,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    max_length: int = 100,
    top_k: int = 5,
    batch_size: int = 32,
    on_batch: BatchCallback | None = None,
) -> list[str]:
    """One top-k sampled continuation per prompt, prompt included (ROME's ``generate_fast``).

    Prompts run in left-padded batches with a KV cache; each is extended to ``max_length``
    tokens (prompt included), end-of-text suppressed, as ROME samples a fixed length. Each row
    samples from its own generator seeded with ``seeds[i]``, so a text does not depend on which
    other prompts share its batch or on what ran before.

    Args:
        lm: the model.
        prompts: the prompts to continue.
        seeds: one sampling seed per prompt.
        max_length: total length of each text in tokens, prompt included.
        top_k: sample from the ``top_k`` most probable tokens.
        batch_size: prompts per batch.
        on_batch: called with the prompt indices of each batch before it runs.

    Returns:
        The decoded texts (prompt included), in input order.
    """
    tok = lm.tokenizer
    model = lm.model
    device = input_device(model)
    eos = tok.eos_token_id
    texts: list[str] = []
    step = max(1, batch_size)
    with eval_mode(model):
        for start in range(0, len(prompts), step):
            chunk = list(range(start, min(len(prompts), start + step)))
            ids = [encode_text(tok, prompts[i]) for i in chunk]
            batch = pad_batch(ids, pad_id(tok))
            mask, positions = batch.attention_mask, batch.position_ids
            gens = [torch.Generator().manual_seed(int(seeds[i])) for i in chunk]
            if on_batch is not None:
                on_batch(chunk)
            kwargs = model_inputs(model, batch.to(device))
            out = model(**{**kwargs, "use_cache": True})
            new_tokens: list[list[int]] = [[] for _ in chunk]
            keep = [max(1, max_length - len(s)) for s in ids]  # each row ends near max_length
            n_new = max(keep)
            for t in range(n_new):
                logits = out.logits[:, -1].float().cpu()
                if eos is not None:
                    logits[:, eos] = -math.inf
                values, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
                probs = values.softmax(-1)
                picked = torch.stack(
                    [
                        indices[b, torch.multinomial(probs[b], 1, generator=g)]
                        for b, g in enumerate(gens)
                    ]
                )[:, 0]
                for b in range(len(chunk)):
                    new_tokens[b].append(int(picked[b]))
                if t == n_new - 1:
                    break
                mask = torch.cat([mask, torch.ones((len(chunk), 1), dtype=torch.long)], dim=1)
                positions = positions[:, -1:] + 1
                out = model(
                    input_ids=picked[:, None].to(device),
                    attention_mask=mask.to(device),
                    position_ids=positions.to(device),
                    use_cache=True,
                    **cache_inputs(model, out),
                )
            texts += [
                tok.decode(s + n[:k], skip_special_tokens=True)
                for s, n, k in zip(ids, new_tokens, keep, strict=True)
            ]
    return texts


# ---------------------------------------------------------------------------------------------
# Perplexity


def text_sequences(lm: LensModel, texts: Sequence[str], max_tokens: int = 256) -> list[list[int]]:
    """Token ids of each text (BOS if the tokenizer adds one), cut to ``max_tokens``.

    Raises:
        InputError: a text shorter than 2 tokens (nothing to predict).
    """
    seqs = [encode_text(lm.tokenizer, t)[:max_tokens] for t in texts]
    short = [t for t, s in zip(texts, seqs, strict=True) if len(s) < 2]
    if short:
        raise InputError(f"perplexity texts need at least 2 tokens: {short[0]!r}")
    return seqs


def perplexities(
    lm: LensModel,
    texts: Sequence[str],
    *,
    max_tokens: int = 256,
    batch_size: int = 32,
    on_batch: BatchCallback | None = None,
) -> list[float]:
    """exp(mean NLL of tokens 2..n) of each text; the metric is their mean (spec §6.2).

    Args:
        lm: the model.
        texts: the texts (each at least 2 tokens).
        max_tokens: texts are cut to this many tokens first.
        batch_size: texts per forward pass.
        on_batch: called with the text indices of each batch before its forward pass.

    Returns:
        One perplexity per text (NLL in nats, so e-based), in input order.

    Raises:
        InputError: a text shorter than 2 tokens.
    """
    seqs = text_sequences(lm, texts, max_tokens)
    scored = score_sequences(
        lm, seqs, [len(s) - 1 for s in seqs], batch_size=batch_size, on_batch=on_batch
    )
    return [math.exp(float(nll.mean())) for nll, _ in scored]
