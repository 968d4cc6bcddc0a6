"""Causal tracing (ROME's method) on tiny random models, against plain full forward passes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from backward_lens.batching import Hooks, model_inputs, pad_batch, pad_id
from backward_lens.cli import main
from backward_lens.editing.defaults import MODEL_DEFAULTS
from backward_lens.errors import DataError, InputError
from backward_lens.tracing import (
    Restoration,
    TraceConfig,
    Tracer,
    chosen_layers,
    embedding_std,
    layer_support,
    restorations_for,
    run_trace,
    trace_prompt,
)
from backward_lens.tracing.core import prepare, window_layers
from tests.tiny import make_tiny
from tests.tokenizers import real_tokenizer

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def tiny(family: str = "llama", tok: str = "llama-spm") -> Any:
    return make_tiny(family, real_tokenizer(tok), seed=3)


def tracer_for(lm: Any, noise: float, samples: int = 3, batch_rows: int = 64) -> Tracer:
    ids, s, e, _ = prepare(lm, PROMPT, SUBJECT, " Paris")
    clean = lm.model(**model_inputs(lm.model, pad_batch([ids], pad_id(lm.tokenizer)))).logits
    top = int(clean[0, -1].argmax())  # the tiny model's own answer is the traced object
    return Tracer(lm, ids, (s, e), top, noise, samples=samples, seed=1, batch_rows=batch_rows)


def no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@torch.no_grad()
def reference_score(t: Tracer, r: Restoration) -> float:
    """ROME's ``trace_with_patch`` written plainly.

    Full forward passes of every noise row, noise added to the embedding output, the clean
    value written into the restored outputs.
    """
    lm = t.lm
    rows = t.samples
    s, e = t.subject
    batch = pad_batch([t.ids] * rows, pad_id(lm.tokenizer))
    modules = {
        "hidden": lambda k: lm.arch.layers[k],
        "mlp": lambda k: lm.arch.resolve(k, "ff2").module,
        "attn": lambda k: lm.arch.resolve(k, "o").module,
    }

    def noise(mod: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, s:e] += t.noise
        return out

    def restore(layer: int) -> Any:
        def hook(mod: Any, args: Any, out: Any) -> None:
            h = out[0] if isinstance(out, tuple) else out
            for tok in r.tokens:
                h[:, tok] = t.clean[r.kind][layer][tok]

        return hook

    with Hooks() as hooks:
        hooks.forward(lm.model.get_input_embeddings(), noise)
        for layer in r.layers:
            hooks.forward(modules[r.kind](layer), restore(layer))
        logits = lm.model(**model_inputs(lm.model, batch)).logits[:, -1]
    return float(torch.softmax(logits.float(), -1)[:, t.target_id].mean())


@pytest.mark.parametrize(("family", "tok"), [("llama", "llama-spm"), ("gpt2", "gpt-2")])
def test_no_noise_restores_exactly_the_clean_run(family: str, tok: str) -> None:
    lm = tiny(family, tok)
    t = tracer_for(lm, noise=0.0)
    assert t.low == pytest.approx(t.clean_prob, rel=1e-5)
    for kind in ("hidden", "mlp", "attn"):
        scores = t.run(restorations_for(kind, t.n, t.n_layers, window=2))
        assert scores == pytest.approx([t.clean_prob] * len(scores), rel=1e-5)


def test_noise_with_nothing_restored_lowers_the_objects_probability() -> None:
    lm = tiny()
    t = tracer_for(lm, noise=3.0 * embedding_std(lm, [(PROMPT, SUBJECT)]), samples=5)
    assert t.low < 0.8 * t.clean_prob
    # and the scores are those of plain full forward passes
    r = Restoration("mlp", (t.subject[1] - 1,), (0, 1))
    assert t.run([r]) == pytest.approx([reference_score(t, r)], rel=1e-5)


def test_restoring_every_position_of_a_layer_equals_the_clean_run() -> None:
    lm = tiny()
    t = tracer_for(lm, noise=1.0)
    assert t.low != pytest.approx(t.clean_prob, rel=1e-3)
    every = tuple(range(t.n))
    scores = t.run([Restoration("hidden", every, (k,)) for k in range(t.n_layers)])
    assert scores == pytest.approx([t.clean_prob] * t.n_layers, rel=1e-5)


@pytest.mark.parametrize(("family", "tok"), [("llama", "llama-spm"), ("gemma3_text", "gpt-2")])
def test_batched_restorations_equal_one_at_a_time_and_full_passes(family: str, tok: str) -> None:
    lm = tiny(family, tok)
    t = tracer_for(lm, noise=1.0, samples=2, batch_rows=64)
    mixed = [
        *restorations_for("hidden", t.n, t.n_layers, 2)[::3],
        *restorations_for("mlp", t.n, t.n_layers, 2)[1::4],
        *restorations_for("attn", t.n, t.n_layers, 3)[2::5],
    ]
    batched = t.run(mixed)
    single = Tracer(lm, t.ids, t.subject, t.target_id, 1.0, samples=2, seed=1, batch_rows=2)
    one_at_a_time = [single.run([r])[0] for r in mixed]
    assert batched == pytest.approx(one_at_a_time, rel=1e-5, abs=1e-9)
    assert batched == pytest.approx([reference_score(t, r) for r in mixed], rel=1e-5, abs=1e-9)
    assert len(set(round(b, 6) for b in batched)) > 3  # the restorations differ


def test_window_is_romes() -> None:
    assert window_layers(0, 10, 48) == tuple(range(0, 5))
    assert window_layers(17, 10, 48) == tuple(range(12, 22))
    assert window_layers(47, 10, 48) == tuple(range(42, 48))
    assert window_layers(3, 1, 6) == (3,)


def test_hooks_are_gone_afterwards_even_after_an_exception(monkeypatch: Any) -> None:
    lm = tiny()
    lm.model.train()
    trace = trace_prompt(lm, PROMPT, SUBJECT, " Paris", 1.0, TraceConfig(samples=2, window=2))
    assert trace is not None and no_hooks(lm.model) and lm.model.training
    t = tracer_for(lm, noise=1.0)
    block = lm.arch.layers[-1]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(block, "forward", broken)
    with pytest.raises(RuntimeError, match="boom"):
        t.run([Restoration("mlp", (0,), (0,))])
    assert no_hooks(lm.model)
    with pytest.raises(RuntimeError, match="boom"):
        tracer_for(lm, noise=1.0)
    assert no_hooks(lm.model) and lm.model.training


def test_bad_restorations_and_knobs_are_one_line_errors() -> None:
    lm = tiny()
    t = tracer_for(lm, noise=1.0)
    with pytest.raises(InputError, match="outside the prompt"):
        t.run([Restoration("hidden", (t.n,), (0,))])
    with pytest.raises(InputError, match="outside the model"):
        t.run([Restoration("mlp", (0,), (t.n_layers,))])
    with pytest.raises(InputError, match="--samples"):
        TraceConfig(samples=0).check()
    with pytest.raises(InputError, match="unknown kinds"):
        TraceConfig(kinds=("mlp", "ffn")).check()


def test_trace_record_shapes_and_known_filter() -> None:
    lm = tiny()
    cfg = TraceConfig(samples=1, window=2)
    trace = trace_prompt(lm, PROMPT, SUBJECT, " Paris", 1.0, cfg)
    assert trace is not None
    for kind in ("hidden", "mlp", "attn"):
        assert len(trace.scores[kind]) == len(trace.ids)
        assert all(len(row) == lm.n_layers for row in trace.scores[kind])
    # the last token's hidden state at the last layer is the whole clean run
    assert trace.scores["hidden"][-1][-1] == pytest.approx(trace.high, rel=1e-5)
    if not trace.correct:
        assert trace_prompt(lm, PROMPT, SUBJECT, " Paris", 1.0, cfg, require_correct=True) is None


def write_facts(path: Path, n: int) -> Path:
    facts = [
        {"prompt": f"{s} is located in the city of", "subject": s, "target": " Paris"}
        for s in ["The Eiffel Tower", "Big Ben", "The Colosseum", "Notre Dame", "The Louvre"][:n]
    ]
    path.write_text("".join(json.dumps(f) + "\n" for f in facts))
    return path


def test_run_folder_resumes_and_summarises(tmp_path: Path) -> None:
    lm = tiny()
    data = write_facts(tmp_path / "facts.jsonl", 5)
    cfg = TraceConfig(samples=1, window=2)
    out = tmp_path / "run"
    first = run_trace(data, model=lm, n=2, out=out, config=cfg, known_only=False, progress=False)
    assert first.n_traced == 2
    lines = (out / "raw.jsonl").read_text().splitlines()
    second = run_trace(data, model=lm, n=3, out=out, config=cfg, known_only=False, progress=False)
    assert second.n_traced == 3
    after = (out / "raw.jsonl").read_text().splitlines()
    assert after[:2] == lines and len(after) == 3  # earlier rows kept, one appended
    summary = json.loads((out / "summary.json").read_text())
    curve = summary["averages"]["mlp"]["last_subject"]
    assert summary["peak"]["mlp"] == max(range(len(curve)), key=curve.__getitem__)
    assert summary["chosen"] == chosen_layers(curve)
    support = summary["support"]
    assert support["resamples"] == 1000
    assert sum(support["rome"].values()) == pytest.approx(1.0)
    assert sum(support["memit"].values()) == pytest.approx(1.0)
    assert "bootstrap resamples" in (out / "summary.md").read_text()
    assert (out / "averages.png").stat().st_size > 1000
    assert len(list((out / "records").glob("*.png"))) == 3
    # a compressed raw file (as committed under docs/results) is read back without loading the
    # model (the name "tiny-llama" could not be loaded)
    raw = out / "raw.jsonl"
    (out / "raw.jsonl.gz").write_bytes(gzip.compress(raw.read_bytes()))
    raw.unlink()
    again = run_trace(data, model=lm.name, n=3, out=out, config=cfg, known_only=False,
                      progress=False)  # fmt: skip
    assert again.summary["averages"] == second.summary["averages"]
    with pytest.raises(InputError, match="different run"):
        run_trace(data, model=lm, n=3, out=out, config=TraceConfig(samples=2, window=2),
                  known_only=False, progress=False)  # fmt: skip


def test_a_resumed_run_adds_kinds_as_if_traced_at_once(tmp_path: Path) -> None:
    lm = tiny()
    data = write_facts(tmp_path / "facts.jsonl", 3)

    def trace(out: Path, kinds: tuple[str, ...], model: Any = lm) -> Any:
        cfg = TraceConfig(samples=2, window=2, kinds=kinds)
        return run_trace(data, model=model, n=2, out=out, config=cfg, known_only=False,
                         progress=False)  # fmt: skip

    once = trace(tmp_path / "once", ("hidden", "mlp"))
    out = tmp_path / "split"
    trace(out, ("mlp",))
    figure = next((out / "records").glob("*.png"))
    drawn = figure.read_bytes()
    split = trace(out, ("hidden",))  # the folder's kinds become hidden + mlp
    # the same noise, batches and rounding: equal to the last digit
    assert split.summary["averages"] == once.summary["averages"]
    assert split.summary["peak"] == once.summary["peak"] and split.summary["chosen"]
    assert split.summary["run"]["kinds"] == ["hidden", "mlp"]
    lines = (out / "raw.jsonl").read_text().splitlines()
    assert len(lines) == 4  # two mlp rows, then the same two with hidden added
    assert figure.read_bytes() != drawn  # the heatmaps are redrawn with the new kind
    # nothing is missing now: nothing is traced (a model that cannot be loaded is not loaded)
    assert trace(out, ("mlp",), model=lm.name).summary["averages"] == once.summary["averages"]
    # a row that no longer matches its record (another tokenizer under the same name) is refused
    rows = [json.loads(line) for line in lines[2:]]
    rows[0]["values"]["ids"][-1] += 1
    (out / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="tokenises differently"):
        trace(out, ("attn",))


def test_cli_refuses_missing_data_in_one_line(tmp_path: Path, capsys: Any) -> None:
    assert main(["trace", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("backward-lens: error: give the records with --data") and "\n" not in err


def test_chosen_layers_by_hand() -> None:
    curve = [0.0, 0.1, 0.2, 0.3, 0.5, 0.9, 0.4, 0.4, 0.4, 0.0]
    # peak 5; windows of 5: [1-5] 2.0, [2-6] 2.3, [3-7] 2.5, [4-8] 2.6, [5-9] 2.1
    assert chosen_layers(curve) == {"rome": 5, "memit": [4, 5, 6, 7, 8]}
    assert chosen_layers([0.3, 0.1, 0.3], width=5) == {"rome": 0, "memit": [0, 1, 2]}


def test_layer_support_by_hand() -> None:
    # every record peaks at layer 2: every resample picks it
    same = layer_support([[0.0, 0.1, 0.5, 0.2], [0.1, 0.0, 0.3, 0.2]], resamples=50, width=2)
    assert same == {"resamples": 50, "rome": {"2": 1.0}, "memit": {"2-3": 1.0}}
    # two records A = [1, 0, 0], B = [0, 0, 3]: a resample of two is AA (peak 0, window 0-1)
    # with probability 1/4, else BB or AB ([0.5, 0, 1.5]: peak 2, window 1-2)
    two = layer_support([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]], resamples=4000, seed=7, width=2)
    assert list(two["rome"]) == ["2", "0"] and list(two["memit"]) == ["1-2", "0-1"]
    assert two["rome"]["0"] == pytest.approx(0.25, abs=0.03)  # binomial sd 0.007
    assert two["rome"]["2"] == pytest.approx(1 - two["rome"]["0"])
    assert two["memit"] == {"1-2": two["rome"]["2"], "0-1": two["rome"]["0"]}
    assert layer_support([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]], resamples=4000, seed=7, width=2) == two
    for bad in ([], [[0.1, 0.2], [0.3]]):
        with pytest.raises(InputError, match="at least one record"):
            layer_support(bad)


@pytest.mark.parametrize(
    ("model", "folder"),
    # SmolLM2: ROME's 10 noise samples; Gemma-3: one sample (its 10-sample trace: the next test)
    [("smollm2-135m", "tracing-smollm2-samples10"), ("gemma3-270m", "tracing-gemma3")],
)
def test_defaults_are_what_the_committed_traces_imply(model: str, folder: str) -> None:
    summary = json.loads((RESULTS / folder / "summary.json").read_text())
    if model == "smollm2-135m":
        assert summary["run"]["samples"] == 10
    curve = summary["averages"]["mlp"]["last_subject"]
    chosen = chosen_layers(curve)
    assert chosen["rome"] == summary["peak"]["mlp"]
    assert summary["chosen"] == chosen
    assert MODEL_DEFAULTS[model]["rome"] == {"layer": chosen["rome"]}
    assert MODEL_DEFAULTS[model]["memit"]["layers"] == chosen["memit"]


def test_gemma3_defaults_hold_with_rome_ten_noise_samples() -> None:
    """Gemma-3's MLP trace with ROME's 10 samples keeps ROME's layer; MEMIT's window is a tie.

    The 10-sample run (same 16 facts) peaks at layer 5 again; its best 5-layer window is 3-7,
    and the default 4-8 (the one-sample run's choice) has a mean effect within 2 % of it.
    """
    summary = json.loads((RESULTS / "tracing-gemma3-samples10" / "summary.json").read_text())
    assert summary["run"]["samples"] == 10
    curve = summary["averages"]["mlp"]["last_subject"]
    chosen = chosen_layers(curve)
    assert summary["chosen"] == chosen
    assert MODEL_DEFAULTS["gemma3-270m"]["rome"] == {"layer": chosen["rome"]}
    default = MODEL_DEFAULTS["gemma3-270m"]["memit"]["layers"]
    assert chosen["memit"] != default
    best = sum(curve[i] for i in chosen["memit"]) / 5
    assert sum(curve[i] for i in default) / 5 == pytest.approx(best, rel=0.02)


@pytest.mark.slow
def test_smollm2_known_fact_is_traced(smollm2: Any) -> None:
    prompt, subject, target = "The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris"
    # (no BOS in SmolLM2: token 0 is "The", before the subject)
    noise = 3.0 * embedding_std(smollm2, [(prompt, subject)])
    ids, s, e, target_id = prepare(smollm2, prompt, subject, target)
    t = Tracer(smollm2, ids, (s, e), target_id, noise, samples=3)
    assert t.clean_top == target_id and t.clean_prob > 0.3
    assert t.low < 0.5 * t.clean_prob
    every = tuple(range(t.n))
    assert t.run([Restoration("hidden", every, (10,))]) == pytest.approx([t.clean_prob], rel=1e-4)
    # restoring the subject's own states after block 0 recovers most of the fact (the tokens
    # after it still read the corrupted embeddings in block 0); a token before it changes nothing
    subject, before = t.run(
        [Restoration("hidden", tuple(range(s, e)), (0,)), Restoration("hidden", (0,), (5,))]
    )
    assert subject > t.low + 0.5 * (t.clean_prob - t.low)
    assert s > 0 and before == pytest.approx(t.low, rel=1e-5)
