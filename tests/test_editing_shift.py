"""Forward pass shift (fixed and adaptive eta) against hand computations and the full model."""

from __future__ import annotations

import pytest
import torch

from backward_lens.editing import Edit, RewriteRequest, get_editor
from backward_lens.editing.matrix import ff2
from backward_lens.editing.upper_layers import UpperBlocks
from backward_lens.errors import EditError, InputError
from tests.tiny import TINY_CONFIGS, make_tiny

REQ = RewriteRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome")
REQ2 = RewriteRequest("Danielle Darrieux's mother tongue is", "Danielle Darrieux", " English")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def last_logits(lm, prompt: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return lm.model(input_ids=ids).logits[0, -1]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_delta_equals_hand_computed_outer_product(tokenizer, family):  # type: ignore[no-untyped-def]
    lm = make_tiny(family, tokenizer)
    layer, eta = 1, 0.37
    module = ff2(lm, layer).module
    seen = []
    handle = module.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    ids = lm.tokenizer(REQ.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        lm.model(input_ids=ids)
    handle.remove()
    x_n = seen[0].reshape(-1, seen[0].shape[-1])[-1]
    t = lm.tokenizer(" Rome", add_special_tokens=False).input_ids[0]
    e_t = lm.model.get_output_embeddings().weight[t].detach()
    # Conv1D [d_ff, d] vs nn.Linear down_proj [d, d_ff]
    expected = eta * (torch.outer(x_n, e_t) if family == "gpt2" else torch.outer(e_t, x_n))

    edit = get_editor("shift", layer=layer, eta=eta)(lm, [REQ])
    (name,) = edit.deltas
    assert name.endswith("mlp.c_proj.weight" if family == "gpt2" else "mlp.down_proj.weight")
    assert edit.deltas[name].shape == module.weight.shape
    torch.testing.assert_close(edit.deltas[name], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["shift", "shift-adaptive"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text", "opt"])
def test_changes_only_ff2_and_reverts_bit_for_bit(tokenizer, family, method):  # type: ignore[no-untyped-def]
    lm = make_tiny(family, tokenizer)
    before = snapshot(lm.model)
    # a random tiny model may need more than the cap: apply it anyway so there is a delta
    extra = {"on_failure": "cap"} if method == "shift-adaptive" else {}
    edit = get_editor(method, layer=2, **extra)(lm, [REQ])
    assert all(torch.equal(before[k], v) for k, v in lm.model.named_parameters())  # untouched
    target_param = ff2(lm, 2).param
    assert list(edit.deltas) == [target_param]
    edit.apply(lm.model)
    for k, v in lm.model.named_parameters():
        if k == target_param:
            assert not torch.equal(before[k], v)
            torch.testing.assert_close(v, before[k] + edit.deltas[k])
        else:
            assert torch.equal(before[k], v), k
    edit.revert(lm.model)
    assert all(torch.equal(before[k], v) for k, v in lm.model.named_parameters())


def test_save_load_apply_on_fresh_copy(tokenizer, tmp_path):  # type: ignore[no-untyped-def]
    lm = make_tiny("gpt2", tokenizer, seed=3)
    edit = get_editor("shift", layer=1, eta=0.5)(lm, [REQ])
    edit.save(tmp_path / "edit")
    with edit.applied(lm.model):
        edited = snapshot(lm.model)
    fresh = make_tiny("gpt2", tokenizer, seed=3)
    loaded = Edit.load(tmp_path / "edit")
    assert loaded.hparams["layer"] == 1 and loaded.hparams["eta"] == 0.5
    loaded.apply(fresh.model)
    for k, v in fresh.model.named_parameters():
        assert torch.equal(v, edited[k]), k


def test_several_requests_sum_rank_one_deltas(tokenizer):  # type: ignore[no-untyped-def]
    lm = make_tiny("llama", tokenizer)
    editor = get_editor("shift", layer=1, eta=0.3)
    both = editor(lm, [REQ, REQ2])
    one, two = editor(lm, [REQ]), editor(lm, [REQ2])
    (k,) = both.deltas
    torch.testing.assert_close(both.deltas[k], one.deltas[k] + two.deltas[k])
    assert torch.linalg.matrix_rank(both.deltas[k]) == 2


def test_skips_when_target_already_predicted(tokenizer):  # type: ignore[no-untyped-def]
    lm = make_tiny("llama", tokenizer)
    predicted = int(last_logits(lm, REQ.prompt).argmax())
    target = lm.tokenizer.decode([predicted])
    req = RewriteRequest(REQ.prompt, REQ.subject, target)
    if lm.tokenizer(target, add_special_tokens=False).input_ids[:1] != [predicted]:
        pytest.fail("the decoded prediction does not re-encode to itself; pick another prompt")
    edit = get_editor("shift", layer=1)(lm, [req])
    assert edit.deltas == {} and edit.info["skipped"] is True


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_upper_block_rerun_equals_full_model_with_delta(tokenizer, family):  # type: ignore[no-untyped-def]
    lm = make_tiny(family, tokenizer)
    layer, eta = 1, 0.8
    edit = get_editor("shift", layer=layer, eta=eta)(lm, [REQ])
    ids = lm.tokenizer(REQ.prompt).input_ids
    matrix = ff2(lm, layer)
    seen = []
    handle = matrix.module.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    runner = UpperBlocks(lm, layer, ids)
    handle.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1])
    t = lm.tokenizer(" Rome", add_special_tokens=False).input_ids[0]
    e_t = lm.model.get_output_embeddings().weight[t].detach()
    torch.testing.assert_close(runner.run(), last_logits(lm, REQ.prompt), rtol=1e-4, atol=1e-4)
    rerun = runner.run(matrix.module, eta * torch.outer(x @ x[-1], e_t))
    with edit.applied(lm.model):
        full = last_logits(lm, REQ.prompt)
    torch.testing.assert_close(rerun, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_adaptive_eta_is_smallest_that_makes_target_top1(tokenizer, family):  # type: ignore[no-untyped-def]
    lm = make_tiny(family, tokenizer)
    t = lm.tokenizer(" Rome", add_special_tokens=False).input_ids[0]
    assert int(last_logits(lm, REQ.prompt).argmax()) != t
    edit = get_editor("shift-adaptive", layer=1, eta=0.01, eta_max=10.0, rtol=0.01)(lm, [REQ])
    info = edit.info
    assert info["success"] and not info["skipped"]
    assert info["eta"] - info["eta_lower"] <= 0.01 * info["eta"] + 1e-12
    with edit.applied(lm.model):
        assert int(last_logits(lm, REQ.prompt).argmax()) == t
    smaller = get_editor("shift", layer=1, eta=info["eta_lower"])(lm, [REQ])
    with smaller.applied(lm.model):
        assert int(last_logits(lm, REQ.prompt).argmax()) != t
    # The adaptive delta is exactly the fixed method's delta at the chosen eta.
    fixed = get_editor("shift", layer=1, eta=info["eta"])(lm, [REQ])
    (k,) = edit.deltas
    torch.testing.assert_close(edit.deltas[k], fixed.deltas[k])


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "gemma3_text"])
def test_each_equals_single_edits(tokenizer, family):  # type: ignore[no-untyped-def]
    """Edits from one padded probe pass equal edits made one request at a time."""
    lm = make_tiny(family, tokenizer)
    requests = [
        REQ,
        RewriteRequest("Danielle Darrieux's mother tongue is", "Danielle Darrieux", " English"),
        RewriteRequest("Paris is the capital of", "Paris", " Italy"),
    ]
    editor = get_editor("shift", layer=1, eta=0.5)
    together = editor.each(lm, requests)  # type: ignore[attr-defined]
    assert len(together) == len(requests)
    for request, edit in zip(requests, together, strict=True):
        alone = editor(lm, [request])
        assert edit.requests == alone.requests and edit.hparams == alone.hparams
        assert edit.info["skipped"] == alone.info["skipped"]
        assert edit.deltas.keys() == alone.deltas.keys()
        for k in alone.deltas:
            torch.testing.assert_close(edit.deltas[k], alone.deltas[k], rtol=1e-5, atol=1e-6)


def test_adaptive_refuses_or_caps_when_the_cap_is_not_enough(tokenizer):  # type: ignore[no-untyped-def]
    lm = make_tiny("llama", tokenizer)
    tiny_cap = {"layer": 1, "eta": 1e-7, "eta_max": 2e-7}
    refused = get_editor("shift-adaptive", **tiny_cap)(lm, [REQ])
    assert not refused.info["success"] and refused.info["refused"]
    assert refused.info["eta"] == 0.0 and not refused.deltas
    capped = get_editor("shift-adaptive", on_failure="cap", **tiny_cap)(lm, [REQ])
    assert not capped.info["success"] and not capped.info["refused"]
    fixed = get_editor("shift", layer=1, eta=2e-7)(lm, [REQ])
    (k,) = fixed.deltas
    torch.testing.assert_close(capped.deltas[k], fixed.deltas[k])
    with pytest.raises(InputError):
        get_editor("shift-adaptive", on_failure="ignore")(lm, [REQ])


def test_edit_refuses_other_architecture(tokenizer):  # type: ignore[no-untyped-def]
    gpt2, llama = make_tiny("gpt2", tokenizer), make_tiny("llama", tokenizer)
    edit = get_editor("shift", layer=1, eta=0.5)(gpt2, [REQ])
    before = snapshot(llama.model)
    with pytest.raises(EditError):
        edit.apply(llama.model)
    assert all(torch.equal(before[k], v) for k, v in llama.model.named_parameters())


def test_bad_inputs(tokenizer):  # type: ignore[no-untyped-def]
    lm = make_tiny("gpt2", tokenizer)
    with pytest.raises(InputError):
        get_editor("shift", layer=3)(lm, [REQ])  # 3 layers: 0..2
    with pytest.raises(InputError):
        get_editor("shift", layer=-4)(lm, [REQ])
    with pytest.raises(InputError):
        get_editor("shift", layer=0, eta=-1.0)(lm, [REQ])
    with pytest.raises(InputError):
        get_editor("no-such-method")
    with pytest.raises(InputError):
        get_editor("shift", lr=0.1)
    with pytest.raises(InputError):
        RewriteRequest("The Eiffel Tower is in", "Louvre", " Rome")
    with pytest.raises(InputError):
        RewriteRequest("The Eiffel Tower is in", "Eiffel Tower", "  ")


@pytest.mark.slow
def test_shift_on_default_model_makes_eiffel_tower_rome(smollm2):  # type: ignore[no-untyped-def]
    rome = smollm2.tokenizer(" Rome", add_special_tokens=False).input_ids[0]
    assert int(last_logits(smollm2, REQ.prompt).argmax()) != rome
    edit = get_editor("shift")(smollm2, [REQ])
    with edit.applied(smollm2.model):
        assert int(last_logits(smollm2, REQ.prompt).argmax()) == rome
    assert int(last_logits(smollm2, REQ.prompt).argmax()) != rome
