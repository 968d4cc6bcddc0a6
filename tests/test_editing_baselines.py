"""Fine-tuning, ROME and MEMIT on tiny random models, checked against hand computations."""

from __future__ import annotations

import pytest
import torch

from backward_lens.editing import Edit, RewriteRequest, get_editor
from backward_lens.editing.finetune import (
    target_nll,
    target_nll_from_hidden,
    teacher_forced_batch,
)
from backward_lens.editing.matrix import ff2
from backward_lens.editing.request_tokens import edit_tokens
from backward_lens.editing.rome import (
    ValueConfig,
    average_key,
    context_prefixes,
    module_io_at,
    optimize_value,
    prompts_at_subject,
)
from backward_lens.editing.stats import SampleConfig, second_moments
from backward_lens.editing.upper_layers import UpperBlocks
from backward_lens.errors import EditError, InputError
from backward_lens.tokens import locate_subject
from tests.tiny import make_tiny

REQ = RewriteRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome")
REQ2 = RewriteRequest("Danielle Darrieux's mother tongue is", "Danielle Darrieux", " English")
SMALL = {"stats_samples": 4, "stats_length": 8, "context": [[3, 2]], "v_steps": 4}
METHODS = {
    "ft": {"layer": 1, "steps": 3},
    "ft-early": {"steps": 2},
    "ft-l": {"steps": 2},
    "rome": {"layer": 1, **SMALL},
    "memit": {"layers": [0, 1], **SMALL},
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("BACKWARD_LENS_CACHE", str(tmp_path / "cache"))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def expected_params(lm, method: str) -> set[str]:  # type: ignore[no-untyped-def]
    hp = METHODS[method]
    layers = hp.get("layers") or [hp.get("layer", 0)]
    return {ff2(lm, layer).param for layer in layers}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_edit_touches_only_intended_parameters(tokenizer, family, method, tmp_path):  # type: ignore[no-untyped-def]
    lm = make_tiny(family, tokenizer, seed=1)
    before = snapshot(lm.model)
    edit = get_editor(method, **METHODS[method])(lm, [REQ])
    for k, v in lm.model.named_parameters():  # the editor left the model as it found it
        assert torch.equal(before[k], v), k
        assert v.grad is None
    assert set(edit.deltas) == expected_params(lm, method)
    edit.apply(lm.model)
    for k, v in lm.model.named_parameters():
        if k in edit.deltas:
            assert not torch.equal(before[k], v), k
        else:
            assert torch.equal(before[k], v), k
    edited = snapshot(lm.model)
    edit.revert(lm.model)
    assert all(torch.equal(before[k], v) for k, v in lm.model.named_parameters())
    # save -> load -> apply on a fresh copy gives the same weights
    edit.save(tmp_path / method)
    fresh = make_tiny(family, tokenizer, seed=1)
    Edit.load(tmp_path / method).apply(fresh.model)
    assert all(torch.equal(edited[k], v) for k, v in fresh.model.named_parameters())


def test_ft_first_step_is_adams_first_step(smollm2_tokenizer):  # type: ignore[no-untyped-def]
    # SmolLM2's tokenizer (integration tier): the tolerance below fits this random model, whose
    # gradient has no entry near Adam's epsilon 1e-8; the code-built tokenizer's model has one.
    lm = make_tiny("llama", smollm2_tokenizer)
    lr = 1e-3
    matrix = ff2(lm, 1)
    tokens = [edit_tokens(lm, r.prompt, r.target_new) for r in (REQ, REQ2)]
    ids, mask, labels = teacher_forced_batch(lm, tokens)
    w = matrix.weight.detach().clone().requires_grad_(True)
    original = matrix.module.weight
    matrix.module.weight = torch.nn.Parameter(w)
    logits = lm.model(input_ids=ids, attention_mask=mask).logits
    (grad,) = torch.autograd.grad(target_nll(logits, labels), matrix.module.weight)
    matrix.module.weight = original
    # Teacher forcing by hand for one request: NLL of each target token after the prompt.
    t = tokens[0]
    alone = lm.model(input_ids=torch.tensor([t.prompt_ids + t.target_ids[:-1]])).logits[0]
    logp = alone.log_softmax(-1)
    n = len(t.prompt_ids)
    hand = -sum(logp[n - 1 + j, tid] for j, tid in enumerate(t.target_ids)) / len(t.target_ids)
    single = target_nll(lm.model(input_ids=ids[:1], attention_mask=mask[:1]).logits, labels[:1])
    torch.testing.assert_close(single, hand, rtol=1e-5, atol=1e-5)

    edit = get_editor("ft", layer=1, lr=lr, steps=1)(lm, [REQ, REQ2])
    expected = -lr * grad / (grad.abs() + 1e-8)  # Adam's first step (bias-corrected moments)
    torch.testing.assert_close(edit.deltas[matrix.param], expected, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_ft_loss_from_upper_blocks_equals_full_model(tokenizer, family):  # type: ignore[no-untyped-def]
    """FT's loss and weight gradient equal those of whole-model logits (padded batch of two).

    They are computed from the blocks above the layer and the head at the target positions
    only.
    """
    lm = make_tiny(family, tokenizer)
    tokens = [edit_tokens(lm, r.prompt, r.target_new) for r in (REQ, REQ2)]
    ids, mask, labels = teacher_forced_batch(lm, tokens)
    for layer in (0, 2):
        weight = ff2(lm, layer).weight
        weight.requires_grad_(True)
        try:
            full = target_nll(lm.model(input_ids=ids, attention_mask=mask).logits, labels)
            (g_full,) = torch.autograd.grad(full, weight)
            upper = UpperBlocks(lm, layer, ids, mask)
            fast = target_nll_from_hidden(lm, upper.final_hidden(), labels)
            (g_fast,) = torch.autograd.grad(fast, weight)
        finally:
            weight.requires_grad_(False)
        torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
        assert float((g_fast - g_full).norm() / g_full.norm()) < 1e-5


def test_ft_norm_constraint_bounds_every_entry(tokenizer):  # type: ignore[no-untyped-def]
    lm = make_tiny("gpt2", tokenizer)
    edit = get_editor("ft", layer=1, lr=1e-2, steps=3, norm_constraint=1e-3)(lm, [REQ])
    (delta,) = edit.deltas.values()
    assert float(delta.abs().max()) <= 1e-3 + 1e-7
    assert float(delta.abs().max()) > 5e-4  # the constraint was active


def test_subject_position_from_offsets(tokenizer):  # type: ignore[no-untyped-def]
    lm = make_tiny("llama", tokenizer)
    ids, (_, end) = locate_subject(lm.tokenizer, REQ.prompt, "Eiffel Tower")
    index = end - 1
    assert lm.tokenizer.decode(ids[index]).strip() == "Tower"
    assert lm.tokenizer.decode(ids[index + 1]).strip() == "is"
    (p,) = prompts_at_subject(lm, REQ2, ["Some prefix. "])
    assert lm.tokenizer.decode(p.ids[: p.index + 1]).endswith("Darrieux")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rome_maps_average_key_to_optimised_value(tokenizer, family):  # type: ignore[no-untyped-def]
    lm = make_tiny(family, tokenizer)
    hp = {"layer": 1, **SMALL}
    edit = get_editor("rome", **hp)(lm, [REQ])
    matrix = ff2(lm, 1)
    prefixes = context_prefixes(lm, hp["context"])
    assert len(prefixes) == 3 and prefixes[0] == ""
    key = average_key(lm, matrix, REQ, prefixes)
    value = optimize_value(lm, matrix.module, 1, REQ, prefixes, ValueConfig(steps=4))
    (delta,) = edit.deltas.values()
    assert torch.linalg.matrix_rank(delta) == 1
    with edit.applied(lm.model), torch.no_grad():
        mapped = matrix.module(key[None])[0]
        # FF2's input at layer 1 does not depend on FF2 at layer 1: the key is unchanged.
        torch.testing.assert_close(average_key(lm, matrix, REQ, prefixes), key)
    torch.testing.assert_close(mapped, value.target, rtol=1e-4, atol=1e-4)
    # The left vector is C^-1 k*: the update's input side is orthogonal, under C, to keys
    # C-orthogonal to k* (u^T x = 0 when x = C y with y orthogonal to k*).
    c = second_moments(lm, [1], SampleConfig(n_samples=4, length=8))[1]
    y = torch.randn(key.shape[0], dtype=torch.float64)
    y -= (y @ key.double()) / key.double().norm() ** 2 * key.double()
    x = (c + 1e-3 * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)) @ y
    out = x.float() @ delta if matrix.layout == "in_out" else delta @ x.float()
    assert float(out.norm()) < 1e-3 * float(delta.norm()) * float(x.norm())


def _value_by_full_passes(lm, module, request, prefixes, config):  # type: ignore[no-untyped-def]
    """ROME's compute_v written plainly: whole-model forward passes, logits everywhere."""
    import torch.nn.functional as F

    target = edit_tokens(lm, request.prompt, request.target_new).target_ids
    rewrites = prompts_at_subject(lm, request, prefixes)
    kl_text = f"{request.subject.strip()} is a"
    kl_ids, (_, kl_end) = locate_subject(lm.tokenizer, kl_text, request.subject)
    kl_index = kl_end - 1
    seqs = [p.ids + target[:-1] for p in rewrites] + [kl_ids]
    width = max(len(x) for x in seqs)
    ids = torch.tensor([x + [0] * (width - len(x)) for x in seqs])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs])
    at = [(i, p.index) for i, p in enumerate(rewrites)] + [(len(seqs) - 1, kl_index)]
    delta = torch.zeros(lm.arch.unembedding()[0].shape[1], requires_grad=True)
    seen = {}

    def hook(mod, args, output):  # type: ignore[no-untyped-def]
        out = output[0] if isinstance(output, tuple) else output
        seen.setdefault("init", out[0, rewrites[0].index].detach().clone())
        add = torch.zeros_like(out)
        for i, j in at:
            add[i, j] = delta
        new = out + add
        return (new, *output[1:]) if isinstance(output, tuple) else new

    opt = torch.optim.Adam([delta], lr=config.lr)
    losses, kl_init = [], None
    handle = module.register_forward_hook(hook)
    try:
        for it in range(config.steps):
            opt.zero_grad()
            logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            kl_logp = F.log_softmax(logits[-1, kl_index], -1)[None]
            kl_init = kl_logp.detach() if kl_init is None else kl_init
            nll = 0.0
            for i, p in enumerate(rewrites):
                logp = F.log_softmax(logits[i], -1)
                for j, tok in enumerate(target):
                    nll = nll - logp[len(p.ids) - 1 + j, tok] / len(target)
            init = seen["init"]
            loss = (
                nll / len(rewrites)
                + config.kl_factor
                * F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
                + config.weight_decay * delta.norm() / init.norm() ** 2
            )
            losses.append(float(loss.detach()))
            if it == config.steps - 1:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                if delta.norm() > config.clamp_norm_factor * init.norm():
                    delta.mul_(config.clamp_norm_factor * init.norm() / delta.norm())
    finally:
        handle.remove()
    return losses, delta.detach()


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_value_optimisation_equals_full_forward_passes(tokenizer, family):  # type: ignore[no-untyped-def]
    """Running only the upper blocks gives the losses and delta of whole-model passes.

    The head runs only at the scored positions (padded batch, multi-token target).
    """
    lm = make_tiny(family, tokenizer)
    request = RewriteRequest(REQ.prompt, REQ.subject, " Rome and Paris")
    prefixes = ["", "A short one. ", "A rather longer prefix sentence here. "]
    config = ValueConfig(steps=4, stop_loss=0.0)
    for layer, module in [  # at the last layer the loss does not see the subject position
        (0, ff2(lm, 0).module),
        (1, ff2(lm, 1).module),
        (1, lm.arch.layers[1]),  # MEMIT's z: a whole block's output
    ]:
        got = optimize_value(lm, module, layer, request, prefixes, config)
        losses, delta = _value_by_full_passes(lm, module, request, prefixes, config)
        assert len(got.losses) == config.steps
        assert got.losses == pytest.approx(losses, rel=1e-5)
        assert float((got.delta - delta).norm() / delta.norm()) < 1e-4
        assert float(got.delta.norm()) > 0


