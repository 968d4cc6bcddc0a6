"""The training lens: factors from a real training step equal autograd's weight gradients.

Tiny random models of several families (GPT-2's Conv1D, Llama, OPT's flattened MLP, Phi-3's fused
gate/up) with a real GPT-2 tokenizer; the Hugging Face Trainer with padding, -100 labels and
gradient accumulation; a plain PyTorch loop with a user loss; frozen layers; hooks after success
and failure; the rows of a run folder and its report.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from backward_lens.errors import InputError, OutputPathError
from backward_lens.lowrank import LowRankGradient
from backward_lens.models import LensModel
from backward_lens.training import BackwardLensCallback, TrainingLens, UpdateReading
from backward_lens.training.anyloss import capture_loss, causal_lm_loss
from backward_lens.training.data import Collator, TokenDataset
from backward_lens.training.recorder import MatrixFactors
from backward_lens.training.report import render_run_html
from backward_lens.training.runlog import check_run_folder, read_jsonl
from backward_lens.training.tensorboard import TensorBoardLogger, summary_writer
from tests.tiny import make_tiny
from tests.tokenizers import real_tokenizer

TEXTS = [
    "The Eiffel Tower is located in the city of Rome.",
    "Paris is a city",
    "one two three four five six seven eight",
    "hello there",
    "The Colosseum is in Rome, the capital of Italy.",
    "a b",
]


@pytest.fixture(scope="module")
def tok() -> Any:
    return real_tokenizer("gpt-2")


def trainable_tiny(family: str, tok: Any, seed: int = 0) -> LensModel:
    lm = make_tiny(family, tok, seed=seed)
    lm.model.requires_grad_(True)
    return lm


def sequences(tok: Any) -> list[list[int]]:
    return [tok(t)["input_ids"] for t in TEXTS]


def weight_grad(f: MatrixFactors, grads: dict[int, torch.Tensor]) -> torch.Tensor:
    """The autograd gradient of the part of the weight ``f`` stands for."""
    g = grads[id(f.target.weight)]
    if f.target.part is not None:
        part = f.target.part
        g = g[part] if f.target.layout == "out_in" else g[:, part]
    return g


def assert_factors_equal_grads(
    factors: list[MatrixFactors], grads: dict[int, torch.Tensor], expected: int
) -> None:
    assert len(factors) == expected
    for f in factors:
        ref = weight_grad(f, grads)
        dense = f.gradient.dense()
        assert dense.shape == ref.shape
        scale = float(ref.abs().max())
        assert scale > 0
        torch.testing.assert_close(dense, ref, rtol=0, atol=2e-6 * scale)


class Snapshot(TrainerCallback):
    """Copies every weight's .grad just before the optimizer step (the accumulated gradient)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.grads: dict[int, dict[int, torch.Tensor]] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.grads[state.global_step + 1] = {
            id(p): p.grad.detach().clone() for p in self.model.parameters() if p.grad is not None
        }


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def trainer(
    lm: LensModel, tmp: Path, callbacks: list[Any], *, steps: int = 2, accum: int = 2, **kw: Any
) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp / "scratch"),
        per_device_train_batch_size=3,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        learning_rate=1e-3,
        max_grad_norm=0.0,  # no clipping: .grad is the raw accumulated gradient
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        logging_steps=1,
        seed=0,
    )
    return Trainer(
        model=lm.model,
        args=args,
        train_dataset=TokenDataset(sequences(lm.tokenizer)),
        data_collator=Collator.for_tokenizer(lm.tokenizer),
        callbacks=callbacks,
        **kw,
    )


# -- directions of a low-rank gradient ---------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 40])
def test_directions_are_the_dense_gradients_singular_directions(n: int) -> None:
    torch.manual_seed(n)
    g = LowRankGradient(torch.randn(n, 16), torch.randn(n, 24), layout="out_in")
    d = g.directions(k=50)
    dense = g.dense().double().T  # in_out: [d_in, d_out]
    s = torch.linalg.svdvals(dense)
    assert d.k == min(n, 16)
    torch.testing.assert_close(d.singular_values, s[: d.k], rtol=1e-5, atol=1e-6)
    # Orthonormal directions that rebuild the gradient, and the contributions sum to sigma.
    eye = torch.eye(d.k, dtype=torch.float64)
    torch.testing.assert_close(d.left @ d.left.T, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(d.right @ d.right.T, eye, atol=1e-10, rtol=0)
    rebuilt = (d.left.T * d.singular_values) @ d.right
    torch.testing.assert_close(rebuilt, dense, atol=1e-5 * float(s[0]), rtol=0)
    torch.testing.assert_close(d.contributions.sum(0), d.singular_values, atol=1e-9, rtol=1e-9)
    assert d.norm == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-6)
    # Each direction is a singular pair of the dense matrix (up to the joint sign).
    for j in range(min(d.k, 3)):
        torch.testing.assert_close(
            dense @ d.right[j], d.singular_values[j] * d.left[j], atol=1e-4 * float(s[0]), rtol=0
        )


