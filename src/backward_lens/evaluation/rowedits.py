"""A different weight edit on each row of one batch, through forward hooks.

Single-edit evaluation applies one edit, scores that record's prompts, and reverts: small
forward passes. When every edited parameter is the weight of an ``nn.Linear`` or GPT-2
``Conv1D``, editing W -> W + D changes the module's output by exactly ``x D^T`` (``x D`` for
Conv1D), so a hook can add each row's own ``x D_r`` and the prompts of many edited records share
one forward pass. Only the order of floating-point additions differs from applying the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from backward_lens.adapters import weight_layout
from backward_lens.batching import Hooks
from backward_lens.editing.base import Edit
from backward_lens.errors import EditError, UnsupportedArchitectureError


def _owner(model: nn.Module, param: str) -> nn.Module | None:
    """The module whose ``weight`` is ``param`` (None for biases, norms, embeddings...)."""
    if not param.endswith(".weight"):
        return None
    module = model.get_submodule(param[: -len(".weight")])
    try:
        weight_layout(module)
    except UnsupportedArchitectureError:
        return None
    return module


def hookable(model: nn.Module, edit: Edit | None) -> bool:
    """True if every delta of ``edit`` is a Linear/Conv1D weight (so rows can carry it)."""
    if edit is None:
        return True
    return all(_owner(model, name) is not None for name in edit.deltas)


class RowEdits:
    """Hooks that add ``x @ D_r`` for the edit ``r`` assigned to each batch row.

    Use :meth:`installed` around the forward passes and :meth:`set_rows` (a scoring
    ``on_batch``-style callback that receives row owners) before each one.

    Args:
        model: the unedited model (its weights are never changed).
        edits: the edit of each owner index (None: that owner's rows stay unedited).

    Raises:
        ValueError: an edit of a parameter that is not a Linear/Conv1D weight.
        EditError: an edited weight is offloaded (on the meta device).
    """

    def __init__(self, model: nn.Module, edits: Sequence[Edit | None]) -> None:
        self.model = model
        self.rows: list[int | None] = []
        # module -> list of (edit index, delta laid out so that out += x @ delta) per edit
        self.by_module: dict[nn.Module, list[tuple[int, Tensor]]] = {}
        for k, edit in enumerate(edits):
            if edit is None:
                continue
            for name, delta in edit.deltas.items():
                module = _owner(model, name)
                if module is None:
                    raise ValueError(f"{name} cannot be edited per row (not a Linear/Conv1D)")
                weight = module.weight
                assert isinstance(weight, Tensor)
                if weight.device.type == "meta":
                    raise EditError(
                        f"{name} is offloaded (on the meta device); per-row edits need it loaded: "
                        "load the model without offloading (no device_map, or more max_memory)"
                    )
                d = delta.to(weight.device, weight.dtype)  # the edited weight's own device
                d = d.T if weight_layout(module) == "out_in" else d  # [in, out]
                self.by_module.setdefault(module, []).append((k, d.contiguous()))

    def set_rows(self, owners: Sequence[int | None]) -> None:
        """Which edit each row of the next forward passes carries (None: no edit)."""
        self.rows = list(owners)

    def _hook(self, module: nn.Module) -> Callable[..., Tensor]:
        entries = self.by_module[module]

        def hook(mod: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            x = args[0]
            batch = len(self.rows)
            flat = x.dim() == 2  # OPT runs its MLP on [B*T, w]
            xs = x.reshape(batch, -1, x.shape[-1]) if flat else x
            extra = torch.zeros(
                (*xs.shape[:-1], output.shape[-1]), dtype=output.dtype, device=output.device
            )
            for k, d in entries:
                rows = [b for b, owner in enumerate(self.rows) if owner == k]
                if rows:
                    idx = torch.tensor(rows, device=x.device)
                    extra[idx] = xs[idx] @ d
            return output + (extra.reshape(output.shape) if flat else extra)

        return hook

    @contextmanager
    def installed(self) -> Iterator[RowEdits]:
        """Install the per-row hooks for the duration (always removed: ``batching.Hooks``)."""
        with Hooks() as hooks:
            for m in self.by_module:
                hooks.forward(m, self._hook(m))
            yield self
