"""Every study experiment end to end on tiny random models, checked against direct computation.

"Direct" means plain autograd on the unbatched prompt (``retain_grad`` on module outputs,
``weight.grad``), the model's own final norm and LM head, and ``torch.linalg.matrix_rank``:
none of the study's code paths (batched capture, factor algebra, the lens object).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from backward_lens.cli import main
from backward_lens.errors import InputError
from backward_lens.study import EXPERIMENTS, StudyOptions, compare_studies, run_study
from backward_lens.study.runner import load_study
from backward_lens.tokens import encode_request
from tests.tiny import make_tiny

RECORDS = [
    {
        "prompt": "The mother tongue of Danielle Darrieux is",
        "subject": "Danielle Darrieux",
        "target": "English",
        "target_true": "French",
    },
    {
        "prompt": "Toko Yasuda, the",
        "subject": "Toko Yasuda",
        "target": "piano",
        "target_true": "guitar",
    },
    {
        "prompt": "Autonomous University of Madrid, which is located in",
        "subject": "Autonomous University of Madrid",
        "target": "Sweden",
        "target_true": "Spain",
    },
    {
        "prompt": "Apple A5 was created by",
        "subject": "Apple A5",
        "target": "Google",
        "target_true": "Apple",
    },
    {
        "prompt": "What is the twin city of Lyon? It is",
        "subject": "Lyon",
        "target": "Manila",
        "target_true": "Beirut",
    },
]
BAD = [
    {"prompt": "The Eiffel Tower is in", "subject": "Big Ben", "target": "Rome"},
    {"prompt": "Paris is the capital of", "subject": "Paris", "target": "  "},
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(dict(r, id=i)) + "\n" for i, r in enumerate(rows)))
    return path


@pytest.fixture(scope="module")
def llama(tokenizer):
    return make_tiny("llama", tokenizer, seed=1)


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return make_tiny("gpt2", tokenizer, seed=2)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return _jsonl(tmp_path / "facts.jsonl", RECORDS + BAD)


# ------------------------------------------------------------------------------------------
# direct computation


def _mlp(lm, layer: int):
    if lm.model.config.model_type == "gpt2":
        block = lm.model.transformer.h[layer].mlp
        return block.c_fc, block.c_proj
    block = lm.model.model.layers[layer].mlp
    return block.up_proj, block.down_proj


def _final(lm, v: torch.Tensor) -> torch.Tensor:
    norm = (
        lm.model.transformer.ln_f if lm.model.config.model_type == "gpt2" else lm.model.model.norm
    )
    return lm.model.lm_head(norm(v))


def direct(lm, prompt: str, target: str) -> dict:
    """x_i of FF1, delta_i of FF2, the dense gradients, by autograd on one unbatched prompt."""
    req = encode_request(lm.tokenizer, prompt, target, multi_token="first")
    ids = torch.tensor([req.input_ids])
    t = req.target_ids[0]
    model = lm.model
    saved: dict = {}
    handles = []
    for layer in range(lm.n_layers):
        ff1, ff2 = _mlp(lm, layer)

        def keep_in(mod, args, out, layer=layer):
            saved[("x1", layer)] = args[0].detach()[0]

        def keep_out(mod, args, out, layer=layer):
            out.retain_grad()
            saved[("z2", layer)] = out
            saved[("x2", layer)] = args[0].detach()[0]

        handles += [ff1.register_forward_hook(keep_in), ff2.register_forward_hook(keep_out)]
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(True)
    try:
        logits = model(input_ids=ids).logits[0, -1]
        loss = -logits.log_softmax(-1)[t]
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    out = {
        "t": t,
        "answer": int(logits.argmax()),
        "x1": torch.stack([saved[("x1", i)] for i in range(lm.n_layers)]),
        "x2": torch.stack([saved[("x2", i)] for i in range(lm.n_layers)]),
        "d2": torch.stack([saved[("z2", i)].grad[0] for i in range(lm.n_layers)]),
        "g1": [_mlp(lm, i)[0].weight.grad.clone() for i in range(lm.n_layers)],
        "g2": [_mlp(lm, i)[1].weight.grad.clone() for i in range(lm.n_layers)],
        "ids": req.input_ids,
    }
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)
    return out


def _rank_in(lm, vectors: torch.Tensor, token: int) -> np.ndarray:
    with torch.no_grad():
        logits = _final(lm, vectors)
    return (logits > logits[..., token : token + 1]).sum(-1).numpy()


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "raw.jsonl").read_text().splitlines()]


def _ok(folder: Path) -> list[dict]:
    return [r for r in _rows(folder) if r["status"] == "ok"]


FILES = [
    "config.json",
    "raw.jsonl",
    "aggregate.json",
    "aggregate.csv",
    "figure.png",
    "figure.html",
    "summary.md",
]


def _run(name, lm, data, tmp_path, **kw):
    res = run_study(name, data, model=lm, n=50, out=tmp_path / name, progress=False, **kw)
    for f in FILES:
        assert (res.out / f).stat().st_size > 0, f
    assert res.n_ok == len(RECORDS)
    html = (res.out / "figure.html").read_text()
    assert "data:image/png;base64," in html and "<script" not in html and "http" not in html
    summary = (res.out / "summary.md").read_text()
    assert "**Finding.**" in summary and "time per record" in summary
    return res


# ------------------------------------------------------------------------------------------
# one test per experiment


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_rank_matches_matrix_rank_of_autograd(which, request, data, tmp_path) -> None:
    lm = request.getfixturevalue(which)
    res = _run("rank", lm, data, tmp_path)
    rows = _ok(res.out)
    for rec, row in zip(RECORDS, rows, strict=True):
        d = direct(lm, rec["prompt"], rec["target"])
        v = row["values"]
        assert v["n"] == len(d["ids"])
        assert v["ranks"]["ff1"] == [int(torch.linalg.matrix_rank(g)) for g in d["g1"]]
        assert v["ranks"]["ff2"] == [int(torch.linalg.matrix_rank(g)) for g in d["g2"]]
        assert v["ranks"]["ff1"][-1] == 1  # App. A: only the last position reaches the loss
    n = np.array([r["values"]["n"] for r in rows])
    ff1 = np.array([r["values"]["ranks"]["ff1"] for r in rows])
    table = res.to_dataframe()
    got = table[table.matrix == "ff1"].sort_values("layer").share_full_rank.to_numpy()
    np.testing.assert_allclose(got, (ff1 == n[:, None]).mean(0))


def test_rank_share_drops_with_repeated_positions(llama, tokenizer, tmp_path) -> None:
    """Lemma 4.1: identical x_i are linearly dependent, so the rank drops by one per repeat.

    The x_i are identical for the same token repeated at the start (a RoPE model has no
    position in its values).
    """
    rows = [
        {"prompt": " the" * k + " city of Rome is in", "subject": "Rome", "target": "Italy"}
        for k in (2, 3, 4)
    ]
    data = _jsonl(tmp_path / "repeats.jsonl", rows)
    res = run_study("rank", data, model=llama, out=tmp_path / "rep", progress=False)
    for k, row in zip((2, 3, 4), _ok(res.out), strict=True):
        v = row["values"]
        d = direct(llama, rows[k - 2]["prompt"], "Italy")
        x0 = d["x1"][:, :k]
        assert torch.allclose(x0, x0[:, :1].expand_as(x0), atol=1e-5)  # truly identical inputs
        want = [int(torch.linalg.matrix_rank(g)) for g in d["g1"]]
        assert v["ranks"]["ff1"] == want
        assert all(r == v["n"] - (k - 1) for r in v["ranks"]["ff1"][:-1])
    assert res.aggregate.headline["ff1_full_rank_mean_pct"] == 0.0
    assert res.aggregate.headline["ff1_max_deficit"] == 3
    plain = _jsonl(
        tmp_path / "plain.jsonl",
        [{"prompt": "The city of Rome is in", "subject": "Rome", "target": "Italy"}],
    )
    ok = run_study("rank", plain, model=llama, out=tmp_path / "plain", progress=False)
    assert ok.aggregate.headline["ff1_full_rank_mean_pct"] == 100.0


def test_norms_match_autograd(llama, data, tmp_path) -> None:
    res = _run("norms", llama, data, tmp_path)
    rows = _ok(res.out)
    per_record = []
    for rec, row in zip(RECORDS, rows, strict=True):
        d = direct(llama, rec["prompt"], rec["target"])
        v = row["values"]
        np.testing.assert_allclose(v["delta_norm"], d["d2"].norm(dim=-1), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(v["x_norm"], d["x1"].norm(dim=-1), rtol=1e-4)
        per_record.append(np.asarray(v["delta_norm"])[:, v["segments"]["last_subject"]].mean(1))
    table = res.to_dataframe()
    got = table[table.segment == "last_subject"].sort_values("layer").delta_norm.to_numpy()
    np.testing.assert_allclose(got, np.mean(per_record, axis=0), rtol=1e-5)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_target_rank_matches_direct_lens(which, request, data, tmp_path) -> None:
    lm = request.getfixturevalue(which)
    res = _run("target-rank", lm, data, tmp_path)
    for rec, row in zip(RECORDS, _ok(res.out), strict=True):
        d = direct(lm, rec["prompt"], rec["target"])
        raw = _rank_in(lm, d["d2"], d["t"])
        unit = d["d2"] / d["d2"].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        normed = _rank_in(lm, unit, d["t"])
        got_raw, got_norm = (
            np.array(row["values"]["rank_raw"]),
            np.array(row["values"]["rank_normalized"]),
        )
        # ranks may differ by ties / float noise on a handful of tokens, never more
        assert np.abs(got_raw - raw).max() <= 2 and np.abs(got_norm[:-1] - normed[:-1]).max() <= 2
    top = res.config["facts"]["vocab_size"] - 1
    last = np.mean([np.array(r["values"]["rank_raw"])[:, -1] for r in _ok(res.out)], axis=0)
    np.testing.assert_allclose(res.aggregate.curves["last token (raw lens)"]["y"], last / top)


def test_original_rank_matches_direct_lens(llama, data, tmp_path) -> None:
    res = _run("original-rank", llama, data, tmp_path)
    for rec, row in zip(RECORDS, _ok(res.out), strict=True):
        d = direct(llama, rec["prompt"], rec["target"])
        v = row["values"]
        assert v["answer_id"] == d["answer"]
        true_id = encode_request(
            llama.tokenizer, rec["prompt"], rec["target_true"], multi_token="first"
        ).target_ids[0]
        assert v["correct"] == (d["answer"] == true_id)
        for key, vec, tok in (
            ("answer_in_delta", d["d2"][:, -1], d["answer"]),
            ("answer_in_x", d["x1"][:, -1], d["answer"]),
            ("target_in_x", d["x1"][:, -1], d["t"]),
        ):
            assert np.abs(np.array(v[key]) - _rank_in(llama, vec, tok)).max() <= 2


def test_similarity_matches_direct_cosines(llama, data, tmp_path) -> None:
    res = _run("similarity", llama, data, tmp_path)
    mats = []
    for rec, row in zip(RECORDS, _ok(res.out), strict=True):
        d = direct(llama, rec["prompt"], rec["target"])
        v = d["d2"][:, -1].double()  # last token, [L, d]
        u = v / v.norm(dim=-1, keepdim=True)
        cos = (u @ u.T).numpy()
        np.testing.assert_allclose(row["values"]["cosine"]["last"], cos, atol=2e-4)
        mats.append(cos)
    table = res.to_dataframe()
    last = table[table.segment == "last"]
    got = last.pivot(index="layer_i", columns="layer_j", values="cosine").to_numpy()
    np.testing.assert_allclose(got, np.mean(mats, axis=0), atol=2e-4)


def test_neurons_match_the_dense_autograd_gradient(llama, data, tmp_path) -> None:
    layer = 1
    res = _run(
        "neurons", llama, data, tmp_path, options=StudyOptions(layer=layer, top=20, max_neurons=0)
    )
    for rec, row in zip(RECORDS, _ok(res.out), strict=True):
        d = direct(llama, rec["prompt"], rec["target"])
        v = row["values"]
        g2 = d["g2"][layer]  # down_proj.weight.grad [d, d_m]: FF2 neuron j is column j
        norms = g2.norm(dim=0)
        np.testing.assert_allclose(v["ff2"]["norms"], norms.sort(descending=True).values, rtol=1e-3)
        order = norms.argsort(descending=True)
        neurons = g2.T[order]  # [d_m, d]
        span = d["d2"][layer]  # [n, d]
        cos = (
            torch.nn.functional.normalize(neurons, dim=1)
            @ torch.nn.functional.normalize(span, dim=1).T
        )
        np.testing.assert_allclose(v["ff2"]["best_abs_cos"], cos.abs().max(1).values, atol=2e-3)
        g1 = d["g1"][layer]  # up_proj.weight.grad [d_m, d]: FF1 neuron j is row j
        np.testing.assert_allclose(
            v["ff1"]["norms"], g1.norm(dim=1).sort(descending=True).values, rtol=1e-3
        )
    h = res.aggregate.headline
    assert 0 <= h["ff2_high_norm_match_1_or_2"] <= 1 and h["layer"] == layer


def test_imprint_shift_lemma_and_full_step(llama, data, tmp_path) -> None:
    before = {k: v.clone() for k, v in llama.model.state_dict().items()}
    lr = 0.5
    res = _run("imprint-shift", llama, data, tmp_path, options=StudyOptions(layer=1, lr=lr))
    after = llama.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights restored bit-exactly
    for rec, row in zip(RECORDS, _ok(res.out), strict=True):
        v = row["values"]
        for step in v["single"]:  # Lemma 5.2 to float tolerance
            assert step["rel_error"] < 1e-4 and step["cosine"] > 1 - 1e-6
        # The full step equals a real torch SGD step on the autograd gradient.
        d = direct(llama, rec["prompt"], rec["target"])
        for m, grads in (("ff1", d["g1"]), ("ff2", d["g2"])):
            weight = _mlp(llama, 1)[0 if m == "ff1" else 1].weight
            saved = weight.detach().clone()
            try:
                with torch.no_grad():
                    weight -= lr * grads[1]
                    logits = llama.model(input_ids=torch.tensor([d["ids"]])).logits[0, -1]
            finally:
                with torch.no_grad():
                    weight.copy_(saved)
            full = next(f for f in v["full"] if f["matrix"] == m)
            want = float(logits[d["t"]]) - v["before"]["target_logit"]
            assert full["dlogit_full"] == pytest.approx(want, rel=1e-3, abs=1e-4)
            assert full["full_rel_error"] < 1e-4
    assert res.aggregate.headline["max_rel_error"] < 1e-4


def test_imprint_shift_on_gpt2_conv1d(gpt2, data, tmp_path) -> None:
    res = _run("imprint-shift", gpt2, data, tmp_path, options=StudyOptions(layer=-2))
    assert res.aggregate.headline["max_rel_error"] < 1e-4


# ------------------------------------------------------------------------------------------
# runner behaviour


def test_bad_records_are_skipped_and_counted(llama, data, tmp_path) -> None:
    res = run_study("norms", data, model=llama, out=tmp_path / "bad", progress=False)
    assert res.n_ok == len(RECORDS)
    assert res.skipped == {"subject not in the prompt": 1, "empty target": 1}
    summary = res.summary
    assert "measured: 5 of 7 records" in summary
    assert "skipped (subject not in the prompt): 1" in summary
    assert "skipped (empty target): 1" in summary


def test_resume_does_not_recompute(llama, data, tmp_path, monkeypatch) -> None:
    out = tmp_path / "resume"
    full = run_study("rank", data, model=llama, out=out, progress=False)
    raw = (out / "raw.jsonl").read_text().splitlines()
    # Interrupted after 3 records, mid-way through writing the 4th line.
    (out / "raw.jsonl").write_text("\n".join(raw[:3]) + "\n" + raw[3][: len(raw[3]) // 2])
    exp = EXPERIMENTS["rank"]
    calls = []
    original = type(exp).measure

    def counting(self, lm, item, capture, options):
        calls.append(item.key)
        return original(self, lm, item, capture, options)

    monkeypatch.setattr(type(exp), "measure", counting)
    resumed = run_study("rank", data, model=llama, out=out, progress=False)
    done_first = {json.loads(line)["key"] for line in raw[:3]}
    assert set(calls) == {json.loads(line)["key"] for line in raw} - done_first
    assert len(calls) == len(set(calls))
    assert resumed.aggregate.to_dict() == full.aggregate.to_dict()
    # A finished folder re-aggregates without loading any model.
    calls.clear()
    again = run_study("rank", data, model="tiny-llama", out=out, progress=False)  # unloadable
    assert calls == [] and again.aggregate.to_dict() == full.aggregate.to_dict()
    assert load_study(out).aggregate.to_dict() == full.aggregate.to_dict()
    # A different run into the same folder is refused, unless fresh.
    with pytest.raises(InputError, match="different run"):
        run_study("rank", data, model=llama, out=out, seed=3, progress=False)


def test_compare_overlays_models(llama, gpt2, data, tmp_path) -> None:
    a = _run("target-rank", llama, data, tmp_path / "a")
    b = _run("target-rank", gpt2, data, tmp_path / "b")
    out = compare_studies([a.out, b.out], tmp_path / "cmp")
    for f in ("figure.png", "figure.html", "summary.md", "headline.csv"):
        assert (out / f).stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert "tiny-llama" in summary and "tiny-gpt2" in summary
    c = _run("rank", llama, data, tmp_path / "c")
    with pytest.raises(InputError, match="different experiments"):
        compare_studies([a.out, c.out], tmp_path / "bad")


def test_cli_runs_and_compares(llama, data, tmp_path, capsys) -> None:
    folder = tmp_path / "tiny-model"
    llama.model.save_pretrained(folder)
    llama.tokenizer.save_pretrained(folder)
    out = tmp_path / "cli-rank"
    code = main(
        [
            "study",
            "rank",
            "--data",
            str(data),
            "--model",
            str(folder),
            "--n",
            "4",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0 and (out / "figure.png").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["run"]["n"] == 4 and cfg["run"]["sampled"] == 4
    assert main(["study", "compare", str(out), "--out", str(tmp_path / "cmp"), "--quiet"]) == 0
    assert main(["study", "rank", "--model", str(folder)]) == 2  # no --data: one-line error
    err = capsys.readouterr().err
    assert "--data" in err and "Traceback" not in err
