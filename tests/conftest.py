"""Session fixtures: each real model is loaded once per test session."""

from __future__ import annotations

import pytest

from backward_lens.models import LensModel, load_model


@pytest.fixture(scope="session")
def smollm2() -> LensModel:
    """The real default model, SmolLM2-135M (from the on-disk conversion cache)."""
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3() -> LensModel:
    """The real Gemma-3-270M (slow to convert the first time, ~50 s)."""
    return load_model("gemma3-270m")


@pytest.fixture(scope="session")
def tokenizer(smollm2: LensModel):  # type: ignore[no-untyped-def]
    """A real tokenizer for the tiny random models (SmolLM2's, vocabulary 49,152)."""
    return smollm2.tokenizer