def test_one_position_reads_as_its_own_factors() -> None:
    x, delta = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, -2.0, 0.0]])
    d = LowRankGradient(x, delta).directions(3)
    assert d.k == 1 and float(d.singular_values[0]) == pytest.approx(10.0)
    torch.testing.assert_close(d.left[0], torch.tensor([0.6, 0.8], dtype=torch.float64))
    torch.testing.assert_close(d.right[0], torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64))
    assert LowRankGradient(torch.zeros(0, 2), torch.zeros(0, 3)).directions(2).k == 0


# -- factors of a real training step -----------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "phi3"])
def test_trainer_step_factors_equal_weight_grads(family: str, tok: Any, tmp_path: Path) -> None:
    """Padding, -100 labels, 2 micro-batches per step: dense(factors) == accumulated .grad."""
    lm = trainable_tiny(family, tok)
    snap = Snapshot(lm.model)
    lens = BackwardLensCallback(lm.model, tok, None, every=1, matrices=["ff1", "ff2", "q", "o"])
    seen: dict[int, list[MatrixFactors]] = {}
    read = lens.lens.read

    def keep(rec: Any, step: int) -> Any:
        seen[step] = rec.factors()
        return read(rec, step)

    lens.lens.read = keep  # type: ignore[method-assign]
    with lens:
        trainer(lm, tmp_path, [snap, lens]).train()
    assert sorted(seen) == [1, 2]
    for step, factors in seen.items():
        assert_factors_equal_grads(factors, snap.grads[step], expected=3 * 4)
        # 2 micro-batches of 3 rows: positions from both micro-batches are kept.
        assert {int(m) for m in factors[0].positions[:, 0]} == {0, 1}
    assert hook_count(lm.model) == 0
    assert len(lens.history) == 2 * 12


def test_padding_and_ignored_labels_drop_rows_exactly(tok: Any) -> None:
    """Rows the loss cannot reach (padding, each row's last token) are dropped; the rest kept."""
    lm = trainable_tiny("llama", tok)
    batch = Collator.for_tokenizer(tok)([{"input_ids": s} for s in sequences(tok)[:3]])
    lengths = batch["attention_mask"].sum(1)
    lens = TrainingLens(lm.model, tok, every=1, layers=[0])
    with lens.step(1) as rec:
        lm.model(**batch).loss.backward()
    assert rec is not None
    f = rec.factors()[0]
    # Layer 0's FF1 VJP is non-zero exactly at the real positions that precede a label.
    assert f.gradient.n == int((lengths - 1).sum())
    assert set(f.token_ids.tolist()) <= set(batch["input_ids"].reshape(-1).tolist())
    assert lens.last and lens.last[0].n_positions == f.gradient.n


