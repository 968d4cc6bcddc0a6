"""Command-line options built from configuration dataclasses, and the CLI's shared vocabulary.

A configuration dataclass of the library (``EvalSettings``, ``StudyOptions``, ``TraceConfig``,
``FinetuneConfig``, ...) declares its command-line options in its fields' metadata, so that a
default and its help live once, beside the field, and the same object can be built from Python::

    batch_size: int = field(default=32, metadata={"help": "sequences per forward pass",
                                                  "flag": "--batch-size", "min": 1})

A field becomes an option only when its metadata has ``"help"``. Metadata keys (plain values, so
the library never imports this module):

- ``help``: what the option does; `` (default: ...)`` is appended from the field's default.
- ``flag``: the option's name (default: ``--`` + the field's name with ``-`` for ``_``).
- ``metavar``, ``choices``: as in argparse (metavar default: N, X, A,B, LAYERS or TEXT).
- ``min``: ``1`` for integers of 1 or more (refused by the parser otherwise).
- ``parse``: ``"layers"`` for layer lists (``0,5,10-12,-1``), read when the config is built.
- ``default_help``: how the default reads in the help (e.g. ``"all"`` for None).
- ``aliases``: old spellings, accepted but hidden, each printing one deprecation note.

Lists and tuples of strings are written comma-separated (``--kinds hidden,mlp``). Booleans
that default to False become switches. :func:`add_config_arguments` adds the options to a
parser; :func:`config_from_args` builds the dataclass back from the parsed namespace.

The vocabulary shared by the commands lives here too (:data:`SHARED`): one spelling per concept
(``--records``, never ``--n``; ``--resume`` and ``--fresh`` with one meaning; ``--json [FILE]``),
each help opening with the same words in every command. ``tests/test_cli_vocabulary.py`` walks
every parser and holds them to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from backward_lens.errors import InputError

T = TypeVar("T")


def positive_int(text: str) -> int:
    """Argparse type: an integer of 1 or more.

    Raises:
        argparse.ArgumentTypeError: a number below 1 (argparse prints it in one line).
        ValueError: not an integer.
    """
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_layers(text: str | None) -> list[int] | None:
    """Read a layer list: ``"0,5,10-12,-1"`` -> [0, 5, 10, 11, 12, -1].

    None, ``""`` or ``"all"`` -> None (every layer). Indices are not range-checked here (the
    model is not known yet); see :func:`backward_lens.checks.layers`.

    Raises:
        InputError: unreadable text, or a reversed range such as ``12-10``.
    """
    if text is None or text.strip().lower() in ("", "all"):
        return None
    layers: list[int] = []
    for piece in text.split(","):
        piece = piece.strip()
        try:
            if "-" in piece[1:]:
                lo, hi = piece[0] + piece[1:].split("-", 1)[0], piece[1:].split("-", 1)[1]
                first, last = int(lo), int(hi)
            else:
                first = last = int(piece)
        except ValueError:
            raise InputError(
                f"cannot read layers {text!r}; use indices and ranges such as 0,5,10-12,-1"
            ) from None
        if last < first:
            raise InputError(
                f"the layer range {piece} in {text!r} is reversed; write {last}-{first}"
            )
        layers.extend(range(first, last + 1))
    return layers


@dataclass(frozen=True)
class Shared:
    """One concept of the shared vocabulary: its only spelling and how its help opens.

    Attributes:
        flag: the option, e.g. ``--records``.
        stem: the words every command's help of this option starts with.
        metavar: the placeholder shown in usage lines (None: a switch or argparse's own).
    """

    flag: str
    stem: str
    metavar: str | None = None


SHARED: dict[str, Shared] = {
    s.flag: s
    for s in (
        Shared("--records", "records to use:", "N"),
        Shared("--data", "input records:", "FILE"),
        Shared("--out", "output folder:", "DIR"),
        Shared("--seed", "random seed:", "N"),
        Shared("--batch-size", "batch size:", "N"),
        Shared("--model", "model:", "SPEC"),
        Shared("--shard", "run only part K of N (K from 0):", "K/N"),
        Shared("--workers", "compute on N Ray workers", "N"),
        Shared("--ray-address", "use the existing Ray cluster at ADDR", "ADDR"),
        Shared("--resume", "continue the run in --out:"),
        Shared("--fresh", "start the run in --out again:"),
        Shared("--json", "JSON:", "FILE"),
        Shared("--quiet", "print less:"),
    )
}
"""The shared vocabulary, by flag. A command offering one of these concepts uses this spelling,
this metavar and a help that starts with ``stem`` (``tests/test_cli_vocabulary.py`` checks)."""

DEPRECATED: dict[str, str] = {
    "--n": "--records",  # study
    "--overwrite": "--fresh",  # evaluate
    "--top": "--top-k",  # study
    "--batch-rows": "--batch-size",  # trace
}
"""Old spellings still accepted (hidden from ``--help``), mapped to the one to use instead."""

RESUME_HELP = (
    "continue the run in --out: keep every finished row, compute only what is missing (refused "
    "when --out holds a run made with other settings)"
)
FRESH_HELP = (
    "start the run in --out again: first discard this command's own earlier rows there (no "
    "other file is touched)"
)
JSON_HELP = "JSON: write the result as JSON to FILE, or print it (alone) when no FILE is given"


def shared_help(flag: str, detail: str) -> str:
    """The help of shared option ``flag``: its stem, then the command's ``detail``.

    Raises:
        KeyError: ``flag`` is not in :data:`SHARED`.
    """
    return f"{SHARED[flag].stem} {detail}"


def add_shared(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    detail: str,
    **kwargs: Any,
) -> argparse.Action:
    """Add shared option ``flag`` with its one metavar and a help opening with its stem.

    Args:
        parser: the parser (or group) to add to.
        flag: a key of :data:`SHARED`.
        detail: what the option means in this command (its default included).
        **kwargs: the rest of ``add_argument``'s arguments (type, default, required...).

    Returns:
        The argparse action.
    """
    shared = SHARED[flag]
    if shared.metavar is not None and kwargs.get("action") is None:
        kwargs.setdefault("metavar", shared.metavar)
    return parser.add_argument(flag, help=_escape(shared_help(flag, detail)), **kwargs)


class _DeprecatedAlias(argparse.Action):
    """Store the value of an old spelling under the new option's name, with one note."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        self.new = kwargs.pop("new")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        """Store ``values`` (or True for a switch) and print the one-line deprecation note."""
        print(
            f"backward-lens: note: {option_string} is deprecated; use {self.new}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def add_deprecated_alias(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    old: str,
    new_action: argparse.Action,
) -> None:
    """Accept ``old`` (hidden from ``--help``) as a spelling of ``new_action``'s option.

    The value is parsed exactly like the new option's and stored in the same place; a single
    ``backward-lens: note:`` line on stderr names the new spelling.
    """
    if DEPRECATED.get(old) != new_action.option_strings[0]:
        raise ValueError(f"list {old} -> {new_action.option_strings[0]} in DEPRECATED")
    kwargs: dict[str, Any] = {"nargs": 0} if new_action.nargs == 0 else {}
    if new_action.type is not None and new_action.nargs != 0:
        kwargs["type"] = new_action.type
    parser.add_argument(
        old,
        dest=new_action.dest,
        action=_DeprecatedAlias,
        new=new_action.option_strings[0],
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
        **kwargs,
    )


def add_run_folder_flags(parser: argparse.ArgumentParser) -> None:
    """``--resume`` / ``--fresh`` (mutually exclusive), the same two words in every command.

    What a command does when neither is given (study and trace resume; evaluate refuses a folder
    that already holds results) is said in its description.
    """
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help=RESUME_HELP)
    fresh = group.add_argument("--fresh", action="store_true", help=FRESH_HELP)
    add_deprecated_alias(group, "--overwrite", fresh)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """``--json [FILE]``: the result as JSON, written to FILE or printed when FILE is left out."""
    parser.add_argument(
        "--json", nargs="?", const="-", default=None, metavar="FILE", help=_escape(JSON_HELP)
    )


