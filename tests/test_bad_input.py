"""Every subcommand x every kind of bad argument: exit 2, one line, no traceback, nothing touched.

Each case runs ``backward_lens.cli.main(argv)`` in-process, with the current folder a fresh
``tmp_path`` holding the same fixture files (data files good and bad, an occupied folder, a
plain file, a damaged saved edit, an earlier evaluation...). The case passes when the exit code
is 2, stderr is exactly one line starting ``backward-lens: error:`` with no traceback, and every
file and folder under ``tmp_path`` has the same name and content as before. Cases that get as
far as loading a model use a tiny random Llama saved to a folder (``tests/tiny_folder.py``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backward_lens.cli import main
from tests.tiny_folder import save_tiny_llama

P = "The Eiffel Tower is located in the city of"
GOOD = (
    json.dumps(
        {
            "prompt": P,
            "subject": "Eiffel Tower",
            "target_new": " Rome",
            "target_true": " Paris",
            "paraphrase_prompts": ["Where is the Eiffel Tower? It is in"],
            "neighborhood_prompts": ["The Louvre is located in the city of"],
        }
    )
    + "\n"
)
M = "{model}"  # replaced by the tiny model's folder
RO = "{readonly}"  # replaced by a folder nobody may write in (root too: see _readonly)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + tokenizer saved once per session, used as ``--model DIR``."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _readonly(tmp: Path) -> Path:
    """A folder in which no file can be created.

    That is chmod 555 normally; for root, who ignores permissions, a path under /proc (where
    nothing can be created).
    """
    if os.geteuid() == 0:
        return Path("/proc/backward-lens-test")
    folder = tmp / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def _fixtures(tmp: Path) -> None:
    """The files every case starts from (the test asserts none of them changes)."""
    (tmp / "rec.jsonl").write_text(GOOD)
    (tmp / "num.jsonl").write_text(
        json.dumps({"prompt": P, "subject": "Eiffel Tower", "target_new": 5}) + "\n"
    )
    (tmp / "badtypes.jsonl").write_text('{"prompt": 3, "subject": "Eiffel", "target": " Rome"}\n')
    (tmp / "listtarget.jsonl").write_text(
        json.dumps({"prompt": P, "subject": "Eiffel Tower", "target_new": [" Rome"]}) + "\n"
    )
    (tmp / "bin.jsonl").write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    (tmp / "notjson.txt").write_text("this is not JSON\nnor JSON lines\n")
    (tmp / "wrong.jsonl").write_text('{"foo": 1, "bar": 2}\n')
    (tmp / "empty.jsonl").write_text("")
    (tmp / "numbers.json").write_text("[1, 2, 3]")
    (tmp / "rome_missing.json").write_text('[{"requested_rewrite": {"prompt": "{} is"}}]')
    (tmp / "x.gguf").write_text("not a gguf file\n")
    (tmp / "afile").write_text("keep me\n")
    (tmp / "d").mkdir()
    (tmp / "d" / "notes.txt").write_text("keep\n")
    (tmp / "nomodel").mkdir()
    (tmp / "nomodel" / "readme.txt").write_text("no config here\n")
    (tmp / "bad_edit").mkdir()
    (tmp / "bad_edit" / "edit.json").write_text("{not json")
    (tmp / "bad_edit" / "deltas.safetensors").write_bytes(b"\x00" * 16)
    (tmp / "half_edit").mkdir()
    (tmp / "half_edit" / "edit.json").write_text('{"format": 2, "method": "shift"}')
    (tmp / "half_edit" / "deltas.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    (tmp / "ev_done").mkdir()
    (tmp / "ev_done" / "results.jsonl").write_text('{"label": "shift", "key": "1"}\n')
    (tmp / "ev_badrun").mkdir()
    (tmp / "ev_badrun" / "results.jsonl").write_text('{"label": "shift", "key": "1"}\n')
    (tmp / "ev_badrun" / "run.json").write_text("[broken")
    (tmp / "st_badcfg").mkdir()
    (tmp / "st_badcfg" / "config.json").write_text("{broken")


def _snapshot(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "<dir>" if path.is_dir() else path.read_bytes()
    return out


@dataclass(frozen=True)
class Case:
    """argv (with ``{model}``/``{readonly}`` placeholders) and an optional extra setup."""

    argv: tuple[str, ...]
    setup: Callable[[Path], None] | None = field(default=None, compare=False)

    @property
    def id(self) -> str:
        text = " ".join(self.argv).replace(P, "$P").replace(M, "M").replace(" Rome", "Rome")
        return text.replace("--model M ", "").replace("--target Rome ", "")


def c(*argv: str, setup: Callable[[Path], None] | None = None) -> Case:
    return Case(tuple(argv), setup)


EX = ("explain", P, "--target", " Rome", "--model", M)
ED = ("edit", "--model", M, "--prompt", P, "--target", " Rome")
EDS = (*ED, "--subject", "Eiffel Tower")
EV = ("evaluate", "--model", M, "--data", "rec.jsonl", "--out", "ev")
SW = ("sweep", "--model", M, "--data", "rec.jsonl", "--out", "sw")
ST = ("study", "--model", M, "--data", "rec.jsonl", "--out", "st")
SV = ("serve", "--model", M, "--port", "0")

CASES: list[Case] = [
    # -- top level ---------------------------------------------------------------------------
    c(),
    c("nosuch"),
    c("--nosuch-option"),
    # -- explain: numbers, layers, output paths, prompts, models, devices --------------------
    c(*EX, "--top-k", "0"),
    c(*EX, "--top-k", "-3"),
    c(*EX, "--top-k", "abc"),
    c(*EX, "--top-k", "1e99"),
    c(*EX, "--layers", "2-1"),
    c(*EX, "--layers", "7-3"),
    c(*EX, "--layers", "abc"),
    c(*EX, "--layers", "99"),
    c(*EX, "--layers", "-99"),
    c(*EX, "--layers", "0,,x"),
    c(*EX, "--json", "d"),
    c(*EX, "--json", "afile/x.json"),
    c(*EX, "--png", "d"),
    c(*EX, "--html", "afile/x.html"),
    c(*EX, "--json", f"{RO}/x.json"),
    c(*EX, "--png", f"{RO}/sub/x.png"),
    c(*EX, "--json", "same.out", "--png", "same.out"),
    c(*EX, "--json", "ok.json", "--png", "ok.png", "--html", "afile/x.html"),
    c("explain", P, "--target", "", "--model", M),
    c("explain", "", "--target", " Rome", "--model", M),
    c("explain", "   ", "--target", " Rome", "--model", M),
    c("explain", P, "--model", M),
    c("explain", P, "--target", " Rome", "--model", "no/such/folder"),
    c("explain", P, "--target", " Rome", "--model", "x.gguf"),
    c("explain", P, "--target", " Rome", "--model", "missing.gguf"),
    c("explain", P, "--target", " Rome", "--model", "nomodel"),
    c(*EX, "--device", "cuda"),
    c(*EX, "--device", "cuda:7"),
    c(*EX, "--device", "bogus"),
    c(*EX, "--dtype", "int8"),
    c(*EX, "--first-token", "--teacher-forced"),
    c(*EX, "--nosuch"),
    # -- study -------------------------------------------------------------------------------
    c("study", "neurons", *ST[1:], "--max-neurons", "-5"),
    c("study", "neurons", *ST[1:], "--max-neurons", "abc"),
    c("study", "neurons", *ST[1:], "--layer", "99"),
    c("study", "neurons", *ST[1:], "--layer", "-99"),
    c("study", "neurons", *ST[1:], "--layer", "abc"),
    c("study", "imprint-shift", *ST[1:], "--lr", "nan"),
    c("study", "imprint-shift", *ST[1:], "--lr", "inf"),
    c("study", "imprint-shift", *ST[1:], "--lr", "-1"),
    c("study", "imprint-shift", *ST[1:], "--lr", "0"),
    c("study", "imprint-shift", *ST[1:], "--lr", "1e39"),
    c("study", "imprint-shift", *ST[1:], "--lr", "abc"),
    c("study", "rank", *ST[1:], "--n", "0"),
    c("study", "rank", *ST[1:], "--n", "-1"),
    c("study", "rank", *ST[1:], "--batch-size", "0"),
    c("study", "neurons", *ST[1:], "--top", "0"),
    c("study", "rank", "--model", M, "--data", "missing.jsonl", "--out", "st"),
    c("study", "rank", "--model", M, "--data", "bin.jsonl", "--out", "st"),
    c("study", "rank", "--model", M, "--data", "notjson.txt", "--out", "st"),
    c("study", "rank", "--model", M, "--data", "num.jsonl", "--out", "st"),
    c("study", "rank", "--model", M, "--data", "badtypes.jsonl", "--out", "st"),
    c("study", "rank", "--model", M, "--data", "d", "--out", "st"),
    c("study", "rank", "--model", M, "--data", "wrong.jsonl", "--out", "st"),
    c("study", "rank", "--model", M, "--data", "empty.jsonl", "--out", "st"),
    c("study", "rank", "--model", M, "--data", "numbers.json", "--out", "st"),
    c("study", "rank", "--model", M, "--data", "rec.jsonl", "--out", "afile"),
    c("study", "rank", "--model", M, "--data", "rec.jsonl", "--out", "afile/x"),
    c("study", "rank", "--model", M, "--data", "rec.jsonl", "--out", f"{RO}/st"),
    c("study", "rank", "--model", M, "--data", "rec.jsonl", "--out", "st_badcfg"),
    c("study", "rank", "--model", M, "--out", "st"),
    c("study", "rank", *ST[1:], "--device", "cuda"),
    c("study", "rank", *ST[1:], "--model", "x.gguf"),
    c("study", "nope", *ST[1:]),
    c("study", "compare", "--out", "cmp"),
    c("study", "compare", "d"),
    c("study", "compare", "d", "--out", "cmp"),
    c("study", "compare", "d", "--out", "afile"),
    c("study", "rank", "d", *ST[1:]),
    # -- edit --------------------------------------------------------------------------------
    c(*ED, "--eta", "inf"),
    c(*ED, "--eta", "nan"),
    c(*ED, "--eta", "1e39"),
    c(*ED, "--eta", "-1"),
    c(*ED, "--eta", "0"),
    c(*ED, "--eta", "abc"),
    c(*ED, "--hparam", "eta=abc"),
    c(*ED, "--hparam", "eta=NaN"),
    c(*ED, "--hparam", "eta=Infinity"),
    c(*ED, "--hparam", "eta=[1]"),
    c(*ED, "--hparam", "layer=99"),
    c(*ED, "--hparam", "layer=1.5"),
    c(*ED, "--hparam", "layer=true"),
    c(*ED, "--hparam", "noequals"),
    c(*ED, "--hparam", "=3"),
    c(*ED, "--hparam", "bogus=1"),
    c(*ED, "--layer", "99"),
    c(*ED, "--layer", "2-1"),
    c(*ED, "--layer", "abc"),
    c(*ED, "--layer", "0,1"),
    c(*ED, "--method", "nosuch"),
    c(*ED, "--method", "rome"),
    c(*ED, "--method", "memit"),
    c(*EDS, "--method", "rome", "--eta", "0.5"),
    c(*EDS, "--method", "rome", "--hparam", "v_steps=-1"),
    c(*EDS, "--method", "rome", "--hparam", "v_lr=nan"),
    c(*EDS, "--method", "memit", "--layer", "1-0"),
    c(*ED, "--method", "ft", "--hparam", "lr=nan"),
    c(*ED, "--method", "ft", "--hparam", "steps=0"),
    c(*ED, "--method", "shift-adaptive", "--hparam", "eta_max=inf"),
    c(*ED, "--method", "shift-adaptive", "--hparam", "rtol=2"),
    c(*ED, "--method", "shift-adaptive", "--hparam", "on_failure=maybe"),
    c(*ED, "--paraphrase", ""),
    c(*ED, "--neighborhood", "   "),
    c(*ED, "--save", "d"),
    c(*ED, "--save", "."),
    c(*ED, "--save", "afile"),
    c(*ED, "--save", "afile/x"),
    c(*ED, "--save", f"{RO}/e"),
    c(*ED, "--save", ""),
    c("edit", "--model", M, "--load", "missing"),
    c("edit", "--model", M, "--load", "d"),
    c("edit", "--model", M, "--load", "afile"),
    c("edit", "--model", M, "--load", "bad_edit"),
    c("edit", "--model", M, "--load", "half_edit"),
    c("edit", "--model", M, "--prompt", P, "--target", ""),
    c("edit", "--model", M, "--prompt", "", "--target", " Rome"),
    c("edit", "--model", M, "--prompt", P),
    c(*ED, "--subject", "Nope"),
    c(*ED, "--max-new-tokens", "0"),
    c(*ED, "--device", "cuda"),
    c("edit", "--model", "x.gguf", "--prompt", P, "--target", " Rome"),
    c("edit", "--model", "nomodel", "--prompt", P, "--target", " Rome"),
    # -- evaluate ----------------------------------------------------------------------------
    c(*EV, "--method", "shift:eta=NaN"),
    c(*EV, "--method", "shift:eta=inf"),
    c(*EV, "--method", "shift:eta=-1"),
    c(*EV, "--method", "shift:eta=abc"),
    c(*EV, "--method", "shift:eta=1e39"),
    c(*EV, "--method", "shift:layer=99"),
    c(*EV, "--method", "shift:layer=1.5"),
    c(*EV, "--method", "ft:lr=nan"),
    c(*EV, "--method", "rome:v_steps=0"),
    c(*EV, "--method", "nosuch"),
    c(*EV, "--method", ":eta=1"),
    c(*EV, "--method", "shift:eta"),
    c(*EV, "--method", "shift:bogus=1"),
    c(*EV, "--method", "shift", "--records", "0"),
    c(*EV, "--method", "shift", "--records", "-5"),
    c(*EV, "--method", "shift", "--fluency-records", "-1"),
    c(*EV, "--method", "shift", "--ppl-records", "-1"),
    c(*EV, "--method", "shift", "--batch-size", "0"),
    c(*EV, "--method", "shift", "--group-size", "abc"),
    c("evaluate", "--model", M, "--data", "bin.jsonl", "--out", "ev", "--method", "shift"),
    c("evaluate", "--model", M, "--data", "num.jsonl", "--out", "ev", "--method", "shift"),
    c("evaluate", "--model", M, "--data", "listtarget.jsonl", "--out", "ev", "--method", "shift"),
    c("evaluate", "--model", M, "--data", "rome_missing.json", "--out", "ev", "--method", "shift"),
    c("evaluate", "--model", M, "--data", "missing.json", "--out", "ev", "--method", "shift"),
    c("evaluate", "--model", M, "--out", "ev", "--method", "shift"),
    c("evaluate", "--model", M, "--data", "rec.jsonl", "--method", "shift"),
    c("evaluate", "--model", M, "--data", "rec.jsonl", "--out", "afile", "--method", "shift"),
    c("evaluate", "--model", M, "--data", "rec.jsonl", "--out", "afile/x", "--method", "shift"),
    c("evaluate", "--model", M, "--data", "rec.jsonl", "--out", f"{RO}/ev", "--method", "shift"),
    c("evaluate", "--model", M, "--data", "rec.jsonl", "--out", "ev_done", "--method", "shift"),
    c(
        "evaluate",
        *("--model", M, "--data", "rec.jsonl", "--out", "ev_badrun", "--method", "shift"),
        "--resume",
    ),
    c("evaluate", "--summary-only", "--out", "ev"),
    c("evaluate", "--summary-only", "--out", "d"),
    c(*EV, "--method", "shift", "--device", "cuda"),
    c(*EV, "--method", "shift", "--model", "x.gguf"),
    # -- sweep -------------------------------------------------------------------------------
    c(*SW, "--etas=nan,inf"),
    c(*SW, "--etas", ","),
    c(*SW, "--etas", "abc"),
    c(*SW, "--etas", "-1"),
    c(*SW, "--etas", "0"),
    c(*SW, "--etas", "1e39"),
    c(*SW, "--layers", "2-1"),
    c(*SW, "--layers", "99"),
    c(*SW, "--layers", "0-2:0"),
    c(*SW, "--layers", "0-2:x"),
    c(*SW, "--min-efficacy", "2"),
    c(*SW, "--min-efficacy", "nan"),
    c(*SW, "--fluency-records", "-1"),
    c(*SW, "--ppl-texts", "999"),
    c(*SW, "--max-entropy-drop", "2"),
    c(*SW, "--max-perplexity-rise", "nan"),
    c(*SW, "--records", "0"),
    c(*SW, "--batch-size", "-1"),
    c("sweep", "--model", M, "--data", "rec.jsonl", "--out", "afile"),
    c("sweep", "--model", M, "--data", "rec.jsonl", "--out", "afile/x"),
    c("sweep", "--model", M, "--data", "rec.jsonl", "--out", f"{RO}/sw"),
    c("sweep", "--model", M, "--data", "bin.jsonl", "--out", "sw"),
    c("sweep", "--model", M, "--data", "num.jsonl", "--out", "sw"),
    c("sweep", "--model", M, "--data", "missing.jsonl", "--out", "sw"),
    c("sweep", "--model", M, "--out", "sw"),
    c(*SW, "--device", "cuda"),
    c(*SW, "--model", "x.gguf"),
    # -- serve (every case fails before the server starts) ----------------------------------
    c(*SV[:-1], "70000"),
    c(*SV[:-1], "-1"),
    c(*SV[:-1], "abc"),
    c(*SV, "--device", "cuda"),
    c(*SV, "--device", "bogus"),
    c("serve", "--model", "x.gguf", "--port", "0"),
    c("serve", "--model", "nomodel", "--port", "0"),
    c("serve", "--model", "no/such/folder", "--port", "0"),
    c(*SV, "--dtype", "int4"),
]


def test_enough_cases() -> None:
    """The issue asks for at least 100 cases, over every subcommand."""
    assert len(CASES) >= 100
    commands = {case.argv[0] for case in CASES if case.argv}
    assert commands >= {"explain", "study", "edit", "evaluate", "sweep", "serve"}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(
    case: Case,
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BACKWARD_LENS_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))
    _fixtures(tmp_path)
    readonly = _readonly(tmp_path)
    if case.setup is not None:
        case.setup(tmp_path)
    argv = [a.replace(M, str(tiny_model_dir)).replace(RO, str(readonly)) for a in case.argv]
    before = _snapshot(tmp_path)
    try:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse errors
            code = exc.code
        after = _snapshot(tmp_path)
    finally:
        if readonly.is_relative_to(tmp_path):
            readonly.chmod(0o755)  # so that pytest can delete tmp_path
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}; stderr:\n{err}"
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("backward-lens: error:"), err
    assert after == before, "the command changed files in the working folder"
