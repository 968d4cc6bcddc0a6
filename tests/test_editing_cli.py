"""``backward-lens edit`` on tiny models: output, save/load, and one-line errors (exit 2)."""

from __future__ import annotations

import json

import pytest

from backward_lens.cli import main
from backward_lens.commands import edit as edit_cmd
from tests.tiny import make_tiny

PROMPT = "The Eiffel Tower is located in the city of"
BASE = ["edit", "--prompt", PROMPT, "--subject", "Eiffel Tower", "--target", " Rome"]


@pytest.fixture
def tiny(tokenizer, monkeypatch):  # type: ignore[no-untyped-def]
    models = {"gpt2": make_tiny("gpt2", tokenizer), "llama": make_tiny("llama", tokenizer)}
    monkeypatch.setattr(edit_cmd, "model_from_args", lambda args: models[args.model])
    return models


def run_json(capsys, argv):  # type: ignore[no-untyped-def]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_edit_json_save_and_load(tiny, capsys, tmp_path):  # type: ignore[no-untyped-def]
    argv = [*BASE, "--model", "gpt2", "--layer", "1", "--eta", "5", "--max-new-tokens", "4"]
    out = run_json(
        capsys,
        [*argv, "--neighborhood", "The Louvre is in", "--save", str(tmp_path / "e"), "--json"],
    )
    assert out["method"] == "shift" and out["hparams"] == {"layer": 1, "eta": 5.0}
    assert out["parameters"] == {"transformer.h.1.mlp.c_proj.weight": [128, 32]}
    rows = out["continuations"]
    assert [r["kind"] for r in rows] == ["edit", "neighborhood"]
    assert rows[0]["target_prob_after"] > rows[0]["target_prob_before"]
    loaded = run_json(
        capsys,
        [
            "edit",
            "--model",
            "gpt2",
            "--load",
            str(tmp_path / "e"),
            "--max-new-tokens",
            "4",
            "--json",
        ],
    )
    assert loaded["continuations"][0]["after"] == rows[0]["after"]
    assert loaded["continuations"][0]["prompt"] == PROMPT
    # the model was reverted after each run
    again = run_json(capsys, [*argv, "--json"])
    assert again["continuations"][0]["before"] == rows[0]["before"]


def test_text_output(tiny, capsys):  # type: ignore[no-untyped-def]
    assert main([*BASE, "--model", "llama", "--layer", "1", "--max-new-tokens", "3"]) == 0
    text = capsys.readouterr().out
    assert "before:" in text and "after:" in text and "model.layers.1.mlp.down_proj" in text


def test_refused_adaptive_edit_says_so(tiny, capsys):  # type: ignore[no-untyped-def]
    argv = [*BASE, "--model", "llama", "--layer", "1", "--max-new-tokens", "2"]
    tiny_cap = ["--method", "shift-adaptive", "--eta", "1e-7", "--hparam", "eta_max=2e-7"]
    assert main([*argv, *tiny_cap]) == 0
    text = capsys.readouterr().out
    assert "edit refused" in text and "edited: nothing" in text
    assert main([*argv, *tiny_cap, "--hparam", "on_failure=cap"]) == 0
    text = capsys.readouterr().out
    assert "applied the cap anyway" in text and "model.layers.1.mlp.down_proj" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["edit", "--prompt", PROMPT, "--subject", "Louvre", "--target", " Rome"],
        ["edit", "--prompt", PROMPT, "--target", "   "],
        ["edit", "--prompt", PROMPT, "--target", " Rome", "--method", "nope"],
        ["edit", "--prompt", PROMPT, "--target", " Rome", "--layer", "9", "--model", "gpt2"],
        ["edit", "--prompt", PROMPT, "--target", " Rome", "--method", "rome", "--eta", "1"],
        ["edit", "--prompt", PROMPT, "--target", " Rome", "--hparam", "novalue"],
        ["edit", "--prompt", PROMPT, "--target", " Rome", "--hparam", "lr=1", "--model", "gpt2"],
        ["edit", "--load", "/nonexistent/edit"],
    ],
)
def test_bad_input_is_one_line_exit_2(tiny, capsys, argv):  # type: ignore[no-untyped-def]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("backward-lens: error:") and "\n" not in err


def test_edit_for_another_model_is_refused(tiny, capsys, tmp_path):  # type: ignore[no-untyped-def]
    save = [*BASE, "--model", "gpt2", "--layer", "1", "--save", str(tmp_path / "e"), "--json"]
    assert main(save) == 0
    capsys.readouterr()
    assert main(["edit", "--model", "llama", "--load", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert "different model" in err and "\n" not in err
