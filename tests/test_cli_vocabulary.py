"""One CLI vocabulary: every command spells a concept the same way, defaults live once.

Walks every subcommand's parser (issue 11, item 4): the shared flags have one name, metavar,
type and help stem everywhere (and the truly common ones the same help and default), old
spellings are hidden aliases that still work, and each configuration dataclass built from an
empty command line equals the one built from Python, so the parser's defaults cannot drift from
the dataclass's.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass, field, fields
from typing import Any

import pytest

from backward_lens.cli import build_parser, main
from backward_lens.commands import edit as edit_cmd
from backward_lens.commands import explain as explain_cmd
from backward_lens.commands.common import ModelOptions
from backward_lens.commands.options import (
    DEPRECATED,
    FRESH_HELP,
    JSON_HELP,
    RESUME_HELP,
    SHARED,
    add_config_arguments,
    config_from_args,
    dest_of,
    flag_of,
    option_fields,
    signature_default,
)
from backward_lens.errors import InputError
from backward_lens.evaluation import EvalSettings
from backward_lens.study.base import StudyOptions
from backward_lens.tracing.core import TraceConfig
from backward_lens.training.finetune import FinetuneConfig
from tests.tiny import make_tiny


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


SUBPARSERS = _subparsers()

REQUIRED: dict[str, list[str]] = {
    "explain": [],
    "study": ["rank"],
    "edit": [],
    "evaluate": ["--out", "x"],
    "sweep": ["--out", "x"],
    "finetune": ["--data", "d.jsonl", "--out", "x", "--steps", "3"],
    "serve": [],
    "trace": ["--out", "x"],
    "schema": ["explain"],
}
"""The least each command parses (its required arguments)."""

CONFIGS: list[tuple[str, type, dict[str, Any]]] = [
    ("evaluate", EvalSettings, {}),
    ("study", StudyOptions, {}),
    ("trace", TraceConfig, {}),
    ("finetune", FinetuneConfig, {"steps": 3}),
    *[(name, ModelOptions, {}) for name, p in SUBPARSERS.items() if "--model" in p.format_help()],
]
"""(command, configuration dataclass, the required values given in REQUIRED)."""

UNIVERSAL = ("--model", "--dtype", "--device", "--device-map", "--resume", "--fresh", "--json")
UNIVERSAL += ("--workers", "--ray-address", "--gpus-per-worker")
"""Flags whose help, default, type and metavar are identical in every command offering them."""

SYNONYMS = (
    "--n",
    "--num-records",
    "--n-records",
    "--limit",
    "--overwrite",
    "--force",
    "--restart",
    "--no-resume",
    "--output",
    "--output-dir",
    "--outdir",
    "--top",
    "--batch-rows",
    "--bs",
    "--model-name",
    "--dataset",
    "--random-seed",
    "--num-workers",
    "--address",
)
"""Other spellings of shared concepts: none may be visible in any ``--help``."""


def _visible(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Option string -> action, for the options ``--help`` shows."""
    return {
        s: a
        for a in parser._actions
        if a.help != argparse.SUPPRESS
        for s in a.option_strings
        if s.startswith("--") and s != "--help"
    }


def _by_flag() -> dict[str, list[tuple[str, argparse.Action]]]:
    found: dict[str, list[tuple[str, argparse.Action]]] = defaultdict(list)
    for name, parser in SUBPARSERS.items():
        for flag, action in _visible(parser).items():
            found[flag].append((name, action))
    return found


def _norm_help(action: argparse.Action) -> str:
    return (action.help or "").replace("%%", "%")


def test_every_command_is_walked() -> None:
    """Every subcommand is checked, and none has two options writing one value."""
    assert set(SUBPARSERS) == set(REQUIRED)
    for name, parser in SUBPARSERS.items():  # no two visible options write one value
        dests = [a.dest for a in parser._actions if a.help != argparse.SUPPRESS]
        assert len(dests) == len(set(dests)), name