def signature_default(func: Callable[..., Any], name: str) -> Any:
    """The default of parameter ``name`` of ``func``: the one place a CLI default comes from.

    Raises:
        KeyError: ``func`` has no parameter ``name``.
        ValueError: the parameter has no default.
    """
    spec = inspect.getfullargspec(func)
    defaults = dict(spec.kwonlydefaults or {})
    if spec.defaults:
        defaults.update(zip(spec.args[-len(spec.defaults) :], spec.defaults, strict=True))
    if name not in spec.args and name not in spec.kwonlyargs:
        raise KeyError(f"{func.__qualname__} has no parameter {name!r}")
    if name not in defaults:
        raise ValueError(f"{func.__qualname__}({name}) has no default")
    return defaults[name]


# -- options from dataclass fields -------------------------------------------------------------


def option_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of dataclass ``cls`` that are command-line options (metadata with "help")."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_of(f: dataclasses.Field[Any]) -> str:
    """The option of field ``f``: its metadata's ``flag``, else ``--`` + its dashed name."""
    return str(f.metadata.get("flag", "--" + f.name.replace("_", "-")))


def dest_of(f: dataclasses.Field[Any]) -> str:
    """Where the parsed value of field ``f`` is kept: its option's name with ``_`` for ``-``.

    Named after the flag, not the field, so that two configurations in one command (sweep's
    ``--records`` and ``FluencySettings.records`` as ``--fluency-records``) never share a slot.
    """
    return flag_of(f).removeprefix("--").replace("-", "_")


