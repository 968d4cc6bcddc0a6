"""Where each architecture keeps its blocks, MLP matrices, final norm and unembedding.

One table, keyed by the Hugging Face ``config.model_type``. Adding a model family means adding one
entry to :data:`ADAPTERS`; nothing else in the package names a module path.

The weight layout ([in, out] for GPT-2's ``Conv1D``, [out, in] for ``nn.Linear``) is read from the
module type at run time, never written in the table. Fused projections (GPT-2 ``c_attn``, NeoX
``query_key_value``, Phi-3 ``gate_up_proj``/``qkv_proj``) are split by selecting the output features
that belong to each part; the lemma sum_i x_i^T delta_i holds for every part separately.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from backward_lens.checks import layer as checked_layer
from backward_lens.errors import UnsupportedArchitectureError

PartSelector = Callable[[Any], torch.Tensor]
"""Maps a model config to the indices of a fused module's output features that form one matrix."""


def _chunk(index: int, sizes: Callable[[Any], list[int]]) -> PartSelector:
    """Select chunk ``index`` of an output split into contiguous pieces of the given sizes."""

    def select(config: Any) -> torch.Tensor:
        widths = sizes(config)
        start = sum(widths[:index])
        return torch.arange(start, start + widths[index])

    return select


def _equal(n_parts: int) -> Callable[[Any], list[int]]:
    def sizes(config: Any) -> list[int]:
        total = _fused_width(config, n_parts)
        return [total // n_parts] * n_parts

    return sizes


def _fused_width(config: Any, n_parts: int) -> int:
    if n_parts == 3:  # q, k, v of equal width (no grouped-query attention)
        return 3 * config.hidden_size
    return 2 * config.intermediate_size  # gate and up


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _gqa_sizes(config: Any) -> list[int]:
    hd = _head_dim(config)
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return [config.num_attention_heads * hd, kv * hd, kv * hd]


def _neox_interleaved(index: int) -> PartSelector:
    """NeoX stores q, k, v interleaved per head: [head0 q|k|v, head1 q|k|v, ...]."""

    def select(config: Any) -> torch.Tensor:
        hd = config.hidden_size // config.num_attention_heads
        heads = torch.arange(config.num_attention_heads)[:, None] * 3 * hd
        return (heads + index * hd + torch.arange(hd)[None, :]).reshape(-1)

    return select


@dataclass(frozen=True)
class MatrixSpec:
    """One weight matrix of a block whose gradient we factorise.

    Attributes:
        name: role in the paper's vocabulary: ``ff1`` (the MLP's input matrix; ``up`` for gated
            MLPs, as in the official Llama config), ``gate``, ``ff2``, or ``q``/``k``/``v``/``o``.
        path: dotted module path relative to one block.
        part: for a fused module, which of its output features belong to this matrix.
    """

    name: str
    path: str
    part: PartSelector | None = None


@dataclass(frozen=True)
class Adapter:
    """Module paths of one architecture family (see the module docstring)."""

    layers: str
    mlp: tuple[MatrixSpec, ...]
    attention: tuple[MatrixSpec, ...] = ()
    final_norm: tuple[str, ...] = ()
    """Modules applied, in order, between the last block and the unembedding (missing ones are
    skipped, e.g. OPT's ``project_out``)."""
    ff2_post_norm: str | None = None
    """A norm applied to FF2's output before it joins the residual stream (Gemma-2/3's and
    OLMo-2's ``post_feedforward_layernorm``), as a path relative to one block; None: FF2's output
    is added to the residual as it is (GPT-2, Llama...)."""
    notes: str = field(default="", compare=False)


def _gated(
    attention: tuple[MatrixSpec, ...] | None = None, ff2_post_norm: str | None = None
) -> Adapter:
    """Llama-style decoder: ``model.layers.{i}.mlp.{gate,up,down}_proj``, ``model.norm``."""
    return Adapter(
        layers="model.layers",
        mlp=(
            MatrixSpec("ff1", "mlp.up_proj"),
            MatrixSpec("gate", "mlp.gate_proj"),
            MatrixSpec("ff2", "mlp.down_proj"),
        ),
        attention=attention
        or (
            MatrixSpec("q", "self_attn.q_proj"),
            MatrixSpec("k", "self_attn.k_proj"),
            MatrixSpec("v", "self_attn.v_proj"),
            MatrixSpec("o", "self_attn.o_proj"),
        ),
        final_norm=("model.norm",),
        ff2_post_norm=ff2_post_norm,
    )


ADAPTERS: dict[str, Adapter] = {
    "gpt2": Adapter(
        layers="transformer.h",
        mlp=(MatrixSpec("ff1", "mlp.c_fc"), MatrixSpec("ff2", "mlp.c_proj")),
        attention=(
            MatrixSpec("q", "attn.c_attn", _chunk(0, _equal(3))),
            MatrixSpec("k", "attn.c_attn", _chunk(1, _equal(3))),
            MatrixSpec("v", "attn.c_attn", _chunk(2, _equal(3))),
            MatrixSpec("o", "attn.c_proj"),
        ),
        final_norm=("transformer.ln_f",),
    ),
    "gptj": Adapter(
        layers="transformer.h",
        mlp=(MatrixSpec("ff1", "mlp.fc_in"), MatrixSpec("ff2", "mlp.fc_out")),
        attention=(
            MatrixSpec("q", "attn.q_proj"),
            MatrixSpec("k", "attn.k_proj"),
            MatrixSpec("v", "attn.v_proj"),
            MatrixSpec("o", "attn.out_proj"),
        ),
        final_norm=("transformer.ln_f",),
    ),
    "gpt_neox": Adapter(
        layers="gpt_neox.layers",
        mlp=(MatrixSpec("ff1", "mlp.dense_h_to_4h"), MatrixSpec("ff2", "mlp.dense_4h_to_h")),
        attention=(
            MatrixSpec("q", "attention.query_key_value", _neox_interleaved(0)),
            MatrixSpec("k", "attention.query_key_value", _neox_interleaved(1)),
            MatrixSpec("v", "attention.query_key_value", _neox_interleaved(2)),
            MatrixSpec("o", "attention.dense"),
        ),
        final_norm=("gpt_neox.final_layer_norm",),
    ),
    "opt": Adapter(
        layers="model.decoder.layers",
        mlp=(MatrixSpec("ff1", "fc1"), MatrixSpec("ff2", "fc2")),
        attention=(
            MatrixSpec("q", "self_attn.q_proj"),
            MatrixSpec("k", "self_attn.k_proj"),
            MatrixSpec("v", "self_attn.v_proj"),
            MatrixSpec("o", "self_attn.out_proj"),
        ),
        final_norm=("model.decoder.final_layer_norm", "model.decoder.project_out"),
    ),
    "llama": _gated(),
    "mistral": _gated(),
    "qwen2": _gated(),
    "qwen3": _gated(),
    "gemma": _gated(),
    "gemma2": _gated(ff2_post_norm="post_feedforward_layernorm"),
    "gemma3_text": _gated(ff2_post_norm="post_feedforward_layernorm"),
    "olmo2": _gated(ff2_post_norm="post_feedforward_layernorm"),
    "phi3": Adapter(
        layers="model.layers",
        mlp=(
            MatrixSpec("ff1", "mlp.gate_up_proj", _chunk(1, _equal(2))),
            MatrixSpec("gate", "mlp.gate_up_proj", _chunk(0, _equal(2))),
            MatrixSpec("ff2", "mlp.down_proj"),
        ),
        attention=(
            MatrixSpec("q", "self_attn.qkv_proj", _chunk(0, _gqa_sizes)),
            MatrixSpec("k", "self_attn.qkv_proj", _chunk(1, _gqa_sizes)),
            MatrixSpec("v", "self_attn.qkv_proj", _chunk(2, _gqa_sizes)),
            MatrixSpec("o", "self_attn.o_proj"),
        ),
        final_norm=("model.norm",),
    ),
}


def supported_model_types() -> list[str]:
    """The ``model_type`` values that have an adapter, sorted."""
    return sorted(ADAPTERS)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``, or an error naming the supported types and how to add one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    raise UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r}; supported model types: "
        f"{', '.join(supported_model_types())}. To add one, add an Adapter entry for it to "
        "ADAPTERS in backward_lens/adapters.py (block list path, MLP matrix paths, final norm)."
    )


