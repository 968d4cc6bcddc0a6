"""``backward-lens explain``: the JSON contract, figures, and one clear line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import backward_lens as bl
from backward_lens.cli import main
from backward_lens.models import LensModel

pytestmark = pytest.mark.slow

PROMPT = "The Eiffel Tower is located in the city of"


def _check_contract(data: dict[str, Any]) -> None:
    """The machine contract of issue 2 (types and nesting)."""
    assert isinstance(data["model"], str) and isinstance(data["vocab_size"], int)
    assert isinstance(data["prompt"], str) and isinstance(data["loss"], float)
    tokens = data["tokens"]
    assert isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)
    assert {"text", "token_id", "token"} <= data["target"].keys()
    assert isinstance(data["target"]["token_id"], int)
    assert isinstance(data["prediction"]["token"], str)
    assert 0.0 <= data["prediction"]["prob"] <= 1.0
    assert isinstance(data["layers"], list) and data["layers"]
    for layer in data["layers"]:
        assert isinstance(layer["layer"], int)
        for name in ("ff1", "ff2"):
            m = layer[name]
            assert isinstance(m["rank"], int) and 0 <= m["rank"] <= len(tokens)
            assert [p["token"] for p in m["positions"]] == tokens
            for p in m["positions"]:
                assert isinstance(p["norm"], float) and p["norm"] >= 0
                assert all(isinstance(t, str) for t in p["top"] + p["bottom"])
                assert isinstance(p["target_rank"], int)
                assert 0 <= p["target_rank"] < data["vocab_size"]


def test_json_png_html(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = {k: tmp_path / f"e.{k}" for k in ("json", "png", "html")}
    code = main(
        ["explain", PROMPT, "--target", " Rome", "--top-k", "2", "--layers", "0,27-29"]
        + [a for k, p in out.items() for a in (f"--{k}", str(p))]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "' Paris'" in printed and "FF2" in printed and "[49151]" in printed
    data = json.loads(out["json"].read_text())
    _check_contract(data)
    assert [lr["layer"] for lr in data["layers"]] == [0, 27, 28, 29]
    assert data["layers"][-1]["ff2"]["rank"] == 1 and data["layers"][0]["ff1"]["rank"] == 10
    assert data["layers"][-2]["ff2"]["positions"][-1]["bottom"][0] == " Rome"
    assert len(data["layers"][0]["ff1"]["positions"][0]["top"]) == 2
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = out["html"].read_text()
    assert "<html" in html.lower() and " Rome" in html
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp files left


def _near_ties(lm: LensModel, vectors: torch.Tensor, target: int) -> torch.Tensor:
    """Per row, how many tokens tie the target within float32 rounding of the lens logits.

    Logit j is a length-d dot product of the normed vector h with row W_j: computed in float32
    it is off by at most d * u * sum_k |h_k W_jk| (u = 2^-24), plus a few u of the norm's own
    rounding; two tokens whose gap is below the sum of their bounds may come out either way.
    """
    norms, weight, _ = lm.lens._float32_head()
    with torch.no_grad():
        h = vectors.float()
        for module in norms:
            h = module(h)
        logits = torch.nn.functional.linear(h, weight)
        bound = (h.shape[-1] + 16) * 2.0**-24 * (h.abs() @ weight.abs().T)
    gap = (logits - logits[:, target : target + 1]).abs()
    near = gap <= bound + bound[:, target : target + 1]
    near[:, target] = False
    return near.sum(-1)


def test_normalized_lens_changes_the_reading(tmp_path: Path, smollm2: LensModel) -> None:
    raw, norm = tmp_path / "raw.json", tmp_path / "norm.json"
    assert main(["explain", PROMPT, "--target", " Rome", "--json", str(raw), "--quiet"]) == 0
    assert (
        main(
            ["explain", PROMPT, "--target", " Rome", "--normalized", "--json", str(norm), "--quiet"]
        )
        == 0
    )
    a, b = json.loads(raw.read_text()), json.loads(norm.read_text())
    assert b["normalized"] and not a["normalized"]
    # RMSNorm has no bias: normalising rescales the logits, so ranks stay and probabilities move
    pos_a = [p for lr in a["layers"] for p in lr["ff2"]["positions"]]
    pos_b = [p for lr in b["layers"] for p in lr["ff2"]["positions"]]
    # equal ranks, except that a token within float32 rounding of the target may swap sides
    # (a fresh machine once read 40284 against 40283: two float paths, one near-tie)
    cap = bl.capture(smollm2, PROMPT, " Rome")
    assert isinstance(cap, bl.Capture)
    deltas = torch.cat([g.delta for g in cap.gradients["ff2"]])
    ties = _near_ties(smollm2, deltas, a["target"]["token_id"]).tolist()
    assert len(ties) == len(pos_a) == len(pos_b)
    for p, q, tie in zip(pos_a, pos_b, ties, strict=True):
        assert abs(p["target_rank"] - q["target_rank"]) <= tie
    same = [p["target_rank"] == q["target_rank"] for p, q in zip(pos_a, pos_b, strict=True)]
    assert sum(same) > 0.9 * len(same)
    assert [p["bottom_probs"] for p in pos_a] != [p["bottom_probs"] for p in pos_b]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["", "--target", " Rome"], "prompt is empty"),
        ([PROMPT, "--target", ""], "target is empty"),
        ([PROMPT, "--target", " Danielle Darrieux"], "--first-token"),
        ([PROMPT], "--target"),
        ([PROMPT, "--target", " Rome", "--layers", "40"], "out of range"),
        ([PROMPT, "--target", " Rome", "--layers", "a-b"], "cannot read layers"),
        ([PROMPT, "--target", " Rome", "--model", "no-such-model"], "cannot load model"),
        ([PROMPT, "--target", " Rome", "--model", "/nonexistent/m.gguf"], "no such GGUF"),
        (["word " * 9000, "--target", " Rome"], "shorten the prompt"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(
    args: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never.json"
    code = main(["explain", *args, "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("backward-lens: error: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_console_script_help_and_exit_code(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("backward-lens")
    help_text = subprocess.run([exe, "explain", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "Example" in help_text.stdout
    bad = subprocess.run([exe, "explain", "x", "--target", ""], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
