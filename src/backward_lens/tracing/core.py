"""Causal tracing of one prompt, as ROME's ``experiments/causal_trace.py`` (Meng et al. 2022, §2.1).

Three runs of the same prompt:

- **clean**: the model as is; every block output ("hidden state"), MLP output and attention
  output at every position is kept;
- **corrupted**: Gaussian noise of standard deviation ``noise`` (ROME: 3x the standard deviation
  of the subjects' token embeddings) is added to the embeddings of the subject's tokens, in
  ``samples`` rows with different noise (ROME: 10, ``numpy.random.RandomState(1)``);
- **corrupted with restoration**: as corrupted, but one state is set back to its clean value:
  block ``l``'s output at token ``t`` (kind ``hidden``), or the MLP / attention outputs at token
  ``t`` of the ``window`` layers around ``l`` (kinds ``mlp`` / ``attn``; ROME's window of 10 is
  layers ``l-5 .. l+4``, clipped to the model).

The score of a restoration is the probability of the true object's first token at the last
position, averaged over the noise rows (ROME's ``trace_with_patch``: softmax per row, then the
mean). The MLP output is FF2's output (``down_proj``, ``c_proj``, ``fc2``...) and the attention
output is the output projection's (``o_proj``...), both found through the architecture adapter,
which equal ROME's ``mlp`` / ``attn`` module outputs.

Batching: many restorations of one prompt run as one batch of identical corrupted inputs, each
restoration owning ``samples`` rows, with per-row restoration hooks (as ROME patches rows 1..).
Only the blocks from the lowest layer any row restores run again: the corrupted run's inputs to
every block (masks, rotary embeddings, whatever the family passes) are recorded once per batch
size, and the blocks below are skipped, their corrupted output taken from that run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from backward_lens.batching import (
    Hooks,
    by_position,
    eval_mode,
    model_inputs,
    pad_batch,
    pad_id,
)
from backward_lens.errors import InputError
from backward_lens.models import LensModel
from backward_lens.tokens import encode_request, locate_subject, token_labels

KINDS: tuple[str, ...] = ("hidden", "mlp", "attn")
"""What a restoration sets back: block outputs, MLP (FF2) outputs, attention outputs."""

ROME_WINDOW = 10
ROME_SAMPLES = 10
ROME_NOISE_FACTOR = 3.0


@dataclass(frozen=True)
class TraceConfig:
    """Knobs of causal tracing (ROME's defaults).

    Attributes:
        samples: noise rows per restoration (ROME: 10); the score is their mean probability.
        window: layers restored together for ``mlp`` / ``attn`` (ROME: 10).
        noise_factor: the noise's standard deviation in units of the embedding std (ROME: 3).
        seed: seed of the noise (the same noise for every restoration of a prompt, as ROME).
        batch_rows: rows per forward pass (restorations x samples); memory, not results.
        kinds: which of :data:`KINDS` to trace.
    """

    # The metadata makes the command-line options (backward_lens.commands.options).
    samples: int = field(
        default=ROME_SAMPLES, metadata={"help": "noise samples per restoration", "min": 1}
    )
    window: int = field(
        default=ROME_WINDOW, metadata={"help": "layers restored together (mlp, attn)", "min": 1}
    )
    noise_factor: float = field(
        default=ROME_NOISE_FACTOR, metadata={"help": "noise std / embedding std", "flag": "--noise"}
    )
    seed: int = 1
    batch_rows: int = field(
        default=128,
        metadata={
            "help": "rows per forward pass (restorations x samples)",
            "min": 1,
            "flag": "--batch-size",
            "aliases": ["--batch-rows"],
        },
    )
    kinds: tuple[str, ...] = field(
        default=KINDS, metadata={"help": "what to restore, some of hidden,mlp,attn"}
    )

    def check(self) -> None:
        """Refuse a value that cannot be traced, before any work.

        Raises:
            InputError: ``samples``, ``window`` or ``batch_rows`` below 1, a negative or
                infinite ``noise_factor``, or no or unknown ``kinds``.
        """
        if self.samples < 1:
            raise InputError(f"--samples must be 1 or more, got {self.samples}")
        if self.window < 1:
            raise InputError(f"--window must be 1 or more, got {self.window}")
        if not self.noise_factor >= 0 or self.noise_factor == float("inf"):
            raise InputError(f"--noise must be a finite number >= 0, got {self.noise_factor}")
        if self.batch_rows < 1:
            raise InputError(f"--batch-size must be 1 or more, got {self.batch_rows}")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise InputError(f"unknown kinds {unknown}; use some of {', '.join(KINDS)}")


@dataclass(frozen=True)
class Restoration:
    """Set ``kind``'s clean value back at ``tokens`` in every layer of ``layers``.

    ``hidden``: block outputs; ``mlp``: FF2 outputs; ``attn``: attention output projections.
    """

    kind: str
    tokens: tuple[int, ...]
    layers: tuple[int, ...]

    @property
    def start(self) -> int:
        """The first block whose computation differs from the corrupted run."""
        low = min(self.layers)
        return low + 1 if self.kind == "hidden" else low


def window_layers(layer: int, window: int, n_layers: int) -> tuple[int, ...]:
    """ROME's window around ``layer``: ``range(max(0, l - w//2), min(L, l - (-w//2)))``."""
    return tuple(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def restorations_for(kind: str, n_tokens: int, n_layers: int, window: int) -> list[Restoration]:
    """Every (token, layer) restoration of ``kind``, token-major (the score grid [T, L])."""
    out = []
    for t in range(n_tokens):
        for layer in range(n_layers):
            layers = (layer,) if kind == "hidden" else window_layers(layer, window, n_layers)
            out.append(Restoration(kind, (t,), layers))
    return out


def _untuple(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _block_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


class Tracer:
    """Clean, corrupted and restored runs of one prompt (see the module docstring).

    Args:
        lm: the model.
        ids: the prompt's token ids (BOS included), all of which are read; [T].
        subject: token range ``[start, end)`` of the subject (the corrupted tokens).
        target_id: the token whose probability at the last position is the score.
        noise: the noise's absolute standard deviation (0: no corruption).
        samples: noise rows per restoration.
        seed: seed of the noise.
        batch_rows: most rows per forward pass.

    Attributes:
        clean_prob: the target's probability in the clean run.
        clean_top: the clean run's most likely next token.
        low: the target's probability in the corrupted run with nothing restored.
    """

    def __init__(
        self,
        lm: LensModel,
        ids: Sequence[int],
        subject: tuple[int, int],
        target_id: int,
        noise: float,
        samples: int = ROME_SAMPLES,
        seed: int = 1,
        batch_rows: int = 128,
    ) -> None:
        self.lm = lm
        self.ids = [int(i) for i in ids]
        self.n = len(self.ids)
        self.subject = subject
        self.target_id = int(target_id)
        self.samples = samples
        self.batch_rows = batch_rows
        self.blocks = lm.arch.layers
        self.n_layers = len(self.blocks)
        self.modules = {
            "mlp": [lm.arch.resolve(k, "ff2").module for k in range(self.n_layers)],
            "attn": [lm.arch.resolve(k, "o").module for k in range(self.n_layers)],
        }
        s, e = subject
        if not 0 <= s < e <= self.n:
            raise InputError(f"subject tokens [{s}, {e}) are not inside the {self.n} tokens")
        embed = lm.model.get_input_embeddings()  # type: ignore[operator]
        width = int(embed.weight.shape[-1])
        gen = torch.Generator().manual_seed(seed)
        self.noise = noise * torch.randn(samples, e - s, width, generator=gen)
        self._bases: dict[int, _Base] = {}
        self.clean: dict[str, list[Tensor]] = {}
        self._clean_run()
        self.low = float(self._base(samples).prob)

    # ------------------------------------------------------------------ the clean run

    @torch.no_grad()
    def _clean_run(self) -> None:
        lm = self.lm
        got: dict[str, list[Tensor | None]] = {k: [None] * self.n_layers for k in KINDS}

        def keep(kind: str, k: int):
            def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                got[kind][k] = by_position(_untuple(output), (1, self.n))[0].detach().clone()

            return hook

        batch = pad_batch([self.ids], pad_id(lm.tokenizer), device=lm.device)
        with Hooks() as hooks, eval_mode(lm.model):
            for k in range(self.n_layers):
                hooks.forward(self.blocks[k], keep("hidden", k))
                hooks.forward(self.modules["mlp"][k], keep("mlp", k))
                hooks.forward(self.modules["attn"][k], keep("attn", k))
            logits = lm.model(**model_inputs(lm.model, batch, logits_to_keep=1)).logits[0, -1]
        probs = torch.softmax(logits.float(), dim=-1)
        self.clean_prob = float(probs[self.target_id])
        self.clean_top = int(probs.argmax())
        self.clean = {k: [t for t in v if t is not None] for k, v in got.items()}

    # ------------------------------------------------------------------ the corrupted run

    def _noise_hook(self, rows: int):
        s, e = self.subject
        noise = self.noise.repeat((rows + self.samples - 1) // self.samples, 1, 1)[:rows]

        def hook(mod: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            out = output.clone()
            out[:, s:e] += noise.to(out.device, out.dtype)
            return out

        return hook

    @torch.no_grad()
    def _base(self, rows: int) -> _Base:
        """The corrupted run with ``rows`` rows (noise sample ``r % samples`` in row ``r``).

        Keeps every block's call arguments for that batch size, and the corrupted hidden state
        entering each block (and leaving the last), for the ``samples`` distinct rows.
        """
        if rows in self._bases:
            return self._bases[rows]
        lm = self.lm
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        states: list[Tensor] = []

        def record(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls.append((args, dict(kwargs)))
            states.append(_block_input(args, kwargs)[: self.samples].detach().clone())

        def last(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            states.append(_untuple(output)[: self.samples].detach().clone())

        batch = pad_batch([self.ids] * rows, pad_id(lm.tokenizer), device=lm.device)
        embed = lm.model.get_input_embeddings()  # type: ignore[operator]
        with Hooks() as hooks, eval_mode(lm.model):
            hooks.forward(embed, self._noise_hook(rows))
            for block in self.blocks:
                hooks.pre_forward(block, record, with_kwargs=True)
            hooks.forward(self.blocks[-1], last)
            lm.model(**model_inputs(lm.model, batch, logits_to_keep=1))
        probs = self._probs(states[-1][:, -1])
        base = _Base(rows, calls, states, float(probs.mean(0)[self.target_id]))
        self._bases[rows] = base
        return base

    def _probs(self, last: Tensor) -> Tensor:
        return torch.softmax(self.lm.lens.logits(last), dim=-1)

    # ------------------------------------------------------------------ restorations

    def run(self, restorations: Sequence[Restoration]) -> list[float]:
        """The score (mean probability of the target over the noise rows) of each restoration.

        Restorations are sorted by their first differing block and run ``batch_rows //
        samples`` at a time; the result follows the given order.

        Raises:
            InputError: a restoration names a kind, token or layer the prompt/model lacks.
        """
        for r in restorations:
            if r.kind not in KINDS or not r.layers or not r.tokens:
                raise InputError(f"cannot restore {r}: give a kind of {KINDS}, tokens and layers")
            if not all(0 <= t < self.n for t in r.tokens):
                raise InputError(f"{r} names a token outside the prompt's {self.n} tokens")
            if not all(0 <= k < self.n_layers for k in r.layers):
                raise InputError(f"{r} names a layer outside the model's {self.n_layers}")
        per_batch = max(1, self.batch_rows // self.samples)
        order = sorted(range(len(restorations)), key=lambda i: restorations[i].start)
        scores: list[float] = [0.0] * len(restorations)
        for k in range(0, len(order), per_batch):
            chunk = order[k : k + per_batch]
            group = [restorations[i] for i in chunk]
            # every batch of a prompt has one size, so the corrupted run is recorded once
            size = min(per_batch, len(restorations))
            group += [group[-1]] * (size - len(group))
            for i, score in zip(chunk, self._run_batch(group), strict=False):
                scores[i] = score
        return scores

    @torch.no_grad()
    def _run_batch(self, group: Sequence[Restoration]) -> list[float]:
        s = self.samples
        rows = len(group) * s
        base = self._base(rows)
        start = min(r.start for r in group)
        h = base.states[start].repeat(len(group), 1, 1)
        # restorations by (kind, layer): (row slice, tokens); block outputs below `start` are
        # restored in the input of block `start`
        edits: dict[tuple[str, int], list[tuple[slice, tuple[int, ...]]]] = {}
        for j, r in enumerate(group):
            rows_j = slice(j * s, (j + 1) * s)
            for layer in r.layers:
                if r.kind == "hidden" and layer == start - 1:
                    for t in r.tokens:
                        h[rows_j, t] = self.clean["hidden"][layer][t].to(h.dtype)
                else:
                    edits.setdefault((r.kind, layer), []).append((rows_j, r.tokens))

        def restore(kind: str, layer: int):
            clean = self.clean[kind][layer]
            todo = edits[(kind, layer)]

            def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
                out = by_position(_untuple(output), (rows, self.n))
                for rows_j, tokens in todo:
                    for t in tokens:
                        out[rows_j, t] = clean[t].to(out.dtype)
                return output

            return hook

        with Hooks() as hooks, eval_mode(self.lm.model):
            for kind, layer in edits:
                module = self.blocks[layer] if kind == "hidden" else self.modules[kind][layer]
                hooks.forward(module, restore(kind, layer))
            for k in range(start, self.n_layers):
                args, kwargs = base.calls[k]
                if args:
                    out = self.blocks[k](h, *args[1:], **kwargs)
                else:
                    out = self.blocks[k](**{**kwargs, "hidden_states": h})
                h = _untuple(out)
        probs = self._probs(h[:, -1])[:, self.target_id]
        return [float(probs[j * s : (j + 1) * s].mean()) for j in range(len(group))]


@dataclass
class _Base:
    rows: int
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
    states: list[Tensor]
    prob: float


@dataclass
class RecordTrace:
    """Causal trace of one prompt.

    Attributes:
        ids / tokens: the prompt's token ids and readable labels, [T].
        subject: the subject's token range ``[start, end)``.
        target / target_id: the true object and its first token.
        high: the target's probability in the clean run; ``low``: corrupted, nothing restored.
        top / correct: the clean run's top token, and whether it is the target's first token.
        scores: kind -> [T][L] restored probability of the target.
        window / samples / noise: how it was traced.
    """

    ids: list[int]
    tokens: list[str]
    subject: tuple[int, int]
    target: str
    target_id: int
    high: float
    low: float
    top: str
    correct: bool
    scores: dict[str, list[list[float]]] = field(default_factory=dict)
    window: int = ROME_WINDOW
    samples: int = ROME_SAMPLES
    noise: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (probabilities rounded to 6 digits)."""
        return {
            "ids": self.ids,
            "tokens": self.tokens,
            "subject": list(self.subject),
            "target": self.target,
            "target_id": self.target_id,
            "high": round(self.high, 6),
            "low": round(self.low, 6),
            "top": self.top,
            "correct": self.correct,
            "window": self.window,
            "samples": self.samples,
            "noise": self.noise,
            "scores": {
                k: [[round(v, 6) for v in row] for row in m] for k, m in self.scores.items()
            },
        }


def prepare(
    lm: LensModel, prompt: str, subject: str, target: str
) -> tuple[list[int], int, int, int]:
    """Encode one fact for tracing under the encoding contract of :mod:`backward_lens.tokens`.

    Returns:
        ``(ids, start, end, target_id)``: the prompt's ids (BOS included), the subject's token
        range ``[start, end)`` and the target's first token id.

    Raises:
        InputError: (and subclasses) an empty prompt/target, a subject not in the prompt.
    """
    request = encode_request(
        lm.tokenizer, prompt, target, multi_token="first", max_length=lm.context_length
    )
    ids, (s, e) = locate_subject(lm.tokenizer, request.prompt, subject, ids=request.prompt_ids)
    return list(ids), s, e, int(request.target_ids[0])


def trace_prompt(
    lm: LensModel,
    prompt: str,
    subject: str,
    target: str,
    noise: float,
    config: TraceConfig | None = None,
    *,
    require_correct: bool = False,
) -> RecordTrace | None:
    """Causal trace of one fact: every (token, layer) restoration of each kind in ``config``.

    Args:
        lm: the model.
        prompt: the prompt, subject included ("Vinson Massif is located in the continent of").
        subject: the subject as written in the prompt; its tokens are corrupted.
        target: the true object; the score is its first token's probability.
        noise: the noise's absolute standard deviation (see :func:`embedding_std`).
        config: samples, window, seed, kinds.
        require_correct: return None without tracing when the clean run's top token is not the
            target's first token (ROME traces only facts the model predicts).

    Raises:
        InputError: bad prompt, subject or target (one line).
    """
    config = config or TraceConfig()
    config.check()
    ids, s, e, target_id = prepare(lm, prompt, subject, target)
    tracer = Tracer(
        lm, ids, (s, e), target_id, noise, config.samples, config.seed, config.batch_rows
    )
    correct = tracer.clean_top == target_id
    if require_correct and not correct:
        return None
    scores: dict[str, list[list[float]]] = {}
    n_layers = tracer.n_layers
    for kind in config.kinds:
        todo = restorations_for(kind, tracer.n, n_layers, config.window)
        # a token before the subject is the same in the clean and the corrupted run (causal
        # attention), so restoring it changes nothing: its score is the corrupted one, exactly
        todo = [r for r in todo if r.tokens[0] >= s]
        flat = [tracer.low] * (s * n_layers) + tracer.run(todo)
        scores[kind] = [flat[t * n_layers : (t + 1) * n_layers] for t in range(tracer.n)]
    return RecordTrace(
        ids=ids,
        tokens=token_labels(lm.tokenizer, ids),
        subject=(s, e),
        target=target,
        target_id=target_id,
        high=tracer.clean_prob,
        low=tracer.low,
        top=token_labels(lm.tokenizer, [tracer.clean_top])[0],
        correct=correct,
        scores=scores,
        window=config.window,
        samples=config.samples,
        noise=noise,
    )


@torch.no_grad()
def embedding_std(lm: LensModel, facts: Sequence[tuple[str, str]]) -> float:
    """Standard deviation of the input embeddings of the subjects' tokens.

    As ROME's ``collect_embedding_std``: over every element of every subject token of ``facts``
    (``(prompt, subject)`` pairs, each subject located in its prompt); facts whose subject is
    not found are left out.

    The embedding module's own output is used (Gemma's is scaled by sqrt(d)), since that is
    what the noise is added to.

    Raises:
        InputError: no subject found in any prompt.
    """
    embed = lm.model.get_input_embeddings()  # type: ignore[operator]
    device = embed.weight.device
    pieces = []
    for prompt, subject in facts:
        try:
            ids, (s, e) = locate_subject(lm.tokenizer, prompt.rstrip(), subject)
        except InputError:
            continue
        pieces.append(embed(torch.tensor([ids[s:e]], device=device))[0].float())
    if not pieces:
        raise InputError("no subject was found in its prompt; cannot measure the embedding std")
    return float(torch.cat(pieces).std())
