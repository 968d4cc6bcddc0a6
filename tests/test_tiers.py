"""The two test tiers (``tests/conftest.py``): unit tests never reach a real model or tokenizer.

The checks run on every test of ``tests/``: those the current session collected (before ``-m``
deselects: all of them under ``pytest -m unit`` and ``bash scripts/test.sh``), plus the modules
it did not collect, collected here in-process (a few seconds when this file runs alone).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backward_lens.models import BUILTIN_MODELS
from tests.conftest import (
    COLLECTED,
    INTEGRATION_FIXTURES,
    INTEGRATION_IMPORTS,
    LONG_TESTS,
    is_integration,
)
from tests.tokenizers import CODE_VOCAB_SIZE, SPECIAL_TOKENS, code_tokenizer

TESTS = Path(__file__).resolve().parent

FORBIDDEN_IN_UNIT = frozenset({*INTEGRATION_FIXTURES, *INTEGRATION_IMPORTS})
"""Names and strings the code of a unit test (and of its fixtures and helpers) must not use: the
real-model fixtures (also as ``request.getfixturevalue("smollm2")``) and the real tokenizers.
Loading a built-in model is caught when it happens (``tests/conftest.py``, the tier guard)."""


def _all_items(request: pytest.FixtureRequest) -> list[pytest.Item]:
    """Every test in ``tests/``: what this session collected, plus the modules it did not.

    A module that fails to import is left out (its own collection reports the error).
    """
    session = request.session
    items = list(session.config.stash.get(COLLECTED, []))
    seen = {Path(str(item.path)).resolve() for item in items}
    for path in sorted(TESTS.glob("test_*.py")):
        if path.resolve() in seen:
            continue
        stack: list[Any] = [pytest.Module.from_parent(session, path=path)]
        try:
            while stack:
                for child in stack.pop().collect():
                    (items if isinstance(child, pytest.Item) else stack).append(child)
        except (pytest.Collector.CollectError, pytest.skip.Exception):
            continue
    return items


@pytest.fixture(scope="module")
def items(request: pytest.FixtureRequest) -> list[pytest.Item]:
    """Every test in ``tests/`` (see :func:`_all_items`)."""
    return _all_items(request)


def _codes(obj: Any) -> Iterator[types.CodeType]:
    """The code objects of a function (or fixture function), nested ones included."""
    code = getattr(getattr(obj, "__wrapped__", obj), "__code__", None)
    stack = [code] if code is not None else []
    while stack:
        c = stack.pop()
        yield c
        stack.extend(x for x in c.co_consts if isinstance(x, types.CodeType))


def _references(funcs: list[Any]) -> set[str]:
    """Names and string constants used by ``funcs`` and the test helpers they call, transitively.

    A helper is a function defined in a ``tests.*`` module and named by one of the codes.
    """
    seen: set[int] = set()
    found: set[str] = set()
    todo = list(funcs)
    while todo:
        func = todo.pop()
        if id(func) in seen:
            continue
        seen.add(id(func))
        for code in _codes(func):
            found.update(code.co_names)
            found.update(x for x in code.co_consts if isinstance(x, str))
            for name in code.co_names:
                helper = getattr(func, "__globals__", {}).get(name)
                if isinstance(helper, types.FunctionType) and helper.__module__.startswith(
                    "tests."
                ):
                    todo.append(helper)
    return found


def _funcs_of(item: pytest.Item) -> list[Any]:
    """The test function and every fixture function it depends on."""
    funcs: list[Any] = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for defs in getattr(info, "name2fixturedefs", {}).values():
        funcs.extend(d.func for d in defs)
    return [f for f in funcs if f is not None]


def test_every_test_is_in_exactly_one_tier(items: list[pytest.Item]) -> None:
    """Both tiers hold tests; the suite was found."""
    assert len(items) > 100
    by_tier = {True: 0, False: 0}
    for item in items:
        by_tier[is_integration(item)] += 1
    assert by_tier[True] > 0 and by_tier[False] > 0


@pytest.mark.parametrize(
    ("module", "integration"),
    [
        ("test_paper_smollm2.py", True),  # real model (module marked slow)
        ("test_ray.py", True),  # Ray cluster (module marked integration)
        ("test_tracing.py", True),  # real tokenizers from the bundled GGUF files
        ("test_lowrank.py", False),  # maths on random tensors
        ("test_capture.py", False),  # tiny random models with the code-built tokenizer
    ],
)
def test_known_modules_land_in_their_tier(
    items: list[pytest.Item], module: str, integration: bool
) -> None:
    """A module of each kind lands where it belongs."""
    tiers = {is_integration(item) for item in items if Path(str(item.path)).name == module}
    assert tiers == {integration}, module


def test_every_long_run_names_a_test(items: list[pytest.Item]) -> None:
    """A renamed or deleted test must leave :data:`LONG_TESTS` too (else it would go unnoticed)."""
    names = {item.nodeid.split("[")[0] for item in items}
    assert set(LONG_TESTS) <= names, sorted(set(LONG_TESTS) - names)


def test_tests_using_a_real_model_fixture_are_integration(items: list[pytest.Item]) -> None:
    """A test that requests a real-model fixture, even through another fixture, is integration."""
    users = [i for i in items if INTEGRATION_FIXTURES.intersection(getattr(i, "fixturenames", ()))]
    assert users, "no test uses the real models any more: update INTEGRATION_FIXTURES"
    assert all(is_integration(i) for i in users)


def test_unit_tests_do_not_reach_real_models_or_tokenizers(items: list[pytest.Item]) -> None:
    """No unit test reaches a real model, a real-model fixture or ``real_tokenizer``.

    The test, the fixtures it depends on and the test helpers they call are scanned: naming
    one of :data:`FORBIDDEN_IN_UNIT` is how a test would escape the automatic tiering.
    """
    offenders = {}
    for item in items:
        if is_integration(item):
            continue
        bad = sorted(FORBIDDEN_IN_UNIT.intersection(_references(_funcs_of(item))))
        if bad:
            offenders[item.nodeid] = bad
    assert not offenders, (
        f"unit tests that use real models or tokenizers (mark them integration): {offenders}"
    )


def test_unit_tests_get_the_code_built_tokenizer(items: list[pytest.Item]) -> None:
    """Where a unit test asks for ``tokenizer``, it is the conftest one, built in code."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = getattr(info, "name2fixturedefs", {}).get("tokenizer")
        if defs and not is_integration(item):
            assert defs[-1].baseid in ("", "tests"), item.nodeid  # not overridden in a module


