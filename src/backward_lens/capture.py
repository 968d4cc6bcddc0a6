"""One forward and one backward pass that record the factors of every selected gradient.

For each selected linear layer a forward hook keeps its input X (detached) and its output z (still
in the graph); one ``torch.autograd.grad`` call then returns Delta = dL/dz for all of them at once.
Parameters are frozen for the duration (no ``.grad`` is written, no weight gradient is computed);
the input embeddings become the graph's only leaf. Hooks are removed, ``requires_grad`` flags and
the train/eval mode restored, whatever happens.

Several prompts run as one left-padded batch with explicit position ids; the loss is the *sum* of
per-prompt losses, so each prompt's factors equal those of a run on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from backward_lens.adapters import ResolvedMatrix
from backward_lens.batching import (
    Hooks,
    by_position,
    eval_mode,
    input_device,
    model_inputs,
    pad_batch,
    pad_id,
)
from backward_lens.checks import layer as checked_layer
from backward_lens.errors import InputError
from backward_lens.lowrank import LowRankGradient
from backward_lens.models import LensModel
from backward_lens.tokens import EncodedRequest, MultiTokenPolicy, encode_request


@dataclass
class Capture:
    """Everything one backward pass says about one prompt.

    Attributes:
        request: the encoded prompt and target.
        tokens: the input tokens, decoded one by one (length n).
        loss: the summed NLL of the target token(s).
        logits: logits at the loss positions, [m, vocab] (m = 1 for the paper's loss).
        head_vjp: VJP reaching the LM head's input (the normalised last hidden state), [m, d].
        gradients: ``gradients[name][k]`` holds the factors of matrix ``name`` at ``layers[k]``.
        layers: the captured layer indices.
    """

    request: EncodedRequest
    tokens: list[str]
    loss: float
    logits: Tensor
    head_vjp: Tensor
    gradients: dict[str, list[LowRankGradient]]
    layers: list[int]
    _layer_index: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        """Index the captured layers for :meth:`gradient`."""
        self._layer_index = {layer: k for k, layer in enumerate(self.layers)}

    @property
    def n(self) -> int:
        """Number of input positions n (prompt plus teacher-forced target tokens but the last)."""
        return len(self.tokens)

    @property
    def target_id(self) -> int:
        """The (first) target token of the loss."""
        return self.request.target_ids[0]

    @property
    def prediction_id(self) -> int:
        """The model's top-1 token at the last prompt position."""
        return int(self.logits[0].argmax())

    def probability(self, token_id: int) -> float:
        """Softmax probability of ``token_id`` at the first loss position (float32, in [0, 1]).

        Args:
            token_id: a vocabulary index.

        Raises:
            IndexError: if ``token_id`` is outside the vocabulary.
        """
        return float(self.logits[0].float().softmax(-1)[token_id])

    def gradient(self, layer: int, name: str) -> LowRankGradient:
        """Factors of matrix ``name`` (``ff1``, ``gate``, ``ff2``, ``q``...) at block ``layer``.

        Args:
            layer: a captured block index (negative: from the last captured layer down).
            name: a captured matrix name.

        Raises:
            InputError: ``name`` or ``layer`` was not captured.
        """
        if name not in self.gradients:
            raise InputError(f"{name!r} was not captured; captured: {', '.join(self.gradients)}")
        if layer < 0:
            layer += max(self.layers) + 1
        if layer not in self._layer_index:
            raise InputError(f"layer {layer} was not captured; captured layers: {self.layers}")
        return self.gradients[name][self._layer_index[layer]]

    @property
    def token_ids(self) -> list[int]:
        """The input token ids (length n), as the tokens are labelled in :attr:`tokens`."""
        return list(self.request.input_ids)

    def position_targets(self) -> Tensor:
        """The target token each position's reading is ranked against, [n] (int64).

        Position ``p - 1 + j`` (``p`` prompt tokens) is trained to emit ``target_ids[j]``
        (teacher forcing); positions before the prompt's last token lead to the first target.
        """
        targets = torch.full((self.n,), self.request.target_ids[0], dtype=torch.long)
        first = len(self.request.prompt_ids) - 1
        targets[first:] = torch.tensor(self.request.target_ids, dtype=torch.long)
        return targets

    def stack(self, name: str, factor: str, device: torch.device | str | None = None) -> Tensor:
        """``x`` or ``delta`` of matrix ``name`` for every captured layer: [layers, n, width].

        The factors of a model spread over several devices are gathered on ``device`` (default:
        the first captured layer's device). ``width`` is d_in for ``x`` and d_out for ``delta``.

        Raises:
            InputError: no layer of ``name`` was captured.
            KeyError: ``name`` is not a captured matrix.
        """
        parts = [getattr(g, factor) for g in self.gradients[name]]
        if not parts:
            raise InputError(f"no layer of {name!r} was captured")
        target = torch.device(device) if device is not None else parts[0].device
        return torch.stack([t.to(target) for t in parts])


def resolve_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """Validate layer indices (negative ones count from the end); None means all layers.

    Returns:
        The distinct non-negative indices, sorted.

    Raises:
        InputError: an index outside ``[-n_layers, n_layers)``.
    """
    if layers is None:
        return list(range(n_layers))
    out: list[int] = []
    for layer in layers:
        index = checked_layer("layer", layer, n_layers) % n_layers  # as Architecture.layer_index
        if index not in out:
            out.append(index)
    return sorted(out)


def capture(
    lm: LensModel,
    prompt: str | Sequence[str],
    target: str | Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    matrices: Sequence[str] | None = None,
    attention: bool = False,
    multi_token: MultiTokenPolicy = "error",
    add_space: bool = True,
) -> Capture | list[Capture]:
    """Capture gradient factors for one prompt (returns a :class:`Capture`) or a list of them.

    Args:
        lm: the model (see :func:`backward_lens.load_model`).
        prompt: one prompt or a list of prompts.
        target: the target for each prompt (one string is reused for every prompt).
        layers: block indices to capture (default: all).
        matrices: matrix names (default: the MLP's ``ff1``, ``gate`` if gated, ``ff2``).
        attention: also capture ``q``, ``k``, ``v``, ``o`` (ignored if ``matrices`` is given).
        multi_token: see :func:`backward_lens.tokens.encode_request`.
        add_space: prepend a space to targets that lack one.

    Returns:
        One :class:`Capture` per prompt (a single one for a string ``prompt``).

    Raises:
        InputError: as many targets as prompts are needed; a bad layer or matrix; and the
            encoding errors of :func:`backward_lens.tokens.encode_request` (all subclasses).
    """
    single = isinstance(prompt, str)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    targets = [target] * len(prompts) if isinstance(target, str) else list(target)
    if len(targets) != len(prompts):
        raise InputError(f"{len(prompts)} prompts but {len(targets)} targets")
    requests = [
        encode_request(
            lm.tokenizer,
            p,
            t,
            multi_token=multi_token,
            add_space=add_space,
            max_length=lm.context_length,
        )
        for p, t in zip(prompts, targets, strict=True)
    ]
    captures = capture_requests(lm, requests, layers=layers, matrices=matrices, attention=attention)
    return captures[0] if single else captures


@contextmanager
def frozen_for_capture(model: nn.Module) -> Iterator[None]:
    """Eval mode, parameters without ``requires_grad``; both restored on exit, whatever happens."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with eval_mode(model):
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)


class _Recorder:
    """Forward hooks that keep each selected module's input (detached) and output (in graph)."""

    def __init__(self, lm: LensModel, matrices: list[ResolvedMatrix], hooks: Hooks) -> None:
        self.inputs: dict[int, Tensor] = {}
        self.outputs: dict[int, Tensor] = {}
        embeddings = lm.model.get_input_embeddings()  # type: ignore[operator]
        hooks.forward(embeddings, self._make_leaf)
        head = lm.model.get_output_embeddings()  # type: ignore[operator]
        self.head_key = id(head)
        hooks.forward(head, self._record_input(self.head_key))
        for m in {id(r.module): r.module for r in matrices}.values():
            hooks.forward(m, self._record(id(m)))

    @staticmethod
    def _make_leaf(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return output.detach().requires_grad_(True)

    def _record(self, key: int) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            self.inputs[key] = args[0].detach()
            self.outputs[key] = output

        return hook

    def _record_input(self, key: int) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            self.outputs[key] = args[0]

        return hook


def capture_requests(
    lm: LensModel,
    requests: Sequence[EncodedRequest],
    *,
    layers: Sequence[int] | None = None,
    matrices: Sequence[str] | None = None,
    attention: bool = False,
) -> list[Capture]:
    """Capture encoded requests in one left-padded batch (see the module docstring).

    The loss is computed in float32 whatever the model's dtype (a half-precision model's head
    is re-applied in float32 to its own input: ``VocabularyLens.unembed_logits``); factors keep
    the dtype and device of the layer they come from (``Capture.stack`` gathers them).

    Args:
        lm: the model.
        requests: prompts and targets encoded by :func:`backward_lens.tokens.encode_request`.
        layers: block indices to capture (negative from the end; default: all).
        matrices: matrix names (default: the MLP's ``ff1``, ``gate`` if gated, ``ff2``).
        attention: also capture ``q``, ``k``, ``v``, ``o`` (ignored if ``matrices`` is given).

    Returns:
        One :class:`Capture` per request, in order (none for no request).

    Raises:
        InputError: a layer out of range.
        UnsupportedArchitectureError: a matrix name the model's adapter does not have.
    """
    if not requests:
        return []
    arch = lm.arch
    layer_ids = resolve_layers(layers, arch.n_layers)
    names = list(matrices) if matrices else arch.matrix_names(attention)
    resolved = [arch.resolve(layer, name) for layer in layer_ids for name in names]
    model = lm.model
    batch = pad_batch(
        [r.input_ids for r in requests], pad_id(lm.tokenizer), device=input_device(model)
    )
    n_keep = max(r.n_loss_positions for r in requests)
    kwargs = model_inputs(model, batch, logits_to_keep=n_keep)

    with Hooks() as hooks, frozen_for_capture(model), torch.enable_grad():
        recorder = _Recorder(lm, resolved, hooks)
        out_logits = model(**kwargs).logits[:, -n_keep:]
        if out_logits.dtype in (torch.float32, torch.float64):
            logits = out_logits.float()  # [B, m, V]
        else:  # half precision: the loss in float32, from the head's input through the lens
            logits = lm.lens.unembed_logits(recorder.outputs[recorder.head_key][:, -n_keep:])
        logp = logits.log_softmax(-1)
        losses = []
        for b, r in enumerate(requests):
            m = r.n_loss_positions
            ids = torch.tensor(r.target_ids, device=logp.device)
            picked = logp[b, n_keep - m :].gather(-1, ids[:, None])
            losses.append(-picked.sum())
        keys = [id(r.module) for r in resolved]
        unique_keys = [*list(dict.fromkeys(keys)), recorder.head_key]
        grads = torch.autograd.grad(
            torch.stack(losses).sum(),
            [recorder.outputs[k] for k in unique_keys],
            allow_unused=True,
        )
    grad_of = {
        k: g if g is not None else torch.zeros_like(recorder.outputs[k])
        for k, g in zip(unique_keys, grads, strict=True)
    }
    head_vjp = grad_of.pop(recorder.head_key)  # [B, m or T, d]
    grad_of = {k: by_position(g, batch.shape) for k, g in grad_of.items()}
    x_of = {k: by_position(x, batch.shape) for k, x in recorder.inputs.items()}

    captures = []
    for b, r in enumerate(requests):
        start = batch.start(b)
        gradients: dict[str, list[LowRankGradient]] = {name: [] for name in names}
        for res in resolved:
            key = id(res.module)
            delta = grad_of[key][b, start:].detach()
            if res.part is not None:
                delta = delta[:, res.part.to(delta.device)]
            gradients[res.name].append(
                LowRankGradient(x_of[key][b, start:], delta, res.layout, res.layer, res.name)
            )
        m = r.n_loss_positions
        captures.append(
            Capture(
                request=r,
                tokens=lm.decode(list(r.input_ids)),
                loss=float(losses[b].detach()),
                logits=logits[b, n_keep - m :].detach(),
                head_vjp=head_vjp[b, -m:].detach(),
                gradients=gradients,
                layers=layer_ids,
            )
        )
    return captures