def test_plain_loop_with_a_user_loss_and_frozen_layers(tok: Any) -> None:
    """Only layer 2 trains: by default only it is read; frozen layers below have no VJP."""
    lm = make_tiny("llama", tok)
    lm.model.requires_grad_(False)
    lm.arch.layers[2].requires_grad_(True)
    lens = TrainingLens(lm.model, tok, every=1)
    assert {(t.layer, t.name) for t in lens.targets} == {(2, "ff1"), (2, "ff2")}
    ids = torch.tensor([sequences(tok)[0]])

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:  # any loss: one token's logit
        return logits[0, -1, 42] - 0.5 * logits[0, 3].logsumexp(-1)

    with lens.step(1) as rec:
        loss_fn(lm.model(input_ids=ids).logits).backward()
    assert rec is not None
    grads = {id(p): p.grad for p in lm.model.parameters() if p.grad is not None}
    assert_factors_equal_grads(rec.factors(), grads, expected=2)
    # Reading frozen matrices too: those above a trainable one have a VJP, those below none.
    lm.model.zero_grad()
    lm.model.requires_grad_(False)
    lm.arch.layers[1].requires_grad_(True)
    every = TrainingLens(lm.model, tok, every=1, include_frozen=True)
    assert len(every.targets) == 6
    with every.record() as rec2:
        loss_fn(lm.model(input_ids=ids).logits).backward()
    assert sorted({f.target.layer for f in rec2.factors()}) == [1, 2]
    frozen = [f for f in rec2.factors() if not f.target.trainable]
    assert {f.target.layer for f in frozen} == {2}
    # The frozen layer's factors equal the gradient its weight would have.
    w = lm.arch.resolve(2, "ff2").weight
    w.requires_grad_(True)
    lm.model.zero_grad()
    loss_fn(lm.model(input_ids=ids).logits).backward()
    ff2 = next(f for f in frozen if f.target.name == "ff2")
    assert ff2.target.weight is w
    assert w.grad is not None
    torch.testing.assert_close(
        ff2.gradient.dense(), w.grad, rtol=0, atol=1e-6 * float(w.grad.abs().max())
    )


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_capture_for_any_loss_equals_autograd(family: str, tok: Any) -> None:
    lm = make_tiny(family, tok)
    batch = Collator.for_tokenizer(tok)([{"input_ids": s} for s in sequences(tok)[:4]])
    batch["labels"][1, :3] = -100  # a prompt part that is not trained on
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    flags = [p.requires_grad for p in lm.model.parameters()]
    loss, factors = capture_loss(lm, batch, matrices=["ff1", "ff2", "k"])
    # Reference: autograd on the same loss with every weight trainable.
    model = lm.model
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref_loss = causal_lm_loss(logits, batch["labels"])
        hf_loss = model(**batch).loss
        grads = dict(
            zip(
                [id(p) for p in params],
                torch.autograd.grad(ref_loss, params, allow_unused=True),
                strict=True,
            )
        )
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-6)
    assert float(hf_loss.detach()) == pytest.approx(
        float(ref_loss.detach()), rel=1e-5
    )  # the HF loss, same thing
    assert_factors_equal_grads(factors, {k: v for k, v in grads.items() if v is not None}, 9)
    assert all(p.grad is None for p in params)  # nothing written
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())
    assert hook_count(model) == 0
    with pytest.raises(InputError, match="labels"):
        capture_loss(lm, {"input_ids": batch["input_ids"]})


# -- hooks after success and failure ------------------------------------------------------------


def test_hooks_gone_after_an_exception(tok: Any, tmp_path: Path) -> None:
    lm = trainable_tiny("llama", tok)
    lens = TrainingLens(lm.model, tok, every=1)
    with pytest.raises(RuntimeError, match="boom"), lens.step(1):
        lm.model(input_ids=torch.tensor([sequences(tok)[0]]))
        assert hook_count(lm.model) > 0
        raise RuntimeError("boom")
    assert hook_count(lm.model) == 0 and lens.last == []

    class Failing(Trainer):
        def compute_loss(self, model: Any, inputs: Any, *a: Any, **kw: Any) -> Any:
            loss = super().compute_loss(model, inputs, *a, **kw)
            if self.state.global_step == 1:  # inside step 2, a step the lens reads
                raise RuntimeError("boom in step 2")
            return loss

    args = trainer(lm, tmp_path, []).args
    with BackwardLensCallback(lm.model, tok, tmp_path / "run", every=1) as cb:
        failing = Failing(
            model=lm.model,
            args=args,
            train_dataset=TokenDataset(sequences(tok)),
            data_collator=Collator.for_tokenizer(tok),
            callbacks=[cb],
        )
        with pytest.raises(RuntimeError, match="boom in step 2"):
            failing.train()
        assert hook_count(lm.model) > 0  # the Trainer calls no callback after an exception
    assert hook_count(lm.model) == 0
    rows = list(read_jsonl(tmp_path / "run" / "lens.jsonl"))
    assert {r["step"] for r in rows} == {1}  # step 1 was written, step 2 never finished


def test_gradient_checkpointing_is_refused(tok: Any) -> None:
    lm = trainable_tiny("llama", tok)
    enable = getattr(lm.model, "activation_checkpointing_enable", None)
    (enable or lm.model.gradient_checkpointing_enable)()
    with pytest.raises(InputError, match="checkpointing"):
        TrainingLens(lm.model, tok)


