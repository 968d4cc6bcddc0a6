"""Which weight matrices a training lens reads: resolved through the adapter table.

A matrix is *trainable* if its weight has ``requires_grad`` or if it is a PEFT LoRA-adapted layer
(``peft``'s ``lora.Linear`` wraps the frozen base layer and trains ``lora_A``/``lora_B``). Frozen
matrices still have a VJP when anything below them trains, so they can be read on request
(``include_frozen``); by default only the trainable ones are read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from backward_lens.adapters import Architecture, get_module, weight_layout
from backward_lens.capture import resolve_layers
from backward_lens.errors import InputError

DEFAULT_MATRICES = ("ff1", "ff2")
"""The MLP matrices the paper reads (FF1 by its inputs, FF2 by its VJPs)."""

SIDE = {"ff1": "in", "gate": "in", "q": "in", "k": "in", "v": "in", "ff2": "out", "o": "out"}
"""Which side of each matrix lives in the residual stream and is read in the vocabulary: the
input side (read by its most probable tokens, like the paper's FF1 inputs x_i) or the output side
(read by its least probable tokens, like FF2's VJPs delta_i: descent subtracts the gradient)."""


@dataclass(frozen=True)
class Target:
    """One matrix of one block that the lens records.

    Attributes:
        layer: block index.
        name: matrix role (``ff1``, ``gate``, ``ff2``, ``q``, ``k``, ``v``, ``o``).
        module: the module whose input and output gradient are recorded: the ``nn.Linear`` or
            ``Conv1D`` itself, or a LoRA wrapper (its input is the base layer's, and the VJP of
            its output, base + adapter, is the VJP of the base layer's output; the wrapper's is
            recorded because the frozen base layer's own output has no gradient when nothing
            below it trains).
        layout: ``"out_in"`` (``nn.Linear``) or ``"in_out"`` (``Conv1D``).
        part: output features of a fused module that belong to this matrix, or None.
        trainable: whether the weight (or its LoRA adapter) trains.
        adapter: ``"lora"`` for a LoRA-adapted layer, else None.
        lora_scaling: the LoRA scaling ``s`` of the active adapter (1.0 otherwise).
        base: the LoRA wrapper's base layer (None otherwise).
    """

    layer: int
    name: str
    module: nn.Module
    layout: str
    part: torch.Tensor | None
    trainable: bool
    adapter: str | None = None
    lora_scaling: float = 1.0
    base: nn.Module | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The weight whose gradient the factors give (the base layer's for LoRA)."""
        return (self.base or self.module).weight  # type: ignore[return-value]

    @property
    def side(self) -> str:
        """``"in"`` or ``"out"``: the side read in the vocabulary (see :data:`SIDE`)."""
        return SIDE.get(self.name, "in")


def base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face ``*ForCausalLM`` inside a PEFT wrapper (the model itself otherwise)."""
    get = getattr(model, "get_base_model", None)
    inner = get() if callable(get) else model
    return inner if isinstance(inner, nn.Module) else model


def _lora_info(module: nn.Module) -> tuple[nn.Module, float] | None:
    """(base layer, scaling of the active adapter) of a PEFT LoRA layer, else None."""
    base = getattr(module, "base_layer", None)
    scaling = getattr(module, "scaling", None)
    if not isinstance(base, nn.Module) or not isinstance(scaling, dict):
        return None
    active = getattr(module, "active_adapters", None) or list(scaling)
    value = scaling.get(active[0], 1.0) if active else 1.0
    return base, float(value)


def select_targets(
    model: nn.Module,
    *,
    layers: Sequence[int] | None = None,
    matrices: Sequence[str] | None = None,
    include_frozen: bool = False,
) -> list[Target]:
    """Resolve the matrices to read in ``model`` (a causal LM, possibly PEFT-wrapped).

    Args:
        model: the model being trained.
        layers: block indices (negative from the end; default all).
        matrices: matrix names (default :data:`DEFAULT_MATRICES`).
        include_frozen: also read matrices whose weight does not train.

    Raises:
        InputError: a layer or matrix name that does not exist, or nothing trainable selected.
        UnsupportedArchitectureError: a model family without an adapter.
    """
    arch = Architecture(base_model(model))
    names = list(matrices) if matrices else list(DEFAULT_MATRICES)
    specs = {s.name: s for s in arch.adapter.mlp + arch.adapter.attention}
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise InputError(f"unknown matrix {', '.join(unknown)}; this model has {', '.join(specs)}")
    out: list[Target] = []
    for layer in resolve_layers(layers, arch.n_layers):
        for name in names:
            spec = specs[name]
            module = get_module(arch.layers[layer], spec.path)
            if module is None:
                arch.resolve(layer, name)  # raises the adapter's own message
                continue
            lora = _lora_info(module)
            adapter, scaling = (None, 1.0) if lora is None else ("lora", lora[1])
            base = None if lora is None else lora[0]
            if lora is not None:
                trainable = any(
                    p.requires_grad for n, p in module.named_parameters() if "lora_" in n
                )
            else:
                weight = getattr(module, "weight", None)
                trainable = bool(getattr(weight, "requires_grad", False))
            if not (trainable or include_frozen):
                continue
            part = spec.part(arch.config) if spec.part is not None else None
            layout = weight_layout(base if base is not None else module)
            out.append(Target(layer, name, module, layout, part, trainable, adapter, scaling, base))
    if not out:
        raise InputError(
            "none of the selected matrices trains (every weight has requires_grad=False and no "
            "LoRA adapter); select trained layers, or pass include_frozen=True to read the "
            "frozen ones"
        )
    return out
