"""The table of editors: every editing method by name, and :func:`get_editor`.

One entry per method name; a new editor is one entry here. An entry is an :class:`EditorSpec`
(a dataclass editor and the fields its name presets, e.g. ``ft-early`` = fine-tuning at the early
layer) or any callable ``factory(**hparams) -> Editor``. The editor modules import only
``editing/base.py`` and lower modules, never this table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from backward_lens import checks
from backward_lens.editing.base import Editor, hyperparameter_names
from backward_lens.editing.finetune import FineTune
from backward_lens.editing.memit import MEMIT
from backward_lens.editing.rome import ROME
from backward_lens.editing.shift import AdaptiveShift, ForwardPassShift
from backward_lens.errors import InputError


@dataclass(frozen=True)
class EditorSpec:
    """One table entry: a dataclass editor and the fields its name presets.

    Attributes:
        editor: the editor class (a dataclass; its init fields are its hyper-parameters).
        presets: fields set by the name: settings (``name``, ``defaults_key``) and preset
            hyper-parameters (``norm_constraint`` of ``ft-l``); a user's hyper-parameter of the
            same name replaces the preset one.
    """

    editor: type
    presets: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, **hparams: Any) -> Editor:
        """The editor configured with the presets and ``hparams``.

        Raises:
            InputError: a name the editor does not take as a hyper-parameter.
        """
        takes = hyperparameter_names(self.editor)
        unknown = sorted(set(hparams) - set(takes))
        if unknown:
            name = self.presets.get("name", getattr(self.editor, "name", self.editor.__name__))
            raise InputError(
                f"unknown hyper-parameter(s) {', '.join(unknown)} for {name!r}; "
                f"it takes: {', '.join(takes)}"
            )
        editor: Editor = self.editor(**{**self.presets, **hparams})
        return editor


EDITORS: dict[str, Callable[..., Editor]] = {
    "shift": EditorSpec(ForwardPassShift),
    "shift-adaptive": EditorSpec(AdaptiveShift),
    "rome": EditorSpec(ROME),
    "memit": EditorSpec(MEMIT),
    # fine-tuning (spec §6.3): ``ft`` and ``ft-late`` at the late layer (forward pass shift's),
    # ``ft-early`` at layer 0, ``ft-l`` ROME's FT-L (layer 0, L-infinity radius 5e-4)
    "ft": EditorSpec(FineTune),
    "ft-late": EditorSpec(FineTune, {"name": "ft-late", "defaults_key": "ft-late"}),
    "ft-early": EditorSpec(FineTune, {"name": "ft-early", "defaults_key": "ft-early"}),
    "ft-l": EditorSpec(
        FineTune, {"name": "ft-l", "defaults_key": "ft-early", "norm_constraint": 5e-4}
    ),
}
"""Editor factories by method name: ``EDITORS[name](**hparams) -> Editor``."""


def get_editor(name: str, /, **hparams: Any) -> Editor:
    """The editor called ``name`` configured with ``hparams``.

    Args:
        name: a key of :data:`EDITORS` (``shift``, ``rome``, ``memit``, ``ft``...).
        **hparams: the editor's hyper-parameters; values are checked by ``checks.hparams``
            (shared with the CLI and the viewer).

    Raises:
        InputError: an unknown method, an unknown hyper-parameter or a bad value.
    """
    if name not in EDITORS:
        raise InputError(
            f"unknown editing method {name!r}; available: {', '.join(sorted(EDITORS))}"
        )
    checks.hparams(name, hparams)
    return EDITORS[name](**hparams)