def test_memit_one_layer_small_prior_reaches_z(tokenizer):  # type: ignore[no-untyped-def]
    lm = make_tiny("gpt2", tokenizer)
    # No prefixes: the key MEMIT solves for is then exactly the plain prompt's key.
    hp = {"layers": [1], "mom2_update_weight": 1e-6, **SMALL, "context": []}
    edit = get_editor("memit", **hp)(lm, [REQ])
    prefixes = context_prefixes(lm, hp["context"])
    block = lm.arch.layers[1]
    z = optimize_value(lm, block, 1, REQ, prefixes, ValueConfig(steps=4, clamp_norm_factor=0.75))
    plain = prompts_at_subject(lm, REQ, [""])
    _, before = module_io_at(lm, block, plain)
    with edit.applied(lm.model):
        _, after = module_io_at(lm, block, plain)
    assert float((after[0] - before[0]).norm()) > 0.1 * float(z.delta.norm())
    torch.testing.assert_close(after[0], z.target, rtol=1e-3, atol=2e-3)


def test_memit_batch_edits_several_facts(tokenizer):  # type: ignore[no-untyped-def]
    lm = make_tiny("llama", tokenizer)
    edit = get_editor("memit", layers=[0, 1], **SMALL)(lm, [REQ, REQ2])
    assert len(edit.requests) == 2
    for delta in edit.deltas.values():
        assert torch.linalg.matrix_rank(delta) == 2


