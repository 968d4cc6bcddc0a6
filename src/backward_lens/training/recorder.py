"""Record gradient factors during a training step's own forward and backward pass, any loss.

A forward hook on each selected module keeps its input X (detached) and hangs a tensor hook on its
output; when the training's backward pass reaches that output, the hook keeps Delta = dL/dz. No
extra pass runs and no parameter is touched, so the loss can be anything: the causal-LM loss over
every position (ignore index -100, padding), a sum over several micro-batches (gradient
accumulation), or any function of the logits.

The gradient of a weight is then sum_i x_i^T delta_i over every position i of every micro-batch:
micro-batches are concatenated. Rows whose VJP is exactly zero (padding, the last position of each
row under the causal-LM loss, anything the loss does not depend on) add nothing and are dropped,
so the product of the kept factors still equals the weight's gradient exactly.

Module hooks are registered through :class:`~backward_lens.batching.Hooks` and removed when the
recording context closes, whatever happens; the tensor hooks belong to the autograd graph and go
with it. A backward pass may run inside the context or after it (the graph keeps its hooks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from backward_lens.batching import Hooks
from backward_lens.lowrank import LowRankGradient
from backward_lens.training.targets import Target


@dataclass
class _Call:
    """One forward call of one module: its input rows, and later the VJP of its output."""

    x: Tensor  # [N, d_in]
    micro: int
    delta: Tensor | None = None  # [N, d_out]


@dataclass
class MatrixFactors:
    """The factors of one matrix over a whole (accumulated) step.

    Attributes:
        target: the matrix.
        gradient: x [n, d_in] and delta [n, d_out]; ``gradient.dense()`` equals the weight's
            gradient accumulated over the step (before any clipping or optimizer transform).
        positions: [n, 3] int64: micro-batch, row, column of each kept position (-1 if the
            module's input could not be matched to the token grid).
        token_ids: [n] the input token at each position (-1 if unknown).
        next_ids: [n] the token after it in the same row (what a causal LM is trained to emit
            there), -1 at the end of a row or if unknown.
    """

    target: Target
    gradient: LowRankGradient
    positions: Tensor
    token_ids: Tensor
    next_ids: Tensor


@dataclass
class Recording:
    """What one recording context captured (fill it with :func:`record`).

    Attributes:
        targets: the matrices being recorded.
        inputs: the ``input_ids`` of each forward call of the model (micro-batch), on the CPU,
            or None when the model was called without them.
        losses: the ``loss`` each forward call returned (the model's own loss, when labels were
            given), as floats.
    """

    targets: list[Target]
    inputs: list[Tensor | None] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    _calls: dict[int, list[_Call]] = field(default_factory=dict, repr=False)

    @property
    def micro_batches(self) -> int:
        """Forward calls of the model seen so far."""
        return len(self.inputs)

    def nbytes(self) -> int:
        """Bytes held by the recorded factors (inputs and VJPs, every module)."""
        total = 0
        for calls in self._calls.values():
            for c in calls:
                total += c.x.numel() * c.x.element_size()
                if c.delta is not None:
                    total += c.delta.numel() * c.delta.element_size()
        return total

    def factors(self) -> list[MatrixFactors]:
        """The factors of every target, micro-batches concatenated, zero-VJP rows dropped.

        A target whose output never received a gradient (nothing below or at it trains and
        the loss did not reach it) is left out.
        """
        out = []
        for t in self.targets:
            calls = [c for c in self._calls.get(id(t.module), []) if c.delta is not None]
            if not calls:
                continue
            xs, ds, meta = [], [], []
            for c in calls:
                delta = c.delta
                assert delta is not None
                if t.part is not None:
                    delta = delta[:, t.part.to(delta.device)]
                xs.append(c.x)
                ds.append(delta)
                meta.append(self._grid(c))
            x, delta = torch.cat(xs), torch.cat(ds)
            positions = torch.cat([m[0] for m in meta])
            tokens = torch.cat([m[1] for m in meta])
            nexts = torch.cat([m[2] for m in meta])
            keep = (delta != 0).any(dim=1)
            if not bool(keep.all()):
                keep_cpu = keep.cpu()
                x, delta = x[keep], delta[keep]
                positions, tokens, nexts = positions[keep_cpu], tokens[keep_cpu], nexts[keep_cpu]
            gradient = LowRankGradient(x, delta, t.layout, t.layer, t.name)
            out.append(MatrixFactors(t, gradient, positions, tokens, nexts))
        return out

    def _grid(self, call: _Call) -> tuple[Tensor, Tensor, Tensor]:
        """Micro-batch/row/column, token and next token of each row of ``call``."""
        n = int(call.x.shape[0])
        ids = self.inputs[call.micro] if 0 <= call.micro < len(self.inputs) else None
        if ids is None or ids.numel() != n or ids.ndim != 2:
            unknown = torch.full((n,), -1, dtype=torch.long)
            micro = torch.full((n, 1), call.micro, dtype=torch.long)
            return torch.cat([micro, unknown[:, None], unknown[:, None]], 1), unknown, unknown
        b, t = ids.shape
        rows = torch.arange(b).repeat_interleave(t)
        cols = torch.arange(t).repeat(b)
        nexts = torch.cat([ids[:, 1:], torch.full((b, 1), -1, dtype=torch.long)], 1)
        micro = torch.full((n,), call.micro, dtype=torch.long)
        positions = torch.stack([micro, rows, cols], 1)
        return positions, ids.reshape(-1), nexts.reshape(-1)


def _input_ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    return ids.detach().long().cpu() if isinstance(ids, Tensor) else None


@contextmanager
def record(model: nn.Module, targets: list[Target]) -> Iterator[Recording]:
    """Record the factors of ``targets`` for every forward pass of ``model`` in the context.

    ``model`` is the module the training calls (its ``input_ids`` label the positions). Use it
    around the forward pass and, usually, the backward pass::

        with record(model, targets) as rec:
            model(**batch).loss.backward()
        factors = rec.factors()

    Module hooks are removed when the context ends, whatever happens.
    """
    rec = Recording(list(targets))
    with Hooks() as hooks:
        hooks.pre_forward(model, _root_pre_hook(rec), with_kwargs=True)
        hooks.forward(model, _root_hook(rec))
        for module in {id(t.module): t.module for t in targets}.values():
            rec._calls[id(module)] = []
            hooks.forward(module, _module_hook(rec, rec._calls[id(module)]))
        yield rec


def _root_pre_hook(rec: Recording) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rec.inputs.append(_input_ids(args, kwargs))

    return hook


def _root_hook(rec: Recording) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if isinstance(loss, Tensor) and loss.numel() == 1:
            rec.losses.append(float(loss.detach()))

    return hook


def _module_hook(rec: Recording, calls: list[_Call]) -> Any:
    def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        if not isinstance(output, Tensor) or not output.requires_grad:
            return  # no gradient will reach it (no_grad, or nothing at or below it trains)
        x = args[0].detach()
        call = _Call(x.reshape(-1, x.shape[-1]), micro=len(rec.inputs) - 1)
        calls.append(call)

        def keep(grad: Tensor) -> None:
            g = grad.detach().reshape(-1, grad.shape[-1])
            call.delta = g if call.delta is None else call.delta + g

        output.register_hook(keep)

    return hook