def get_module(root: nn.Module, path: str) -> nn.Module | None:
    """Resolve a dotted path (``"model.layers"``); None if any step is missing or None."""
    module: Any = root
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


def weight_layout(module: nn.Module) -> str:
    """``"in_out"`` for GPT-2's ``Conv1D`` ([in, out]), ``"out_in"`` for ``nn.Linear``."""
    if isinstance(module, nn.Linear):
        return "out_in"
    if type(module).__name__ == "Conv1D":
        return "in_out"
    raise UnsupportedArchitectureError(
        f"cannot factorise the gradient of a {type(module).__name__}; only nn.Linear and Conv1D "
        "weights are supported"
    )


@dataclass(frozen=True)
class ResolvedMatrix:
    """A :class:`MatrixSpec` bound to one layer of one model."""

    layer: int
    name: str
    module: nn.Module
    layout: str
    part: torch.Tensor | None

    @property
    def weight(self) -> torch.Tensor:
        """The module's weight parameter, in its own layout."""
        return self.module.weight  # type: ignore[return-value]


class Architecture:
    """An adapter bound to a model instance: resolved blocks, matrices, final norm, unembedding."""

    def __init__(self, model: nn.Module, adapter: Adapter | None = None) -> None:
        """Bind ``adapter`` (default: the one for the model's type) to ``model``.

        Raises:
            UnsupportedArchitectureError: no adapter for the model's type, or its block list
                is not where the adapter says.
        """
        self.model = model
        self.adapter = adapter or adapter_for(model)
        layers = get_module(model, self.adapter.layers)
        if not isinstance(layers, nn.ModuleList):
            raise UnsupportedArchitectureError(
                f"expected a list of blocks at {self.adapter.layers!r} in "
                f"{type(model).__name__}; the adapter for this model type does not match it"
            )
        self.layers: nn.ModuleList = layers
        self.config: Any = model.config

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.layers)

    def layer_index(self, layer: int, what: str = "layer") -> int:
        """The block index ``layer`` as 0..n_layers-1 (negative counts from the end).

        Args:
            layer: a block index, -n_layers..n_layers-1.
            what: how the value is named in the error (``layer``, ``layers``, ``--layer``).

        Returns:
            The index, wrapped to 0..n_layers-1.

        Raises:
            InputError: not an integer, or out of range (one line naming the model's depth).
        """
        return checked_layer(what, layer, self.n_layers) % self.n_layers

    def matrix_names(self, attention: bool = False) -> list[str]:
        """Names of the MLP matrices (``ff1``, ``ff2``...), and the attention ones if asked."""
        specs = self.adapter.mlp + (self.adapter.attention if attention else ())
        return [s.name for s in specs]

    def resolve(self, layer: int, name: str) -> ResolvedMatrix:
        """The matrix ``name`` (``ff1``, ``ff2``, ``o``...) of block ``layer`` (0..n_layers-1).

        Raises:
            UnsupportedArchitectureError: the family has no such matrix, or the block lacks it.
        """
        for spec in self.adapter.mlp + self.adapter.attention:
            if spec.name == name:
                module = get_module(self.layers[layer], spec.path)
                if module is None:
                    raise UnsupportedArchitectureError(
                        f"layer {layer} has no module {spec.path!r} ({name}); the adapter for "
                        f"{self.config.model_type!r} does not match this model"
                    )
                part = spec.part(self.config) if spec.part is not None else None
                return ResolvedMatrix(layer, name, module, weight_layout(module), part)
        raise UnsupportedArchitectureError(
            f"{self.config.model_type!r} has no matrix {name!r}; it has "
            f"{', '.join(self.matrix_names(attention=True))}"
        )

    def ff2_post_norm(self, layer: int) -> nn.Module | None:
        """The norm between block ``layer``'s FF2 output and the residual stream, if any.

        Raises:
            UnsupportedArchitectureError: the adapter names a post-FF2 norm the block lacks.
        """
        if self.adapter.ff2_post_norm is None:
            return None
        module = get_module(self.layers[layer], self.adapter.ff2_post_norm)
        if module is None:
            raise UnsupportedArchitectureError(
                f"layer {layer} has no module {self.adapter.ff2_post_norm!r} (FF2's post-norm); "
                f"the adapter for {self.config.model_type!r} does not match this model"
            )
        return module

    def final_norm_modules(self) -> list[nn.Module]:
        """The modules applied to the last hidden state before the LM head, in order."""
        found = [get_module(self.model, p) for p in self.adapter.final_norm]
        return [m for m in found if m is not None]

    def unembedding(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoding matrix D^T as [vocab, d] and its bias (GPT-J has one), from the LM head."""
        head = self.model.get_output_embeddings()  # type: ignore[operator]
        if head is None:
            raise UnsupportedArchitectureError(f"{type(self.model).__name__} has no LM head")
        return head.weight, getattr(head, "bias", None)

    def logit_softcap(self) -> float | None:
        """Gemma-2/3's final ``tanh`` soft-capping of logits, if the config enables it."""
        value = getattr(self.config, "final_logit_softcapping", None)
        return float(value) if value else None