@pytest.mark.parametrize("flag", sorted(SHARED))
def test_a_shared_flag_has_one_metavar_type_and_help_stem(flag: str) -> None:
    """A shared flag has one metavar, type, action and help opening in every command."""
    uses = _by_flag().get(flag, [])
    assert uses, f"{flag} is in the shared vocabulary but no command offers it"
    stem = SHARED[flag].stem
    for name, action in uses:
        assert _norm_help(action).startswith(stem), (name, flag, action.help)
        if SHARED[flag].metavar is not None and action.nargs != 0:
            assert action.metavar == SHARED[flag].metavar, (name, flag)
    assert len({a.type for _, a in uses}) == 1, f"{flag} parsed differently: {uses}"
    assert len({type(a).__name__ for _, a in uses}) == 1, f"{flag} acts differently: {uses}"
    assert len({a.nargs for _, a in uses}) == 1, f"{flag} takes different arguments: {uses}"


@pytest.mark.parametrize("flag", UNIVERSAL)
def test_a_universal_flag_is_identical_everywhere(flag: str) -> None:
    """The flags common to all commands are the same action everywhere."""
    uses = _by_flag()[flag]
    assert len(uses) >= 2, f"{flag} is offered by one command only: {uses}"
    first = uses[0][1]
    for name, action in uses[1:]:
        for attr in ("help", "default", "type", "metavar", "choices", "nargs", "const", "dest"):
            assert getattr(action, attr) == getattr(first, attr), (flag, name, attr)


DIFFERENT_ON_PURPOSE = {
    "--method": "evaluate compares several methods (repeatable); edit applies one, sweep tunes one",
    "--layer": "edit takes a list for memit (3-7); study's neurons / imprint-shift study one block",
    "--hparam": "edit sets one value per item (KEY=VALUE); sweep tries several (KEY=V1,V2)",
}
"""Flags that take values differently in two commands, and why (anything else must agree)."""


def test_a_flag_in_several_commands_takes_values_the_same_way() -> None:
    """A flag offered by several commands parses its value the same way in each."""
    for flag, uses in _by_flag().items():
        if flag in DIFFERENT_ON_PURPOSE or len(uses) < 2:
            continue
        for attr in ("type", "metavar", "nargs", "choices", "const"):
            values = {name: getattr(action, attr) for name, action in uses}
            assert len(set(map(repr, values.values()))) == 1, (flag, attr, values)
        kinds = {name: type(action).__name__ for name, action in uses}
        assert len(set(kinds.values())) == 1, (flag, kinds)


def test_resume_and_fresh_mean_the_same_and_exclude_each_other() -> None:
    """--resume/--fresh: one help, mutually exclusive; --json: one help."""
    with_resume = {name for name, _ in _by_flag()["--resume"]}
    assert with_resume == {name for name, _ in _by_flag()["--fresh"]}
    assert {"evaluate", "study", "trace"} <= with_resume
    for name in with_resume:
        actions = _visible(SUBPARSERS[name])
        assert actions["--resume"].help == RESUME_HELP
        assert actions["--fresh"].help == FRESH_HELP
        with pytest.raises(SystemExit) as exc:
            SUBPARSERS[name].parse_args([*REQUIRED[name], "--resume", "--fresh"])
        assert exc.value.code == 2
    for name in ("edit", "explain"):
        assert _visible(SUBPARSERS[name])["--json"].help == JSON_HELP


def test_no_concept_has_two_spellings() -> None:
    """No synonym is shown, and one value is always written by one flag."""
    flags = _by_flag()
    visible_synonyms = sorted(set(SYNONYMS) & set(flags))
    assert not visible_synonyms, f"other spellings shown in --help: {visible_synonyms}"
    # one dest is always written with one flag, across every command
    spellings: dict[str, set[str]] = defaultdict(set)
    for flag, uses in flags.items():
        for _, action in uses:
            spellings[action.dest].add(flag)
    assert {d: s for d, s in spellings.items() if len(s) > 1} == {}
    # and within a command, one option has one visible spelling
    for name, parser in SUBPARSERS.items():
        for action in parser._actions:
            shown = [s for s in action.option_strings if s.startswith("--")]
            if action.help != argparse.SUPPRESS:
                assert len(shown) <= 1, (name, shown)


