"""Edits applied to one model form a stack (issue 9, item 8).

Before: apply A, apply B (computed on the edited model), ``A.revert``, ``B.revert`` left A's
delta in the weights (max |W - W0| = 2.44 on SmolLM2), and ``A.revert`` silently dropped B while
``B.is_applied`` stayed True.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from backward_lens.editing import Edit, RewriteRequest, get_editor
from backward_lens.editing.base import applied_edits
from backward_lens.errors import EditError
from backward_lens.models import LensModel
from tests.tiny import make_tiny

REQ = RewriteRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome")
W = "model.layers.1.mlp.down_proj.weight"
OTHER = "model.layers.2.mlp.down_proj.weight"


def _edit(lm: LensModel, seed: int, names: tuple[str, ...] = (W,)) -> Edit:
    """An edit of ``names`` computed on the model as it is now (random deltas)."""
    params = dict(lm.model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    deltas = {k: torch.randn(params[k].shape, generator=g) for k in names}
    return Edit.from_deltas(lm, deltas, f"random{seed}", {}, [REQ])


def _weights(lm: LensModel) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in lm.model.named_parameters()}


def _max_change(lm: LensModel, before: dict[str, torch.Tensor]) -> float:
    return max(float((p.detach() - before[k]).abs().max()) for k, p in lm.model.named_parameters())


@pytest.fixture
def lm(tokenizer: Any) -> LensModel:
    return make_tiny("llama", tokenizer)


def test_sequential_edits_revert_in_reverse_order(lm: LensModel) -> None:
    w0 = _weights(lm)
    a = _edit(lm, 1).apply(lm.model)
    b = _edit(lm, 2).apply(lm.model)  # computed on the edited model: base check passes
    assert a.is_applied and b.is_applied
    assert applied_edits(lm.model) == [a, b]
    with_both = _weights(lm)

    with pytest.raises(EditError, match="revert them first"):
        a.revert(lm.model)  # out of order: refused
    assert _max_change(lm, with_both) == 0.0  # weights untouched
    assert a.is_applied and b.is_applied

    b.revert(lm.model)
    assert not b.is_applied and a.is_applied
    a.revert(lm.model)
    assert not a.is_applied
    assert _max_change(lm, w0) == 0.0
    assert applied_edits(lm.model) == []


def test_edits_of_different_parameters_still_revert_in_order(lm: LensModel) -> None:
    a = _edit(lm, 1, (W,)).apply(lm.model)
    b = _edit(lm, 2, (OTHER,)).apply(lm.model)
    with pytest.raises(EditError, match="revert them first"):
        a.revert(lm.model)
    b.revert(lm.model)
    a.revert(lm.model)


def test_applied_blocks_nest_and_restore_even_on_error(lm: LensModel) -> None:
    w0 = _weights(lm)
    a, b = _edit(lm, 1), _edit(lm, 2)
    with pytest.raises(RuntimeError, match="inside"), a.applied(lm.model):
        assert a.is_applied
        with b.applied(lm.model, check_base=False):
            assert applied_edits(lm.model) == [a, b]
            expected = w0[W] + a.deltas[W] + b.deltas[W]
            torch.testing.assert_close(dict(lm.model.named_parameters())[W].detach(), expected)
            raise RuntimeError("inside")
    assert not a.is_applied and not b.is_applied
    assert _max_change(lm, w0) == 0.0


def test_is_applied_tells_the_truth_about_the_weights(lm: LensModel) -> None:
    w0 = _weights(lm)
    a = _edit(lm, 1).apply(lm.model)
    assert a.is_applied
    with torch.no_grad():
        dict(lm.model.named_parameters())[W].copy_(w0[W])  # undone behind the stack's back
    assert not a.is_applied
    with pytest.raises(EditError, match="changed since"):
        a.revert(lm.model)  # would overwrite what was done
    assert _max_change(lm, w0) == 0.0


def test_revert_on_another_model_and_double_apply_are_refused(lm: LensModel, tokenizer) -> None:  # type: ignore[no-untyped-def]
    other = make_tiny("llama", tokenizer)
    a = _edit(lm, 1).apply(lm.model)
    with pytest.raises(EditError, match="already applied"):
        a.apply(lm.model)
    with pytest.raises(EditError, match="another model"):
        a.revert(other.model)
    a.revert(lm.model)
    with pytest.raises(EditError, match="not applied"):
        a.revert(lm.model)


def test_real_editor_sequence_restores_the_weights_exactly(lm: LensModel) -> None:
    w0 = _weights(lm)
    editor = get_editor("ft", steps=3)
    a = editor(lm, [REQ]).apply(lm.model)
    req_b = RewriteRequest("The Colosseum is located in the city of", "Colosseum", " Paris")
    b = editor(lm, [req_b]).apply(lm.model)  # computed on the edited model
    assert _max_change(lm, w0) > 0
    with pytest.raises(EditError):
        a.revert(lm.model)
    b.revert(lm.model)
    a.revert(lm.model)
    assert _max_change(lm, w0) == 0.0


def test_composed_edit_equals_the_sequence(lm: LensModel) -> None:
    a = _edit(lm, 1).apply(lm.model)
    b = _edit(lm, 2, (W, OTHER)).apply(lm.model)
    both = _weights(lm)
    b.revert(lm.model)
    a.revert(lm.model)
    ab = a.compose(b)
    with ab.applied(lm.model):  # base digests: A's for W, B's (= the unedited) for OTHER
        for k in (W, OTHER):
            torch.testing.assert_close(dict(lm.model.named_parameters())[k].detach(), both[k])