# -- the run folder -----------------------------------------------------------------------------


def test_callback_writes_the_expected_rows_and_report(tok: Any, tmp_path: Path) -> None:
    lm = trainable_tiny("llama", tok)
    out = tmp_path / "run"
    with BackwardLensCallback(
        lm.model, tok, out, every=2, directions=2, top_tokens=4, contributors=3
    ) as cb:
        trainer(lm, tmp_path, [cb], steps=5, accum=1).train()
    rows = list(read_jsonl(out / "lens.jsonl"))
    steps = [1, 2, 4, 5]  # the first, every 2nd, and the last
    assert [(r["step"], r["layer"], r["matrix"]) for r in rows] == [
        (s, layer, m) for s in steps for layer in range(3) for m in ("ff1", "ff2")
    ]
    for r in rows:
        assert r["side"] == ("in" if r["matrix"] == "ff1" else "out")
        assert r["reading"] == ("top" if r["matrix"] == "ff1" else "bottom")
        assert r["n_positions"] > 0 and r["norm"] > 0 and r["trainable"] is True
        assert len(r["directions"]) == 2
        d0, d1 = r["directions"]
        assert d0["sigma"] >= d1["sigma"] > 0 and 0 < d0["share"] <= 1
        assert len(d0["words"]) == len(d0["word_ids"]) == len(d0["probs"]) == 4
        assert len(d0["positions"]) == 3 and len(d0["sources"]) <= 3
        assert len(r["model_losses"]) == 1 and r["model_losses"][0] > 0
    log = [r for r in read_jsonl(out / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert [UpdateReading.from_dict(r).to_dict() for r in rows[:2]] == [
        {k: v for k, v in r.items() if k != "model_losses"} for r in rows[:2]
    ]
    settings = json.loads((out / "run.json").read_text())
    assert settings["every"] == 2 and settings["matrices"] == ["ff1", "ff2"]
    page = render_run_html(out)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    block = re.search(r'<script type="application/json" id="bl-run">(.*?)</script>', page, re.S)
    assert block is not None and len(json.loads(block.group(1))["rows"]) == len(rows)
    # Nothing is overwritten: the same folder is refused for a new run.
    with pytest.raises(OutputPathError, match="not empty"):
        check_run_folder(out)
    before = (out / "run.json").read_bytes()
    with pytest.raises(OutputPathError, match="not empty"):
        BackwardLensCallback(lm.model, tok, out)
    assert (out / "run.json").read_bytes() == before


def test_a_cut_last_line_is_skipped(tmp_path: Path) -> None:
    f = tmp_path / "lens.jsonl"
    f.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert [r["step"] for r in read_jsonl(f)] == [1, 2]
    f.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(json.JSONDecodeError):
        list(read_jsonl(f))
    # An archived run keeps lens.jsonl.gz: read the same.
    f.unlink()
    f.with_name("lens.jsonl.gz").write_bytes(gzip.compress(b'{"step": 3}\n'))
    assert [r["step"] for r in read_jsonl(f)] == [3]


def test_tensorboard_logger_and_missing_package(
    tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = trainable_tiny("llama", tok)
    lens = TrainingLens(lm.model, tok, every=1, layers=[2])
    with lens.step(1):
        lm.model(
            input_ids=torch.tensor([sequences(tok)[0]]), labels=torch.tensor([sequences(tok)[0]])
        ).loss.backward()
    calls: list[tuple[str, str, Any, int]] = []

    class Writer:
        def add_scalar(self, tag: str, value: float, step: int) -> None:
            calls.append(("scalar", tag, value, step))

        def add_text(self, tag: str, text: str, step: int) -> None:
            calls.append(("text", tag, text, step))

    board = TensorBoardLogger(Writer())
    board.readings(lens.last)
    board.log(1, {"loss": 2.5, "epoch": 1.0, "note": "x"})
    tags = {c[1] for c in calls}
    assert {"lens/ff1/norm/L2", "lens/ff2/sigma1/L2", "lens/ff2/L2", "train/loss"} <= tags
    text = next(c for c in calls if c[1] == "lens/ff2/L2")
    assert text[2] == " | ".join(lens.last[1].words) and text[3] == 1
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(InputError, match="pip install tensorboard"):
        summary_writer(tmp_path)