def test_every_hidden_spelling_is_a_listed_deprecated_alias() -> None:
    """Every hidden option is a listed old spelling of a visible one."""
    for name, parser in SUBPARSERS.items():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS and action.option_strings:
                (old,) = action.option_strings
                assert old in DEPRECATED, (name, old)
                assert DEPRECATED[old] in _visible(parser), (name, old)


@pytest.mark.parametrize(
    ("argv", "dest", "value"),
    [
        (["study", "rank", "--n", "7"], "records", 7),
        (["study", "neurons", "--top", "9"], "top_k", 9),
        (["evaluate", "--out", "x", "--overwrite"], "fresh", True),
        (["trace", "--out", "x", "--batch-rows", "5"], "batch_size", 5),
    ],
)
def test_old_spellings_still_work_with_one_note(
    argv: list[str], dest: str, value: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """An old spelling sets the new option's value and prints one note."""
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    err = capsys.readouterr().err
    old = next(a for a in argv if a in DEPRECATED)
    assert err == f"backward-lens: note: {old} is deprecated; use {DEPRECATED[old]}\n"
    help_text = SUBPARSERS[argv[0]].format_help()
    assert old not in help_text.replace(DEPRECATED[old], "")


def test_an_old_spelling_refuses_bad_values_like_the_new_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An old spelling checks its value like the new one (one-line error)."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["study", "rank", "--n", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "must be a positive integer" in err and err.count("\n") == 1


@pytest.mark.parametrize(("command", "cls", "required"), CONFIGS)
def test_the_parser_defaults_are_the_dataclass_defaults(
    command: str, cls: type, required: dict[str, Any]
) -> None:
    """A config built from an empty command line equals the dataclass's defaults."""
    args = SUBPARSERS[command].parse_args(REQUIRED[command])
    assert config_from_args(cls, args) == cls(**required)
    visible = _visible(SUBPARSERS[command])
    for f in option_fields(cls):
        assert flag_of(f) in visible, f"{cls.__name__}.{f.name} has no option in {command}"
        assert visible[flag_of(f)].dest == dest_of(f)


def test_two_configurations_in_one_command_never_share_a_value() -> None:
    """Sweep's --records and FluencySettings.records (--fluency-records) are kept apart."""
    from backward_lens.evaluation.sweep import FluencySettings

    args = SUBPARSERS["sweep"].parse_args(
        ["--out", "x", "--records", "5", "--fluency-records", "0"]
    )
    assert args.records == 5
    assert config_from_args(FluencySettings, args) == FluencySettings(records=0)
    dests = [a.dest for a in SUBPARSERS["sweep"]._actions if a.help != argparse.SUPPRESS]
    assert len(dests) == len(set(dests))


@pytest.mark.parametrize(
    ("command", "flag", "func", "param"),
    [
        ("study", "--records", "backward_lens.study.runner:run_study", "n"),
        ("study", "--seed", "backward_lens.study.runner:run_study", "seed"),
        ("study", "--batch-size", "backward_lens.study.runner:run_study", "batch_size"),
        ("trace", "--records", "backward_lens.tracing.run:run_trace", "n"),
        ("trace", "--seed", "backward_lens.tracing.run:run_trace", "seed"),
        ("sweep", "--batch-size", "backward_lens.evaluation.sweep:shift_sweep", "batch_size"),
        ("explain", "--top-k", "backward_lens.explain:explain", "top_k"),
    ],
)
def test_defaults_taken_from_a_function_match_it(
    command: str, flag: str, func: str, param: str
) -> None:
    """A default read from a function's signature is that function's."""
    import importlib

    module, _, name = func.partition(":")
    target = getattr(importlib.import_module(module), name)
    assert _visible(SUBPARSERS[command])[flag].default == signature_default(target, param)


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_every_help_teaches(command: str) -> None:
    """Every --help renders, has an example, and names each option's default."""
    text = SUBPARSERS[command].format_help()  # raises on a stray % in a help
    assert "Example" in text
    for flag, action in _visible(SUBPARSERS[command]).items():
        assert action.help, (command, flag)
        if action.default not in (None, False, [], "", argparse.SUPPRESS) and action.nargs != 0:
            assert "default" in action.help, f"{command} {flag}: the help hides its default"


# -- the builder itself ------------------------------------------------------------------------


@dataclass
class _Toy:
    """Every kind of field the builder handles."""

    steps: int = field(metadata={"help": "steps", "min": 1})
    rate: float = field(default=0.5, metadata={"help": "a rate"})
    name: str = field(default="a", metadata={"help": "a name", "choices": ["a", "b"]})
    limit: int | None = field(default=None, metadata={"help": "a limit", "default_help": "none"})
    layers: list[int] | None = field(default=None, metadata={"help": "x", "parse": "layers"})
    kinds: tuple[str, ...] = field(default=("p", "q"), metadata={"help": "kinds"})
    words: list[str] = field(default_factory=lambda: ["u"], metadata={"help": "words"})
    on: bool = field(default=False, metadata={"help": "switch", "flag": "--switch-on"})
    hidden: int = 3


def _toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_config_arguments(parser, _Toy)
    return parser


def test_the_builder_round_trips_every_field_kind() -> None:
    """Every field kind goes to an option and back; bad values are refused."""
    parser = _toy_parser()
    assert config_from_args(_Toy, parser.parse_args(["--steps", "2"])) == _Toy(steps=2)
    argv = ["--steps", "4", "--rate", "2", "--name", "b", "--limit", "7", "--layers", "1-3,-1"]
    argv += ["--kinds", "x, y,", "--words", "v,w", "--switch-on"]
    built = config_from_args(_Toy, parser.parse_args(argv), hidden=9)
    assert built == _Toy(4, 2.0, "b", 7, [1, 2, 3, -1], ("x", "y"), ["v", "w"], True, 9)
    text = parser.format_help()
    assert "--hidden" not in text and "--on" not in text
    assert "a rate (default: 0.5)" in text and "a limit (default: none)" in text
    assert "(default: p,q)" in text and "switch (default" not in text
    for bad in (["--steps", "0"], ["--name", "c"], [], ["--steps", "1", "--rate", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    with pytest.raises(InputError, match="reversed"):
        config_from_args(_Toy, parser.parse_args(["--steps", "1", "--layers", "5-2"]))


def test_only_fields_with_help_become_options() -> None:
    """Fields without help stay out of the command line."""
    names = {f.name for f in option_fields(_Toy)}
    assert names == {f.name for f in fields(_Toy)} - {"hidden"}


# -- --json [FILE] means the same in edit and explain ------------------------------------------


PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture
def tiny(tokenizer, monkeypatch):  # type: ignore[no-untyped-def]
    """A tiny GPT-2 stands in for the model of edit and explain."""
    lm = make_tiny("gpt2", tokenizer)
    monkeypatch.setattr(edit_cmd, "model_from_args", lambda args: lm)
    monkeypatch.setattr(explain_cmd, "model_from_args", lambda args: lm)
    return lm


def test_json_without_file_prints_only_json(tiny, capsys) -> None:  # type: ignore[no-untyped-def]
    """``--json`` alone prints only the JSON, in edit and explain."""
    edit = ["edit", "--prompt", PROMPT, "--target", " Rome", "--layer", "1", "--eta", "5"]
    for argv in (["explain", PROMPT, "--target", " Rome"], edit):
        assert main([*argv, "--json"]) == 0
        assert isinstance(json.loads(capsys.readouterr().out), dict)


def test_json_with_file_writes_it_and_prints_text(  # type: ignore[no-untyped-def]
    tiny, capsys, tmp_path
) -> None:
    """``--json FILE`` writes the file and prints the usual text."""
    edit = ["edit", "--prompt", PROMPT, "--target", " Rome", "--layer", "1", "--eta", "5"]
    for argv, path in (
        (["explain", PROMPT, "--target", " Rome"], tmp_path / "explain.json"),
        (edit, tmp_path / "edit.json"),
    ):
        assert main([*argv, "--json", str(path)]) == 0
        out = capsys.readouterr().out
        assert isinstance(json.loads(path.read_text()), dict)
        assert f"wrote json: {path}" in out
        with pytest.raises(json.JSONDecodeError):
            json.loads(out)
    # a bad --json FILE is refused in one line before the model is used
    assert main([*edit, "--json", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
