"""Models split or offloaded by accelerate (issue 9, "Placement"), on CPU.

``load_model(folder, device_map="auto", max_memory=..., offload_folder=...)`` offloads the blocks
that do not fit to disk (their parameters sit on the ``meta`` device and accelerate's hooks load
them for each call). Capture and explain must give the plain model's numbers exactly; whatever
cannot work (an offloaded embedding or LM head, an edit of an offloaded weight) is one clear line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import backward_lens as bl
from backward_lens.capture import Capture
from backward_lens.editing import Edit, RewriteRequest
from backward_lens.errors import EditError, PlacementError
from backward_lens.evaluation.rowedits import RowEdits
from backward_lens.models import LensModel, load_model
from tests.tiny import make_tiny

PROMPT = "The Eiffel Tower is located in the city of"
REQ = RewriteRequest(PROMPT, "Eiffel Tower", " Rome")


def _saved(lm: LensModel, folder: Path) -> Path:
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def _embedding_bytes(lm: LensModel) -> int:
    return lm.model.get_input_embeddings().weight.numel() * 4


@pytest.fixture
def plain(tokenizer: Any) -> LensModel:
    return make_tiny("gemma3_text", tokenizer)  # tied embeddings: embedding = LM head


@pytest.fixture
def offloaded(plain: LensModel, tmp_path: Path) -> LensModel:
    folder = _saved(plain, tmp_path / "model")
    budget = _embedding_bytes(plain) + 60_000  # the embedding and about one block fit
    lm = load_model(
        str(folder), device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "off"
    )
    devices = {p.device.type for p in lm.model.parameters()}
    assert devices == {"cpu", "meta"}, devices  # really split: some blocks on disk
    assert "disk" in set(lm.model.hf_device_map.values())
    return lm


def _capture(lm: LensModel) -> Capture:
    cap = bl.capture(lm, PROMPT, " Rome", attention=True)
    assert isinstance(cap, Capture)
    return cap


def test_offloaded_model_captures_the_same_factors(plain: LensModel, offloaded: LensModel) -> None:
    a, b = _capture(plain), _capture(offloaded)
    assert a.loss == b.loss
    for name in a.gradients:
        for ga, gb in zip(a.gradients[name], b.gradients[name], strict=True):
            assert torch.equal(ga.x, gb.x) and torch.equal(ga.delta, gb.delta), name
            assert ga.rank() == gb.rank()


def test_offloaded_model_explains_the_same(plain: LensModel, offloaded: LensModel) -> None:
    a, b = bl.explain(plain, PROMPT, " Rome"), bl.explain(offloaded, PROMPT, " Rome")
    assert a.to_dataframe().equals(b.to_dataframe())


def test_offloaded_half_model_lens_is_float32(plain: LensModel, tmp_path: Path) -> None:
    folder = _saved(plain, tmp_path / "model")
    disk = {"model.layers": "disk", "model.norm": "disk", "model.rotary_emb": "cpu"}
    half = load_model(
        str(folder),
        dtype="bfloat16",
        device_map={"model.embed_tokens": "cpu", "lm_head": "cpu", **disk},
        offload_folder=tmp_path / "off",
    )
    norm = half.arch.final_norm_modules()[0]
    assert next(norm.parameters()).device.type == "meta"  # the final norm itself is on disk
    v = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    logits = half.lens.logits(v)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert int(_capture(half).gradient(layer=-1, name="ff2").rank()) == 1


def test_offloaded_lm_head_is_one_clear_error(tokenizer: Any, tmp_path: Path) -> None:
    lm = make_tiny("llama", tokenizer)  # untied: the LM head is the last module, offloaded first
    folder = _saved(lm, tmp_path / "model")
    with pytest.raises(PlacementError, match=r"LM head .* offloaded"):
        load_model(
            str(folder),
            device_map="auto",
            max_memory={"cpu": _embedding_bytes(lm) + 60_000},
            offload_folder=tmp_path / "off",
        )


def test_everything_offloaded_is_one_clear_error(plain: LensModel, tmp_path: Path) -> None:
    folder = _saved(plain, tmp_path / "model")
    with pytest.raises(PlacementError, match="offloaded to disk"):
        load_model(
            str(folder), device_map="auto", max_memory={"cpu": 1000}, offload_folder=tmp_path / "o"
        )


def test_max_memory_without_a_device_map_is_one_clear_error(
    plain: LensModel, tmp_path: Path
) -> None:
    folder = _saved(plain, tmp_path / "model")
    with pytest.raises(PlacementError, match="need device_map"):
        load_model(str(folder), max_memory={"cpu": 1000})


def _ff2_edit(lm: LensModel, layer: int) -> Edit:
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    shape = dict(lm.model.named_parameters())[name].shape
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(layer))
    return Edit.from_deltas(lm, {name: delta}, "random", {}, [REQ])


def test_edits_of_offloaded_weights_are_refused(plain: LensModel, offloaded: LensModel) -> None:
    params = dict(offloaded.model.named_parameters())
    layer = max(i for i in range(3) if params[f"model.layers.{i}.mlp.down_proj.weight"].is_meta)
    edit = _ff2_edit(plain, layer)
    with pytest.raises(EditError, match="offloaded"):
        edit.apply(offloaded.model)
    assert not edit.is_applied
    with pytest.raises(EditError, match="offloaded"):
        RowEdits(offloaded.model, [edit])


def test_row_edits_put_each_delta_on_its_weights_device(plain: LensModel) -> None:
    # The first parameter (the embedding) stays on CPU; one edited weight lives elsewhere (meta
    # stands in for a second device here): its delta must follow that weight, not the first one.
    edit = _ff2_edit(plain, 1)
    module = plain.model.get_submodule("model.layers.1.mlp.down_proj")
    hooks = RowEdits(plain.model, [edit])
    ((_, d_cpu),) = hooks.by_module[module]
    assert d_cpu.device.type == "cpu"
    module.to("meta")
    with pytest.raises(EditError, match="offloaded"):
        RowEdits(plain.model, [edit])