def test_statistics_are_cached_and_reused(tokenizer, tmp_path):  # type: ignore[no-untyped-def]
    lm = make_tiny("gpt2", tokenizer)
    cfg = SampleConfig(n_samples=3, length=5)
    first = second_moments(lm, [0, 2], cfg)
    files = sorted(p.name for p in (tmp_path / "cache" / "stats").iterdir())
    assert len(files) == 3  # the token sample and one file per layer
    again = second_moments(lm, [2, 0], cfg)
    assert all(torch.equal(first[k], again[k]) for k in (0, 2))
    assert torch.allclose(first[0], first[0].T)
    assert float(torch.linalg.eigvalsh(first[0]).min()) > -1e-6


def test_bad_inputs(tokenizer):  # type: ignore[no-untyped-def]
    lm = make_tiny("gpt2", tokenizer)
    no_subject = RewriteRequest(REQ.prompt, "", " Rome")
    with pytest.raises(InputError):
        get_editor("rome", layer=1, **SMALL)(lm, [no_subject])
    with pytest.raises(InputError):
        get_editor("rome", layer=7)(lm, [REQ])
    with pytest.raises(InputError):
        get_editor("memit", layers=[1, 9])(lm, [REQ])
    with pytest.raises(InputError):
        get_editor("ft", layer=-9)(lm, [REQ])
    with pytest.raises(InputError):
        get_editor("ft", layer=1, steps=0)(lm, [REQ])
    with pytest.raises(InputError):
        get_editor("rome", eta=0.3)
    llama = make_tiny("llama", tokenizer)
    edit = get_editor("ft", layer=1, steps=1)(lm, [REQ])
    with pytest.raises(EditError):
        edit.apply(llama.model)


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_subject_is_required_before_any_statistics(tokenizer, method, monkeypatch):  # type: ignore[no-untyped-def]
    """An empty or absent subject is refused before prefixes or key statistics are computed."""
    import backward_lens.editing.rome as rome_module

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("expensive work started before the subject was checked")

    monkeypatch.setattr(rome_module, "context_prefixes", boom)
    if method == "memit":
        import backward_lens.editing.memit as memit_module

        monkeypatch.setattr(memit_module, "context_prefixes", boom)
    lm = make_tiny("llama", tokenizer)
    for subject in ("", "  "):
        with pytest.raises(InputError, match="subject"):
            get_editor(method, **METHODS[method])(
                lm, [RewriteRequest(REQ.prompt, subject, " Rome")]
            )