def _escape(text: str) -> str:
    return text.replace("%", "%%")


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    """``int | None`` -> (int, True); ``int`` -> (int, False)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _is_text_list(hint: Any) -> bool:
    return typing.get_origin(hint) in (list, tuple) and str in typing.get_args(hint)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _metavar(hint: Any, meta: Mapping[str, Any]) -> str:
    """The placeholder of an option: N for integers, X for numbers, A,B for lists, ..."""
    if meta.get("parse") == "layers":
        return "LAYERS"
    if _is_text_list(hint):
        return "A,B"
    return {int: "N", float: "X"}.get(hint, "TEXT")


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: Sequence[str] | None = None,
    skip: Sequence[str] = (),
) -> dict[str, argparse.Action]:
    """Add one option per option field of dataclass ``cls`` (see the module's docstring).

    Args:
        parser: the parser or argument group.
        cls: the configuration dataclass.
        only: add only these fields (None: every option field).
        skip: leave out these fields (a command that sets them itself).

    Returns:
        Field name -> the argparse action added.

    Raises:
        TypeError: a field type the builder cannot write on a command line.
    """
    hints = typing.get_type_hints(cls)
    actions: dict[str, argparse.Action] = {}
    for f in option_fields(cls):
        if (only is not None and f.name not in only) or f.name in skip:
            continue
        meta: Mapping[str, Any] = f.metadata
        flag = flag_of(f)
        default = _field_default(f)
        hint, optional = _strip_optional(hints[f.name])
        kwargs: dict[str, Any] = {"dest": dest_of(f)}
        switch = hint is bool and not optional
        shown = meta.get("default_help", None if default is dataclasses.MISSING else _show(default))
        detail = str(meta["help"]) + (f" (default: {shown})" if shown and not switch else "")
        if switch:
            if default is not False:
                raise TypeError(f"{cls.__name__}.{f.name}: only False-default switches")
            kwargs.update(action="store_true", default=False)
        else:
            if default is dataclasses.MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = _show(default) if _is_text_list(hint) else default
            if meta.get("parse") == "layers" or _is_text_list(hint) or hint is str:
                pass  # text, read as it is (lists and layers when the config is built)
            elif hint is int:
                kwargs["type"] = positive_int if meta.get("min") == 1 else int
            elif hint is float:
                kwargs["type"] = float
            else:
                raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {hint}")
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
            elif flag in SHARED and SHARED[flag].metavar is not None:
                kwargs["metavar"] = SHARED[flag].metavar
            else:
                kwargs["metavar"] = meta.get("metavar", _metavar(hint, meta))
        if flag in SHARED:
            action = add_shared(parser, flag, detail, **kwargs)
        else:
            action = parser.add_argument(flag, help=_escape(detail), **kwargs)
        for old in meta.get("aliases", ()):
            add_deprecated_alias(parser, old, action)
        actions[f.name] = action
    return actions


def config_from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """Build dataclass ``cls`` from the parsed ``args`` (its option fields) and ``values``.

    Comma-separated text becomes the field's list or tuple (blanks dropped); ``parse: layers``
    fields are read with :func:`parse_layers`. Fields that are no
    option take ``values`` or their default; ``values`` also override options.

    Raises:
        InputError: an unreadable layer list.
    """
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in option_fields(cls):
        if f.name in values or not hasattr(args, dest_of(f)):
            continue
        value = getattr(args, dest_of(f))
        hint, _ = _strip_optional(hints[f.name])
        if f.metadata.get("parse") == "layers":
            value = parse_layers(value)
        elif _is_text_list(hint) and isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
            value = tuple(items) if typing.get_origin(hint) is tuple else items
        kwargs[f.name] = value
    kwargs.update(values)
    return cls(**kwargs)
