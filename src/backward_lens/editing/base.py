"""The shared shape of every editing method.

An editor is a callable ``editor(lm, requests) -> Edit``. It must leave the model exactly as it
found it (an editor that changes weights while it works restores them in ``finally``); the returned
:class:`Edit` carries the change as deltas and is applied explicitly.

Reverting restores the saved original tensors (``copy_``), not ``W + d - d``, so it is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from backward_lens.errors import EditError, InputError

if TYPE_CHECKING:
    from backward_lens.data import FactRecord
    from backward_lens.models import LensModel

_DELTAS = "deltas.safetensors"
_META = "edit.json"


@dataclass(frozen=True)
class RewriteRequest:
    """One fact to rewrite: in ``prompt``, ``subject`` should now lead to ``target_new``."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self) -> None:
        if not self.target_new or not self.target_new.strip():
            raise InputError("the new target is empty; give the object the model should learn")
        if not self.prompt or not self.prompt.strip():
            raise InputError("the edit prompt is empty")
        if self.subject and self.subject not in self.prompt:
            raise InputError(
                f"the subject {self.subject!r} does not occur in the prompt {self.prompt!r}"
            )

    @classmethod
    def from_record(cls, record: FactRecord) -> RewriteRequest:
        if record.target_new is None:
            raise InputError(f"record {record.case_id} has no target_new to edit towards")
        return cls(record.prompt, record.subject, record.target_new, record.target_true)


