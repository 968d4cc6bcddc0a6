"""Session fixtures and the two test tiers.

Every collected test gets exactly one of two markers, here, at collection:

- ``integration``: the test uses a real pretrained model or a real tokenizer read from files, a
  browser, a Ray cluster, kills processes, or takes seconds (repeated sweeps, a real-time
  wait). That is: it (or a fixture it depends on) requests one of
  :data:`INTEGRATION_FIXTURES`; or it is marked ``slow`` or ``integration``; or its module
  imports one of :data:`INTEGRATION_IMPORTS`; or it is listed in :data:`LONG_TESTS`.
- ``unit``: every other test. They use :func:`tokenizer` (built in code) with the tiny random
  models of ``tests.tiny``; the whole tier runs in under a minute (README, "Tests").

``slow`` stays as it was (a real pretrained model or a browser) and implies ``integration``.
Run the fast tier with ``bash scripts/test.sh --fast`` or ``.venv/bin/python -m pytest -m unit``;
the default (``bash scripts/test.sh``, CI) runs both tiers.
"""

from __future__ import annotations

import os

# The suite needs nothing beside the repository: a model name that is not found fails at once
# instead of after the hub's retries (~45 s without a network). Set before transformers loads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from typing import Any

import pytest

from backward_lens.models import BuiltinModel, LensModel, load_model
from tests.tokenizers import code_tokenizer

INTEGRATION_FIXTURES = frozenset({"smollm2", "gemma3", "smollm2_tokenizer"})
"""Fixtures that load a real model (a test requesting one, even indirectly, is integration)."""

INTEGRATION_IMPORTS = frozenset({"real_tokenizer"})
"""Names whose presence in a test module's namespace makes all its tests integration
(``tests.tokenizers.real_tokenizer``: real tokenizers converted from the bundled GGUF files)."""

INTEGRATION_MARKERS = ("slow", "integration")

LONG_TESTS: dict[str, str] = {
    "tests/test_shards.py::test_sweep_shards_equal_the_unsplit_sweep": "3 sweeps (3.3 s)",
    "tests/test_shards.py::test_sweep_cli_merges_parts": "3 sweeps from the CLI (3.9 s)",
    "tests/test_web_load.py::test_half_open_connections_are_timed_out_and_free_their_worker": (
        "waits for the server's timeouts (3.9 s)"
    ),
    "tests/test_web_load.py::test_200_half_open_connections_hold_no_more_threads": (
        "waits for the server's timeouts (4.5 s)"
    ),
}
"""Tests (node id without parameters -> why) with no real model that still take several seconds
each on one idle core: repeated ``sweep`` runs on a tiny model, real-time waits. They are
integration tests; ``tests/test_tiers.py`` checks every entry names a test."""


def is_integration(item: pytest.Item) -> bool:
    """Whether a collected test belongs to the integration tier (see the module docstring)."""
    if any(item.get_closest_marker(name) is not None for name in INTEGRATION_MARKERS):
        return True
    if INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return True
    if item.nodeid.split("[")[0] in LONG_TESTS:
        return True
    module = getattr(item, "module", None)
    return module is not None and any(hasattr(module, name) for name in INTEGRATION_IMPORTS)


COLLECTED = pytest.StashKey[list[pytest.Item]]()
"""Every test this session collected, before ``-m``/``-k`` deselection (``tests/test_tiers.py``)."""


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test ``unit`` or ``integration`` before ``-m`` selects among them."""
    config.stash[COLLECTED] = list(items)
    for item in items:
        item.add_marker(pytest.mark.integration if is_integration(item) else pytest.mark.unit)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Run a session of unit tests only on one torch thread.

    The tiny models (width 32) gain nothing from intra-op threads, and on a shared 2-core
    machine two OpenMP threads per process slow the tier down several times. Every test passes
    either way; a session with integration tests keeps torch's default.
    """
    if session.items and all(item.get_closest_marker("unit") for item in session.items):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2() -> LensModel:
    """The real default model, SmolLM2-135M (from the on-disk conversion cache)."""
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3() -> LensModel:
    """The real Gemma-3-270M (slow to convert the first time, ~50 s)."""
    return load_model("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2: LensModel) -> Any:
    """SmolLM2's real tokenizer (vocabulary 49,152), for assertions that name its tokens.

    A module whose tests need it for every use of ``tokenizer`` overrides that fixture::

        @pytest.fixture(scope="module")
        def tokenizer(smollm2_tokenizer): return smollm2_tokenizer
    """
    return smollm2.tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """A tokenizer built in code for the tiny random models (byte-level BPE, 2,048 tokens).

    See :func:`tests.tokenizers.code_tokenizer`; shared by the session, so do not modify it
    (``copy.deepcopy`` it first).
    """
    return code_tokenizer()


def _no_real_model(model: BuiltinModel) -> Any:
    """Stands in for :meth:`BuiltinModel.gguf_path` during unit tests: fail the test."""
    pytest.fail(
        f"a unit test loads the real model {model.name!r}: use tests.tiny, or mark the test "
        "integration (tests/conftest.py)",
        pytrace=False,
    )


@pytest.fixture(autouse=True)
def _unit_tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Fail a unit test that loads a real model anyway.

    Loading a built-in model (its weights come from ``BuiltinModel.gguf_path``) fails at once;
    a real-model fixture got by name (``request.getfixturevalue("smollm2")``) fails at teardown.
    """
    unit = request.node.get_closest_marker("unit") is not None
    if unit:
        monkeypatch.setattr(BuiltinModel, "gguf_path", _no_real_model)
    yield
    if unit:
        used = sorted(INTEGRATION_FIXTURES.intersection(request.fixturenames))
        if used:
            pytest.fail(
                f"a unit test used {', '.join(used)}: request it as a parameter, or mark the "
                "test integration (tests/conftest.py)",
                pytrace=False,
            )
