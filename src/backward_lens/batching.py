"""One batching and hook core: padding, position ids, masks, forward arguments, eval mode, hooks.

Every batched forward pass of the package (capture, scoring, generation, the viewer's predictions,
ROME's prefixes and statistics, the editors' probes) builds its inputs with :func:`pad_batch` and
runs them through :func:`model_inputs`, so padding side, position ids and the detection of the
model's optional forward arguments are decided in one place. Hooks are registered through
:class:`Hooks`, a context manager that removes every hook it registered, whatever happens.

Left padding puts every sequence's last token in the last column (what the next-token loss reads);
right padding keeps each row's positions 0..len-1 at the same columns (what position-indexed edits
need). Either way the attention mask hides padding and explicit position ids make each row's
positions start at 0, so a row's real positions equal a run of that sequence on its own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

Side = Literal["left", "right"]


@dataclass(frozen=True)
class Batch:
    """Padded token ids of several sequences.

    Attributes:
        input_ids: [B, T] token ids, padding with the tokenizer's pad id.
        attention_mask: [B, T], 1 on real tokens.
        position_ids: [B, T], 0..len-1 on each row's real tokens (0 on padding).
        lengths: each row's number of real tokens.
        side: where the padding is.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    lengths: tuple[int, ...]
    side: Side

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, T)``."""
        return int(self.input_ids.shape[0]), int(self.input_ids.shape[1])

    def start(self, row: int) -> int:
        """Column of row ``row``'s first real token."""
        return self.shape[1] - self.lengths[row] if self.side == "left" else 0

    def column(self, row: int, position: int) -> int:
        """Column of real position ``position`` (negative counts from the end) of row ``row``."""
        if position < 0:
            position += self.lengths[row]
        return self.start(row) + position

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device``."""
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.lengths,
            self.side,
        )


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id (0 if it has none; padding is always masked)."""
    pid = getattr(tokenizer, "pad_token_id", None)
    return int(pid) if pid is not None else 0


def pad_batch(
    sequences: Sequence[Sequence[int]],
    pad: int,
    *,
    side: Side = "left",
    device: torch.device | str | None = None,
) -> Batch:
    """Pad token-id sequences into one :class:`Batch`.

    Args:
        sequences: token ids of each row (each non-empty).
        pad: the pad token id (see :func:`pad_id`).
        side: ``"left"`` (every row ends in the last column) or ``"right"``.
        device: where to put the tensors (default: CPU).

    Raises:
        ValueError: no sequence, or an empty one.
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pad_batch needs at least one sequence and no empty one")
    lengths = tuple(len(s) for s in sequences)
    width = max(lengths)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, s in enumerate(sequences):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[b, cols] = torch.tensor(list(s), dtype=torch.long)
        mask[b, cols] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    batch = Batch(ids, mask, positions, lengths, side)
    return batch.to(device) if device is not None else batch


_FORWARD_PARAMETERS: dict[type, frozenset[str]] = {}


def accepts(model: nn.Module, argument: str) -> bool:
    """Whether ``model.forward`` takes ``argument`` (``position_ids``, ``logits_to_keep``...).

    The signature is read once per model class and cached.
    """
    cls = type(model)
    if cls not in _FORWARD_PARAMETERS:
        _FORWARD_PARAMETERS[cls] = frozenset(inspect.signature(model.forward).parameters)
    return argument in _FORWARD_PARAMETERS[cls]


def model_inputs(
    model: nn.Module, batch: Batch, *, logits_to_keep: int | None = None
) -> dict[str, Any]:
    """Keyword arguments of ``model(**kwargs)`` for ``batch``.

    They are the ids and mask ([B, T] each), position ids when the model takes them, no KV
    cache, and ``logits_to_keep`` (only the last columns are unembedded) when given and
    supported.
    """
    kwargs: dict[str, Any] = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "use_cache": False,
    }
    if accepts(model, "position_ids"):
        kwargs["position_ids"] = batch.position_ids
    if logits_to_keep is not None and accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = logits_to_keep
    return kwargs


def cache_inputs(model: nn.Module, output: Any) -> dict[str, Any]:
    """Keyword argument that hands ``output``'s KV cache to the next forward pass of ``model``.

    The key is ``cache`` where the model takes it (transformers 5.2x renamed it), else
    ``past_key_values``.
    """
    value = getattr(output, "cache", None)
    if value is None:
        value = getattr(output, "past_key_values", None)
    return {"cache" if accepts(model, "cache") else "past_key_values": value}


def input_device(model: nn.Module) -> torch.device:
    """Where the model's input ids must go.

    That is the input embedding's device (the first device of a ``device_map`` model), not the
    first parameter's; CPU for a model whose parameters are all on the meta device.
    """
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    weight = getattr(embedding, "weight", None)
    if isinstance(weight, Tensor) and weight.device.type != "meta":
        return weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Dropout off for the duration (``model.eval()``).

    The train/eval mode of every submodule is restored on exit, whatever happens.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


HookFn = Callable[..., Any]


class Hooks:
    """Forward and pre-forward hooks that are always removed: ``with Hooks() as h: h.forward(...)``.

    Every hook of the package is registered through one of these, so an exception or Ctrl-C in
    the middle of a pass never leaves a hook behind.
    """

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []

    def forward(self, module: nn.Module, fn: HookFn) -> RemovableHandle:
        """Register ``fn(module, args, output)`` (may return a replacement output)."""
        handle = module.register_forward_hook(fn)
        self.handles.append(handle)
        return handle

    def pre_forward(self, module: nn.Module, fn: HookFn, *, with_kwargs: bool = False) -> None:
        """Register ``fn(module, args)`` (or ``fn(module, args, kwargs)`` with ``with_kwargs``)."""
        self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def remove(self) -> None:
        """Remove every hook registered so far (idempotent)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self) -> Hooks:
        """Open the registry; hooks are registered on the returned object."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Remove every registered hook, also when the block raised."""
        self.remove()


@contextmanager
def recording_input(module: nn.Module) -> Iterator[list[Tensor]]:
    """Keep the (detached) input of every call of ``module`` while the context is open."""
    seen: list[Tensor] = []

    def hook(mod: nn.Module, args: tuple[Tensor, ...], output: Any) -> None:
        seen.append(args[0].detach())

    with Hooks() as hooks:
        hooks.forward(module, hook)
        yield seen


def by_position(t: Tensor, batch_shape: tuple[int, int]) -> Tensor:
    """[B, T, w] view of an activation (OPT flattens its MLP activations to [B*T, w])."""
    return t.reshape(*batch_shape, t.shape[-1])
