"""The shared shape of every editing method.

An editor is a callable ``editor(lm, requests) -> Edit``. It must leave the model exactly as it
found it (an editor that changes weights while it works restores them in ``finally``); the returned
:class:`Edit` carries the change as deltas and is applied explicitly.

Reverting restores the saved original tensors (``copy_``), not ``W + d - d``, so it is exact.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from backward_lens.errors import EditError, InputError
from backward_lens.io import JsonValue

if TYPE_CHECKING:
    from backward_lens.data import FactRecord
    from backward_lens.models import LensModel

EditInfo = dict[str, JsonValue]
"""What an editor reports in ``Edit.info`` (keys vary by editor; values are plain JSON)."""

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
        """Refuse an empty target or prompt, and a subject the prompt does not contain."""
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
        """The rewrite a CounterFact record asks for (its prompt, subject and new target).

        Raises:
            InputError: the record has no ``target_new``.
        """
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
        info: what the editor reports (chosen eta, skipped, losses...), JSON values only: it is
            saved in ``edit.json`` and written into result rows as ``edit_info``.
    """

    deltas: dict[str, Tensor]
    method: str
    hparams: dict[str, Any] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    model_name: str = ""
    fingerprint: str = ""
    base_digests: dict[str, str] = field(default_factory=dict)
    info: EditInfo = field(default_factory=dict)
    _originals: dict[str, Tensor] | None = field(default=None, repr=False)
    _model: weakref.ref[nn.Module] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_deltas(
        cls,
        lm: LensModel,
        deltas: dict[str, Tensor],
        method: str,
        hparams: dict[str, Any],
        requests: Sequence[RewriteRequest],
        info: EditInfo | None = None,
    ) -> Edit:
        """An edit of ``lm`` from dense weight changes, ready to apply, save or revert.

        Args:
            lm: the model the deltas were computed on (its fingerprint and base digests are kept).
            deltas: parameter name -> change, each shaped like the parameter (stored on CPU in the
                parameter's dtype).
            method: the editor's name.
            hparams: the editor's hyper-parameters (saved with the edit).
            requests: the facts the edit writes.
            info: anything else the editor reports (losses, norms...).
        """
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
        """True if this edit's deltas are in the weights of the model it was applied to.

        Checked against the weights, not just remembered: the edit must be on that model's
        stack of applied edits, and every parameter it changed must still hold the value it (or
        the latest edit applied after it to the same parameter) left there (by digest). A
        model whose weights were overwritten by other means reads False.
        """
        model = self._model() if self._model is not None else None
        if self._originals is None or model is None:
            return False
        return _stack_position(model, self) is not None and _stack_is_intact(model, self)

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The model's parameters, after :func:`check_edit_fits`.

        That checks the architecture, the names and shapes, and that the deltas are finite.
        """
        check_edit_fits(self, model)
        return dict(model.named_parameters())

    @torch.no_grad()
    def apply(self, model: nn.Module, check_base: bool = True) -> Edit:
        """Add the deltas in place, keeping the original values for :meth:`revert`.

        Edits applied to one model form a stack: each is pushed on apply and must be reverted
        before any edit applied earlier (:meth:`revert`). Each delta is added on its own
        weight's device and in its dtype (models split over devices work).

        Args:
            model: the model (a fresh copy of the edited model works too).
            check_base: refuse if the edited parameters differ from the ones the edit was made
                on (a different checkpoint, or an edit already applied).

        Raises:
            EditError: already applied, a different model, a changed base (with
                ``check_base``), or a parameter offloaded to the ``meta`` device.
        """
        if self._originals is not None:
            raise EditError("this edit is already applied; revert it first")
        params = self._params(model)
        offloaded = [k for k in self.deltas if params[k].device.type == "meta"]
        if offloaded:
            raise EditError(
                f"parameter {offloaded[0]} is offloaded (on the meta device) and cannot be edited "
                "in place; load the model without offloading (no device_map, or more max_memory)"
            )
        if check_base:
            for k, digest in self.base_digests.items():
                if _tensor_digest(params[k]) != digest:
                    raise EditError(
                        f"parameter {k} differs from the one this edit was made on (another "
                        "checkpoint, or already edited); pass check_base=False to apply anyway"
                    )
        self._originals = {k: params[k].detach().clone() for k in self.deltas}
        try:
            for k, delta in self.deltas.items():
                params[k].add_(delta.to(params[k].device, params[k].dtype))
        except BaseException:
            for k, original in self._originals.items():
                params[k].copy_(original)
            self._originals = None
            raise
        after = {k: _tensor_digest(params[k]) for k in self.deltas}
        _edit_stack(model).append((self, after))
        self._model = weakref.ref(model)
        return self

    @torch.no_grad()
    def revert(self, model: nn.Module) -> None:
        """Restore the exact original values (bit for bit) and pop this edit off the stack.

        Raises:
            EditError: not applied to ``model``; edits applied after it still applied (revert
                those first, most recent first); or the edited weights were changed since by
                something other than an edit. The weights are untouched in each case.
        """
        if self._originals is None:
            raise EditError("this edit is not applied")
        position = _stack_position(model, self)
        if position is None:
            raise EditError("this edit is applied to another model, not this one")
        stack = _edit_stack(model)
        later = stack[position + 1 :]
        if later:
            raise EditError(
                f"{len(later)} edit(s) applied after this one are still applied ("
                + ", ".join(repr(e.method) for e, _ in later)
                + "); revert them first, most recent first"
            )
        if not _stack_is_intact(model, self):
            raise EditError(
                "the edited weights changed since this edit was applied (not by an edit); "
                "reverting would overwrite that change; reload the model instead"
            )
        params = dict(model.named_parameters())
        for k, original in self._originals.items():
            params[k].copy_(original)
        stack.pop()
        self._originals = None
        self._model = None

    @contextmanager
    def applied(self, model: nn.Module, check_base: bool = True) -> Iterator[nn.Module]:
        """``with edit.applied(model): ...`` applies the edit and always reverts it.

        Blocks nest: ``with a.applied(m): with b.applied(m): ...`` reverts ``b`` then ``a``.
        """
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
        """What ``edit.json`` records (the deltas' SHA-256 is added by :meth:`save`)."""
        return {
            "format": _FORMAT,
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
        """Write ``path/deltas.safetensors`` and ``path/edit.json`` (with the deltas' SHA-256).

        The edit is written to a temporary folder beside ``path`` first. ``path`` may be new, an
        empty folder, or an earlier saved edit, which is replaced atomically: on Linux the two
        folders are exchanged in one ``renameat2`` call, elsewhere the old one is renamed aside,
        the new one moved in, then the old one deleted (restored if the move fails).

        Raises:
            OutputPathError: ``path`` holds anything but a saved edit (other files, a plain
                file), is the current folder, lies under a file, or cannot be written.
        """
        from safetensors.torch import save_file

        path = check_save_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_writes(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
        try:
            deltas = {k: v.detach().cpu().contiguous() for k, v in self.deltas.items()}
            save_file(deltas, str(tmp / _DELTAS))
            meta = {**self.metadata(), "deltas_sha256": _file_sha256(tmp / _DELTAS)}
            (tmp / _META).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
            for f in (tmp / _DELTAS, tmp / _META):
                _fsync(f)
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
            _swap_in(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> Edit:
        """Read a saved edit, verifying it; with ``model``, also check that it fits the model.

        Checks: both files present; ``edit.json`` a JSON object with the expected fields; the
        SHA-256 of ``deltas.safetensors`` equal to the one recorded (format 2; format-1 edits
        carry none and are read unverified); the safetensors readable; the deltas the recorded
        names and shapes, all finite; with ``model``: same architecture, every parameter present
        with the delta's shape.

        Raises:
            EditError: one line saying what is wrong with which file.
        """
        from safetensors.torch import load as load_bytes

        path = Path(path)
        meta_bytes, delta_bytes = _read_pair(path)
        meta = _read_meta(path / _META, meta_bytes)
        recorded = meta.get("deltas_sha256")
        if recorded is not None and hashlib.sha256(delta_bytes).hexdigest() != recorded:
            raise EditError(
                f"{path / _DELTAS} does not match the SHA-256 recorded in {_META}: it is corrupt "
                "or was changed after saving; save the edit again"
            )
        try:
            deltas = load_bytes(delta_bytes)
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise EditError(
                f"cannot read {path / _DELTAS} ({str(exc).splitlines()[0][:120] or 'corrupt'}); "
                "save the edit again"
            ) from None
        _check_deltas(path, deltas, meta.get("parameters"))
        edit = cls(
            deltas=deltas,
            method=meta["method"],
            hparams=meta["hparams"],
            requests=meta["requests"],
            model_name=meta["model_name"],
            fingerprint=meta["fingerprint"],
            base_digests=meta["base_digests"],
            info=meta["info"],
        )
        if model is not None:
            check_edit_fits(edit, model)
        return edit


_FORMAT = 2
"""edit.json format: 2 adds ``deltas_sha256``; 1 (no checksum) is still read."""

_META_FIELDS: dict[str, type | tuple[type, ...]] = {
    "method": str,
    "hparams": dict,
    "requests": list,
    "model_name": str,
    "fingerprint": str,
    "base_digests": dict,
    "info": dict,
}


def _read_pair(path: Path) -> tuple[bytes, bytes]:
    """The bytes of ``edit.json`` and ``deltas.safetensors``, both from the same folder.

    Holds even if :meth:`Edit.save` replaces the edit meanwhile: the folder is opened once and
    both files are read through it; if the folder was swapped out and deleted in between, read
    again.
    """
    if not path.is_dir() or not (path / _META).is_file() or not (path / _DELTAS).is_file():
        raise EditError(f"{path} is not a saved edit (expected {_META} and {_DELTAS} in it)")
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    for attempt in range(5):
        try:
            folder = os.open(path, flags)
        except OSError:
            continue
        try:
            fds = [os.open(name, os.O_RDONLY, dir_fd=folder) for name in (_META, _DELTAS)]
        except FileNotFoundError:
            if attempt == 4:
                break
            continue
        finally:
            os.close(folder)
        out = []
        for fd in fds:
            with os.fdopen(fd, "rb") as f:
                out.append(f.read())
        return out[0], out[1]
    raise EditError(f"{path} is not a saved edit (expected {_META} and {_DELTAS} in it)")


def _read_meta(file: Path, data: bytes) -> dict[str, Any]:
    """``edit.json`` as a dict with every field of :data:`_META_FIELDS` (defaults for format 1)."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EditError(f"{file} is not valid JSON; the saved edit is damaged") from None
    if not isinstance(meta, dict):
        raise EditError(f"{file} is not a JSON object; the saved edit is damaged")
    fmt = meta.get("format")
    if fmt not in (1, _FORMAT):
        raise EditError(f"{file} has format {fmt!r}; this version reads formats 1 and {_FORMAT}")
    required = ["method"] if fmt == 1 else [*_META_FIELDS, "parameters", "deltas_sha256"]
    missing = [k for k in required if k not in meta]
    if missing:
        raise EditError(f"{file} lacks {', '.join(missing)}; the saved edit is incomplete")
    defaults: dict[str, Any] = {"hparams": {}, "requests": [], "base_digests": {}, "info": {}}
    for key, kind in _META_FIELDS.items():
        meta.setdefault(key, defaults.get(key, ""))
        if not isinstance(meta[key], kind):
            raise EditError(f"{file}: {key} has the wrong type; the saved edit is damaged")
    if not all(isinstance(r, dict) for r in meta["requests"]):
        raise EditError(f"{file}: requests must be JSON objects; the saved edit is damaged")
    params = meta.get("parameters")
    if params is not None and not (
        isinstance(params, dict)
        and all(
            isinstance(v, list) and all(isinstance(d, int) and d >= 0 for d in v)
            for v in params.values()
        )
    ):
        raise EditError(f"{file}: parameters must map names to shapes; the saved edit is damaged")
    if not isinstance(meta.get("deltas_sha256", ""), str):
        raise EditError(f"{file}: deltas_sha256 must be a hex string")
    return meta


def _check_deltas(
    path: Path, deltas: dict[str, Tensor], shapes: dict[str, list[int]] | None
) -> None:
    """The deltas are the recorded parameters, with the recorded shapes, and finite."""
    if shapes is not None:
        if set(shapes) != set(deltas):
            raise EditError(
                f"{path}: {_DELTAS} holds {sorted(deltas)} but {_META} lists {sorted(shapes)}"
            )
        for k, v in deltas.items():
            if list(v.shape) != shapes[k]:
                raise EditError(
                    f"{path}: delta {k} has shape {list(v.shape)}, {_META} says {shapes[k]}"
                )
    for k, v in deltas.items():
        if not v.is_floating_point():
            raise EditError(f"{path}: delta {k} is {v.dtype}, not a float tensor")
        if not bool(torch.isfinite(v).all()):
            raise EditError(f"{path}: delta {k} holds NaN or infinite values; refusing to apply it")


def check_edit_fits(edit: Edit, model: nn.Module) -> None:
    """``edit`` was made for ``model``'s architecture and each delta has its parameter's shape.

    Raises:
        EditError: another architecture, a missing parameter, a wrong shape, non-finite values.
    """
    if edit.fingerprint and model_fingerprint(model) != edit.fingerprint:
        raise EditError(
            f"this edit was made for a different model ({edit.model_name!r}, architecture "
            f"{edit.fingerprint}); load that model to apply it"
        )
    params = dict(model.named_parameters())
    for k, v in edit.deltas.items():
        if k not in params:
            raise EditError(f"the model has no parameter {k}; wrong model for this edit")
        if tuple(v.shape) != tuple(params[k].shape):
            raise EditError(
                f"delta {k} has shape {list(v.shape)} but the model's parameter has "
                f"{list(params[k].shape)}; wrong model for this edit"
            )
        if not bool(torch.isfinite(v).all()):
            raise EditError(f"delta {k} holds NaN or infinite values; refusing to apply it")


_STACKS: weakref.WeakKeyDictionary[nn.Module, list[tuple[Edit, dict[str, str]]]] = (
    weakref.WeakKeyDictionary()
)
"""Per model: the applied edits, oldest first, each with its parameters' digests after it."""


def _edit_stack(model: nn.Module) -> list[tuple[Edit, dict[str, str]]]:
    return _STACKS.setdefault(model, [])


def applied_edits(model: nn.Module) -> list[Edit]:
    """The edits applied to ``model`` and not yet reverted, oldest first."""
    return [edit for edit, _ in _STACKS.get(model, [])]


def _stack_position(model: nn.Module, edit: Edit) -> int | None:
    for i, (e, _) in enumerate(_STACKS.get(model, [])):
        if e is edit:
            return i
    return None


def _stack_is_intact(model: nn.Module, edit: Edit) -> bool:
    """Each parameter ``edit`` changed holds what the last edit on the stack to touch it left."""
    stack = _STACKS.get(model, [])
    position = _stack_position(model, edit)
    if position is None:
        return False
    expected: dict[str, str] = {}
    for _, after in stack[position:]:
        expected.update({k: v for k, v in after.items() if k in edit.deltas})
    params = dict(model.named_parameters())
    return all(_tensor_digest(params[k]) == digest for k, digest in expected.items())


def is_saved_edit(path: Path) -> bool:
    """True for a folder holding exactly a saved edit's files (or nothing at all)."""
    if path.is_symlink() or not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    return names <= {_META, _DELTAS} and (not names or _META in names)


def check_save_path(path: str | Path) -> Path:
    """Where :meth:`Edit.save` may write: a new path, an empty folder, or a saved edit.

    Raises:
        OutputPathError: anything else (a folder with other files, a file, the current
            folder, a path under a file, an unwritable place).
    """
    from backward_lens import checks
    from backward_lens.errors import OutputPathError

    p = Path(path)
    if str(path).strip() == "":
        raise OutputPathError("--save: empty path; give a folder name")
    checks.not_current_folder(p, "--save")
    if (p.exists() or p.is_symlink()) and not is_saved_edit(p):
        kind = "a file" if p.is_file() else "a folder holding other files"
        if p.is_symlink():
            kind = "a link"
        raise OutputPathError(
            f"--save: {p} is {kind}, not a saved edit; refusing to replace it (choose a new "
            "folder name)"
        )
    checks.output_folder(p.parent, "--save")
    return p


def _file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns:
        False if the system cannot.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return bool(rc == 0)


STALE_WRITE_SECONDS = 3600.0
"""A ``.NAME.new-*`` folder untouched for this long is the leftover of a save that was killed."""


def _remove_stale_writes(path: Path) -> None:
    """Remove the temporary folders of earlier saves to ``path`` that were killed mid-write.

    Those are ``.NAME.new-*`` older than :data:`STALE_WRITE_SECONDS` (a younger one may be a
    save in progress). Folders set aside as ``.NAME.old-*`` are never removed: one could be the
    only copy of an earlier edit.
    """
    now = time.time()
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.new-*"):
        try:
            if leftover.is_dir() and now - leftover.stat().st_mtime > STALE_WRITE_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue


def _swap_in(new: Path, path: Path) -> None:
    """Move the folder ``new`` to ``path``, replacing a saved edit there.

    There is no moment in which ``path`` holds no complete edit; ``new`` ends up holding the old
    edit (or gone).
    """
    if not path.exists():
        os.replace(new, path)
        return
    if _exchange(new, path):
        return  # ``new`` now holds the old edit; the caller deletes it
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, aside)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


class Editor(Protocol):
    """``editor(lm, requests) -> Edit``; must leave ``lm.model`` unchanged.

    Built-in editors are dataclasses whose init fields are their hyper-parameters; the table of
    editors (``editing/table.py``) builds them by name.
    """

    name: str

    def __call__(self, lm: LensModel, requests: Sequence[RewriteRequest]) -> Edit:
        """Compute the edit of ``requests`` on ``lm`` (the model is left unchanged)."""
        ...


SETTING: dict[str, bool] = {"hparam": False}
"""``field(metadata=SETTING)`` marks a dataclass editor's field that is not a hyper-parameter
(the name its edits carry, the per-model defaults it reads): preset by the table of editors,
refused from users, and not recorded in ``Edit.hparams``."""


def hyperparameter_names(editor_class: type) -> list[str]:
    """The hyper-parameters a dataclass editor takes: its init fields, less :data:`SETTING` ones."""
    return [f.name for f in fields(editor_class) if f.init and f.metadata.get("hparam", True)]


def hparams_of(editor: Any, **resolved: Any) -> dict[str, Any]:
    """The editor's hyper-parameters as recorded in ``Edit.hparams``.

    Args:
        editor: a dataclass editor.
        **resolved: values the editor resolved for this model (the default layer, eta...),
            replacing the ``None`` it was configured with.

    Returns:
        Hyper-parameter name -> value.
    """
    out = {name: getattr(editor, name) for name in hyperparameter_names(type(editor))}
    out.update(resolved)
    return out
