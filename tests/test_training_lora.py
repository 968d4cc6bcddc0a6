"""The training lens on PEFT LoRA adapters: the adapted layers are read.

What is read is the gradient G of the base weight, from which LoRA's own gradients are
built (s G A^T and s B^T G).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model

from backward_lens.training import BackwardLensCallback, TrainingLens
from backward_lens.training.data import Collator
from backward_lens.training.runlog import read_jsonl
from tests.test_training import hook_count, sequences, trainer
from tests.tiny import make_tiny
from tests.tokenizers import real_tokenizer


@pytest.fixture(scope="module")
def tok() -> Any:
    return real_tokenizer("gpt-2")


def lora_model(tok: Any) -> Any:
    lm = make_tiny("llama", tok)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["up_proj", "down_proj"])
    return lm, get_peft_model(lm.model, cfg)


def test_lora_layers_are_read_and_match_the_adapters_gradients(tok: Any) -> None:
    lm, model = lora_model(tok)
    batch = Collator.for_tokenizer(tok)([{"input_ids": s} for s in sequences(tok)[:3]])
    # One SGD step first, so that B is no longer zero and both adapters have gradients.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()
    lens = TrainingLens(model, tok, every=1)
    assert len(lens.targets) == 6 and all(t.adapter == "lora" for t in lens.targets)
    assert all(t.lora_scaling == 2.0 for t in lens.targets)  # alpha / r
    with lens.step(1) as rec:
        model(**batch).loss.backward()
    assert rec is not None
    factors = rec.factors()
    assert len(factors) == 6 and hook_count(model) == 0
    for f in factors:
        wrapper = lm.arch.layers[f.target.layer].mlp.down_proj
        if f.target.name == "ff1":
            wrapper = lm.arch.layers[f.target.layer].mlp.up_proj
        a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
        g = f.gradient.dense().double()  # [d_out, d_in], the base weight's gradient
        s = f.target.lora_scaling
        assert float(b.detach().abs().max()) > 0
        torch.testing.assert_close(
            b.grad.double(), s * g @ a.detach().double().T, rtol=1e-4, atol=1e-7
        )
        torch.testing.assert_close(
            a.grad.double(), s * b.detach().double().T @ g, rtol=1e-4, atol=1e-7
        )
    assert [r.adapter for r in lens.last] == ["lora"] * 6


def test_callback_on_a_peft_model_in_the_trainer(tok: Any, tmp_path: Path) -> None:
    lm, model = lora_model(tok)
    lm.model = model  # the Trainer trains the PEFT model
    with BackwardLensCallback(model, tok, tmp_path / "run", every=1) as cb:
        trainer(lm, tmp_path, [cb], steps=2, accum=1).train()
    rows = list(read_jsonl(tmp_path / "run" / "lens.jsonl"))
    assert len(rows) == 2 * 3 * 2
    assert all(r["adapter"] == "lora" and r["trainable"] and r["norm"] > 0 for r in rows)
    assert hook_count(model) == 0
