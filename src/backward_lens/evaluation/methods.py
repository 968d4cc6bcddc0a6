"""Editing methods of an evaluation run: ``NAME`` or ``NAME:key=value,...``, and their editors.

The one hyper-parameter syntax of the package: ``key=value`` with the value read as JSON when it
parses (``layer=3``, ``layers=[3,4]``, ``eta=0.5``), else kept as text (:func:`parse_hparam`);
a sweep's values are ``key=v1,v2,...`` (:func:`parse_values`). ``evaluate --method``,
``sweep --hparam/--fixed`` and ``edit --hparam`` all read it here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from backward_lens.editing.base import Editor
from backward_lens.editing.table import get_editor
from backward_lens.errors import InputError
from backward_lens.models import LensModel

UNEDITED = "unedited"
"""The baseline method: no edit."""


def parse_hparam(item: str, where: str = "") -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``, the value read as JSON when it parses, else text.

    Args:
        item: one ``key=value`` item.
        where: where it was written, for the error message (e.g. ``"in 'ft:layer=0'"``).

    Raises:
        InputError: no ``=`` or an empty key.
    """
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
        place = f" {where}" if where else ""
        raise InputError(f"cannot read {item!r}{place}; write key=value")
    return key.strip(), read_value(value)


def read_value(text: str) -> Any:
    """One hyper-parameter value: read as JSON when it parses (``3``, ``[3,4]``), else text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_values(item: str, where: str = "") -> tuple[str, list[Any]]:
    """``"key=v1,v2,..."`` -> ``(key, [v1, v2, ...])``: the values a sweep tries.

    Each value is read as :func:`parse_hparam` reads one (JSON when it parses, else text); the
    values are split on the commas outside brackets (:func:`split_items`), so
    ``layers=[3,4],[5,6]`` gives two lists.

    Args:
        item: ``key=`` and comma-separated values.
        where: where it was written, for the error message (e.g. ``"in --hparam"``).

    Returns:
        The key and the values, in order.

    Raises:
        InputError: no ``=``, an empty key, no value, an empty value or unbalanced brackets.
    """
    key, _ = parse_hparam(item, where)
    rest = item.partition("=")[2]
    place = f" {where}" if where else ""
    opened = sum(rest.count(c) for c in "[{") - sum(rest.count(c) for c in "]}")
    if opened:
        raise InputError(f"unbalanced brackets in {item!r}{place}; write {key}=V1,V2,...")
    pieces = split_items(rest)
    if not pieces or any(not p.strip() for p in pieces):
        raise InputError(f"an empty value in {item!r}{place}; write {key}=V1,V2,...")
    return key, [read_value(p.strip()) for p in pieces]


@dataclass(frozen=True)
class MethodSpec:
    """An editor name, its hyper-parameters, and the label its rows carry.

    Written on the command line as ``NAME`` or ``NAME:key=value,key=value`` (values are read as
    JSON when they parse, e.g. ``layer=3``, ``layers=[3,4]``, ``eta=0.5``); the label is the text.
    """

    name: str
    hparams: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        """``NAME`` or ``NAME:key=value,key=value`` -> a spec labelled with the text.

        Raises:
            InputError: no name, or an item that is not ``key=value``.
        """
        text = text.strip()
        name, _, rest = text.partition(":")
        if not name:
            raise InputError(f"empty method name in {text!r}; write NAME or NAME:key=value,...")
        hparams: dict[str, Any] = {}
        if rest:
            for item in split_items(rest):
                key, value = parse_hparam(item, f"in {text!r}")
                hparams[key] = value
        return cls(name, hparams, text)

    def __post_init__(self) -> None:
        """Label the spec with its name when no label is given."""
        if not self.label:
            object.__setattr__(self, "label", self.name)


def split_items(text: str) -> list[str]:
    """Split on commas outside brackets (``layers=[3,4],lr=0.1`` -> two items)."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    return [*items, cur] if cur else items


class Method:
    """A method of a run: its spec and its editor, built once (None for the unedited baseline).

    Args:
        lm: the model (editors are built for it).
        spec: the method.

    Raises:
        InputError: hyper-parameters for the baseline, an unknown editor or bad values.
    """

    def __init__(self, lm: LensModel, spec: MethodSpec) -> None:
        self.spec = spec
        self.editor: Editor | None = None
        if spec.name == UNEDITED:
            if spec.hparams:
                raise InputError("the unedited baseline takes no hyper-parameters")
            self.editor_name = UNEDITED
            return
        self.editor_name = spec.name
        self.editor = get_editor(spec.name, **spec.hparams)


def as_specs(methods: Sequence[MethodSpec | str]) -> list[MethodSpec]:
    """Specs from specs or their text (:meth:`MethodSpec.parse`)."""
    return [m if isinstance(m, MethodSpec) else MethodSpec.parse(m) for m in methods]


def check_methods(methods: Sequence[MethodSpec | str]) -> list[MethodSpec]:
    """Parse method specs and build their editors once, so a typo fails before any work."""
    specs = as_specs(methods)
    for spec in specs:
        if spec.name == UNEDITED:
            continue
        get_editor(spec.name, **spec.hparams)
    return specs