def model_fingerprint(model: nn.Module) -> str:
    """Architecture identity: model type plus every parameter's name and shape."""
    h = hashlib.sha256(str(getattr(model.config, "model_type", type(model).__name__)).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def _tensor_digest(t: Tensor) -> str:
    data = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass
class Edit:
    """Weight deltas for named parameters, and what they edit.

    Attributes:
        deltas: parameter name (as in ``model.named_parameters()``) -> delta, same shape.
        method: the editor's name.
        hparams: the hyper-parameters used.
        requests: the rewrite requests, as dicts.
        model_name: the model the edit was computed on.
        fingerprint: :func:`model_fingerprint` of that model.
        base_digests: hash of each edited parameter's value before the edit; ``apply`` checks it.
        info: anything the editor wants to report (chosen eta, skipped, loss...).
    """

    deltas: dict[str, Tensor]
    method: str
    hparams: dict[str, Any] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    model_name: str = ""
    fingerprint: str = ""
    base_digests: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    _originals: dict[str, Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_deltas(
        cls,
        lm: LensModel,
        deltas: dict[str, Tensor],
        method: str,
        hparams: dict[str, Any],
        requests: Sequence[RewriteRequest],
        info: dict[str, Any] | None = None,
    ) -> Edit:
        params = dict(lm.model.named_parameters())
        return cls(
            deltas={k: v.detach().to(params[k].dtype).cpu() for k, v in deltas.items()},
            method=method,
            hparams=dict(hparams),
            requests=[asdict(r) for r in requests],
            model_name=lm.name,
            fingerprint=model_fingerprint(lm.model),
            base_digests={k: _tensor_digest(params[k]) for k in deltas},
            info=dict(info or {}),
        )

    @property
    def is_applied(self) -> bool:
        return self._originals is not None

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        if self.fingerprint and model_fingerprint(model) != self.fingerprint:
            raise EditError(
                f"this edit was made for a different model ({self.model_name!r}, architecture "
                f"{self.fingerprint}); load that model to apply it"
            )
        missing = [k for k in self.deltas if k not in params]
        if missing:
            raise EditError(f"the model has no parameter(s) {missing}; wrong model for this edit")
        return params

    @torch.no_grad()
    def apply(self, model: nn.Module, check_base: bool = True) -> Edit:
        """Add the deltas in place, keeping the original values for :meth:`revert`.

        Args:
            model: the model (a fresh copy of the edited model works too).
            check_base: refuse if the edited parameters differ from the ones the edit was made
                on (a different checkpoint, or an edit already applied).
        """
        if self._originals is not None:
            raise EditError("this edit is already applied; revert it first")
        params = self._params(model)
        if check_base:
            for k, digest in self.base_digests.items():
                if _tensor_digest(params[k]) != digest:
                    raise EditError(
                        f"parameter {k} differs from the one this edit was made on (another "
                        "checkpoint, or already edited); pass check_base=False to apply anyway"
                    )
        self._originals = {k: params[k].detach().clone() for k in self.deltas}
        for k, delta in self.deltas.items():
            params[k].add_(delta.to(params[k].device, params[k].dtype))
        return self

    @torch.no_grad()
    def revert(self, model: nn.Module) -> None:
        """Restore the exact original values (bit for bit)."""
        if self._originals is None:
            raise EditError("this edit is not applied")
        params = dict(model.named_parameters())
        for k, original in self._originals.items():
            params[k].copy_(original)
        self._originals = None

    @contextmanager
    def applied(self, model: nn.Module, check_base: bool = True) -> Iterator[nn.Module]:
        """``with edit.applied(model): ...`` applies the edit and always reverts it."""
        self.apply(model, check_base=check_base)
        try:
            yield model
        finally:
            self.revert(model)

    def compose(self, other: Edit) -> Edit:
        """One edit doing both (deltas added); both must be for the same model."""
        if other.fingerprint != self.fingerprint:
            raise EditError("cannot compose edits made for different models")
        deltas = {k: v.clone() for k, v in self.deltas.items()}
        for k, v in other.deltas.items():
            deltas[k] = deltas[k] + v if k in deltas else v.clone()
        return Edit(
            deltas=deltas,
            method=self.method if self.method == other.method else f"{self.method}+{other.method}",
            hparams={**self.hparams, **other.hparams},
            requests=self.requests + other.requests,
            model_name=self.model_name,
            fingerprint=self.fingerprint,
            base_digests={**other.base_digests, **self.base_digests},
            info={"composed": [self.info, other.info]},
        )

    def metadata(self) -> dict[str, Any]:
        return {
            "format": 1,
            "method": self.method,
            "hparams": self.hparams,
            "requests": self.requests,
            "model_name": self.model_name,
            "fingerprint": self.fingerprint,
            "base_digests": self.base_digests,
            "info": self.info,
            "parameters": {k: list(v.shape) for k, v in self.deltas.items()},
        }

    def save(self, path: str | Path) -> Path:
        """Write ``path/deltas.safetensors`` and ``path/edit.json`` atomically (via a temp dir)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_file({k: v.contiguous() for k, v in self.deltas.items()}, str(tmp / _DELTAS))
            (tmp / _META).write_text(json.dumps(self.metadata(), indent=2, default=str))
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Edit:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / _META).is_file() or not (path / _DELTAS).is_file():
            raise EditError(f"{path} is not a saved edit (expected {_META} and {_DELTAS} in it)")
        meta = json.loads((path / _META).read_text())
        return cls(
            deltas=load_file(str(path / _DELTAS)),
            method=meta["method"],
            hparams=meta.get("hparams", {}),
            requests=meta.get("requests", []),
            model_name=meta.get("model_name", ""),
            fingerprint=meta.get("fingerprint", ""),
            base_digests=meta.get("base_digests", {}),
            info=meta.get("info", {}),
        )


class Editor(Protocol):
    """``editor(lm, requests) -> Edit``; must leave ``lm.model`` unchanged."""

    name: str

    def __call__(self, lm: LensModel, requests: Sequence[RewriteRequest]) -> Edit: ...


EDITORS: dict[str, Callable[..., Editor]] = {}
"""Editor factories by method name: ``EDITORS[name](**hparams) -> Editor``."""


def register_editor(name: str) -> Callable[[Callable[..., Editor]], Callable[..., Editor]]:
    def deco(factory: Callable[..., Editor]) -> Callable[..., Editor]:
        EDITORS[name] = factory
        return factory

    return deco


def get_editor(name: str, **hparams: Any) -> Editor:
    """The editor called ``name`` configured with ``hparams``; a clear error for unknown names."""
    import backward_lens.editing.methods  # noqa: F401  (registers the built-in editors)

    if name not in EDITORS:
        raise InputError(
            f"unknown editing method {name!r}; available: {', '.join(sorted(EDITORS))}"
        )
    return EDITORS[name](**hparams)