def test_code_tokenizer_is_deterministic_and_like_smollm2() -> None:
    """The code-built tokenizer has what the unit tests rely on.

    The same vocabulary every run, SmolLM2's special tokens and no BOS, common words one token
    with a leading space, rare names several, every string round-trips (byte-level), offsets.
    """
    tok = code_tokenizer()
    code_tokenizer.cache_clear()
    try:
        again = code_tokenizer()
    finally:
        code_tokenizer.cache_clear()
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert len(tok) == CODE_VOCAB_SIZE
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    for word in (" Rome", " Paris", " French", " English", " Tower", " Tokyo", " is"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert len(tok(" Darrieux", add_special_tokens=False)["input_ids"]) > 1
    text = "The Eiffel Tower is in Rome 🗼, naïvely."
    enc = tok(text, return_offsets_mapping=True)
    assert tok.decode(enc["input_ids"]) == text
    assert enc["input_ids"][0] != tok.bos_token_id
    assert enc["offset_mapping"][1] == (3, 10)  # " Eiffel"


_ESCAPES = """
def _helper():
    return real_tokenizer("gpt-2")

def test_direct(request):
    return request.getfixturevalue("gemma3")

def test_through_a_helper():
    return _helper()

def test_fine(tokenizer):
    return len(tokenizer)
"""


def test_the_scan_sees_dynamic_fixtures_and_helpers() -> None:
    """The scan can fail: it finds a real model requested by name, a real tokenizer in a helper.

    The offending functions are built from source, so that this module itself stays clean.
    """
    namespace: dict[str, Any] = {"__name__": "tests.fake_module"}
    exec(compile(_ESCAPES, "tests/fake_module.py", "exec"), namespace)
    refs = {n: FORBIDDEN_IN_UNIT & _references([namespace[n]]) for n in namespace if "test" in n}
    named = {name for name in FORBIDDEN_IN_UNIT if name in _ESCAPES}  # no literals here
    assert len(refs["test_direct"]) == len(refs["test_through_a_helper"]) == 1
    assert refs["test_direct"] | refs["test_through_a_helper"] == named
    assert refs["test_fine"] == set()


def test_a_unit_test_cannot_load_a_built_in_model() -> None:
    """The tier guard: a unit test that reaches a built-in model's weights fails at once."""
    model = next(iter(BUILTIN_MODELS.values()))
    with pytest.raises(pytest.fail.Exception, match="a unit test loads the real model"):
        model.gguf_path()
