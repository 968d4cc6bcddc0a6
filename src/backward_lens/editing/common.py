"""Pieces every editor shares: checked layers, the edited parameter, rank-1 deltas, activations.

Editors never name module paths: the matrix to edit comes from the architecture adapter
(``lm.arch.resolve(layer, "ff2")``) and its weight layout decides how an outer product is laid out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from backward_lens import checks
from backward_lens.adapters import ResolvedMatrix
from backward_lens.errors import InputError, TargetError
from backward_lens.models import LensModel
from backward_lens.tokens import encode_request, locate_subject

T = TypeVar("T")


def check_layer(lm: LensModel, layer: int, what: str = "layer") -> int:
    """``layer`` as an index >= 0 (negative counts from the end); InputError if it is not an
    integer or out of range (the shared check, ``checks.layer``)."""
    return checks.layer(what, layer, lm.n_layers) % lm.n_layers


def parameter_name(model: nn.Module, tensor: Tensor) -> str:
    """The ``named_parameters()`` name of ``tensor`` (found by identity)."""
    for name, p in model.named_parameters():
        if p is tensor:
            return name
    raise InputError("the edited weight is not a parameter of the model")


@dataclass(frozen=True)
class EditedMatrix:
    """FF2 (or another matrix) of one layer: module, weight layout and parameter name."""

    resolved: ResolvedMatrix
    param: str

    @property
    def module(self) -> nn.Module:
        return self.resolved.module

    @property
    def weight(self) -> Tensor:
        return self.resolved.weight

    @property
    def layout(self) -> str:
        return self.resolved.layout

    @property
    def d_in(self) -> int:
        w = self.weight
        return int(w.shape[0] if self.layout == "in_out" else w.shape[1])

    def outer(self, x_in: Tensor, y_out: Tensor) -> Tensor:
        """The rank-1 weight change mapping ``x_in`` [d_in] to ``y_out`` [d_out], in the weight's
        own layout (Conv1D [d_in, d_out] -> outer(x, y); nn.Linear [d_out, d_in] -> outer(y, x))."""
        return outer_in_layout(self.layout, x_in, y_out)

    def matmul(self, keys: Tensor, values: Tensor) -> Tensor:
        """Sum of outer products ``keys[i] -> values[i]`` ([N, d_in], [N, d_out]) in the layout."""
        if self.layout == "in_out":
            return keys.T @ values
        return values.T @ keys


def outer_in_layout(layout: str, x_in: Tensor, y_out: Tensor) -> Tensor:
    if layout == "in_out":
        return torch.outer(x_in, y_out)
    return torch.outer(y_out, x_in)


def ff2(lm: LensModel, layer: int) -> EditedMatrix:
    """The FF2 (down_proj / c_proj / fc2) matrix of ``layer``, checked."""
    layer = check_layer(lm, layer)
    resolved = lm.arch.resolve(layer, "ff2")
    if resolved.part is not None:
        raise InputError("editing a fused FF2 projection is not supported")
    return EditedMatrix(resolved, parameter_name(lm.model, resolved.weight))


@dataclass(frozen=True)
class EditTokens:
    """Token ids of one rewrite: the prompt (BOS included if the tokenizer adds one) and the
    new target (a space prepended when missing, as the paper's code does)."""

    prompt_ids: list[int]
    target_ids: list[int]
    target_text: str

    @property
    def first_target(self) -> int:
        return self.target_ids[0]


def edit_tokens(lm: LensModel, prompt: str, target: str) -> EditTokens:
    """Tokenise a prompt and its new target with the package's checks (clear TargetErrors)."""
    enc = encode_request(
        lm.tokenizer, prompt, target, multi_token="teacher_forced", max_length=lm.context_length
    )
    return EditTokens(list(enc.prompt_ids), list(enc.all_target_ids), enc.target_text)


def target_row(lm: LensModel, token: int) -> Tensor:
    """e_t: row ``token`` of the decoding matrix (the LM head, so untied models work) [d]."""
    weight, _ = lm.arch.unembedding()
    if not 0 <= token < weight.shape[0]:
        raise TargetError(f"token id {token} is outside the model's vocabulary")
    return weight[token].detach()


def editor_factory(cls: Callable[..., T], name: str) -> Callable[..., T]:
    """Wrap a dataclass editor so unknown hyper-parameters give a one-line InputError."""
    fields = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]

    def make(**hparams: Any) -> T:
        unknown = sorted(set(hparams) - set(fields))
        if unknown:
            raise InputError(
                f"unknown hyper-parameter(s) {', '.join(unknown)} for {name!r}; "
                f"it takes: {', '.join(fields)}"
            )
        return cls(**hparams)

    make.__name__ = f"make_{name.replace('-', '_')}"
    make.__doc__ = cls.__doc__
    return make


def hparams_of(obj: Any, **resolved: Any) -> dict[str, Any]:
    """The editor's hyper-parameters with the per-model defaults filled in."""
    out = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
    out.update(resolved)
    return out


def require_subjects(lm: LensModel, requests: Sequence[Any], method: str) -> None:
    """Check, before any expensive work, that every request's subject is located in its prompt
    (``tokens.locate_subject``): ROME and MEMIT key on the subject's last token.

    Raises:
        InputError: an empty subject, or one the prompt does not contain.
    """
    for request in requests:
        if not request.subject or not request.subject.strip():
            raise InputError(
                f"{method} edits at the subject's last token: give the subject, e.g. "
                "subject='Eiffel Tower' (--subject on the command line)"
            )
        locate_subject(lm.tokenizer, request.prompt, request.subject)
