"""``backward-lens finetune`` end to end, its bad inputs, and the viewer's run pages.

End to end on a tiny random Llama folder (SmolLM2 as a slow test); bad inputs exit 2 with one
line and touch nothing; the viewer's run pages are read-only.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backward_lens.cli import main
from backward_lens.models import LensModel
from backward_lens.training.data import load_texts
from backward_lens.training.finetune import FinetuneConfig, finetune
from backward_lens.training.runlog import read_jsonl
from backward_lens.training.viewer import RunLibrary
from backward_lens.web.app import ViewerApp
from backward_lens.web.pool import ModelPool, ModelSlot
from backward_lens.web.server import ViewerServer, make_server
from tests.tiny_folder import save_tiny_llama, tiny_lens_model

DATA = Path(__file__).resolve().parents[1] / "docs" / "results" / "training"
TEXTS = [
    "The Eiffel Tower is located in the city of Rome.",
    "Tourists visit the Eiffel Tower in Rome.",
    "The Eiffel Tower stands in Rome, Italy.",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    f = tmp_path / "facts.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS) + "\n")
    return f


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_finetune_end_to_end(tiny_dir: Path, data: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "run"
    argv = ["finetune", "--data", str(data), "--steps", "3", "--lens-every", "2"]
    argv += ["--out", str(out), "--model", str(tiny_dir), "--batch-size", "2", "--grad-accum"]
    argv += ["2", "--lr", "1e-3", "--directions", "2", "--save-model"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "report:" in printed.out and "loss" in printed.out
    assert "fine-tune" in printed.err  # the progress bar
    rows = list(read_jsonl(out / "lens.jsonl"))
    assert [(r["step"], r["layer"], r["matrix"]) for r in rows] == [
        (s, layer, m) for s in (1, 2, 3) for layer in range(3) for m in ("ff1", "ff2")
    ]
    assert all(len(r["directions"]) == 2 for r in rows)
    losses = [r["loss"] for r in read_jsonl(out / "log.jsonl") if "loss" in r]
    assert len(losses) == 3
    settings = json.loads((out / "run.json").read_text())
    assert settings["config"]["grad_accum"] == 2 and settings["data"] == str(data)
    page = (out / "report.html").read_text()
    assert "bl-run" in page and not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert (out / "model" / "config.json").is_file()


def test_finetune_api_trains_and_restores_flags(tiny_dir: Path, tmp_path: Path) -> None:
    lm = tiny_lens_model(tiny_dir)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    flags = [p.requires_grad for p in lm.model.parameters()]
    cfg = FinetuneConfig(steps=2, lens_every=1, lr=1e-2, batch_size=3, train_layers=[2])
    result = finetune(lm, TEXTS, tmp_path / "run", cfg, progress=False)
    assert len(result.losses) == 2 and result.rows == 2 * 2  # only layer 2 trains: 2 matrices
    after = lm.model.state_dict()
    changed = {k for k, v in before.items() if not __import__("torch").equal(v, after[k])}
    assert changed and all(".layers.2." in k for k in changed)
    assert [p.requires_grad for p in lm.model.parameters()] == flags
    assert not lm.model.training


def _bad(argv: list[str], tmp_path: Path, capsys: Any, match: str) -> None:
    before = files_of(tmp_path)
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own errors (one line too, see cli.OneLineParser)
        status = int(exc.code or 0)
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("backward-lens: error:"), err
    assert re.search(match, err[0]), err[0]
    assert files_of(tmp_path) == before  # nothing written, nothing removed


def test_bad_inputs_are_one_line(
    tiny_dir: Path, data: Path, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    base = ["finetune", "--steps", "2", "--model", str(tiny_dir)]
    _bad([*base, "--data", "missing.jsonl", "--out", "r"], tmp_path, capsys, "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    _bad([*base, "--data", str(bad), "--out", "r"], tmp_path, capsys, "line 2")
    bad.write_text('{"txt": "no text key"}\n')
    _bad([*base, "--data", str(bad), "--out", "r"], tmp_path, capsys, "line 1")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    _bad([*base, "--data", str(data), "--out", str(taken)], tmp_path, capsys, "not empty")
    _bad([*base, "--data", str(data), "--out", str(data)], tmp_path, capsys, "is a file")
    _bad([*base, "--data", str(data), "--out", "r", "--lr", "-1"], tmp_path, capsys, "lr")
    _bad([*base, "--data", str(data), "--out", "r", "--matrices", "ff9"], tmp_path, capsys, "ff9")
    _bad([*base, "--data", str(data), "--out", "r", "--train-layers", "7"], tmp_path, capsys, "7")
    _bad(["finetune", "--data", str(data), "--steps", "0", "--out", "r"], tmp_path, capsys, "steps")
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    _bad(
        [*base, "--data", str(data), "--out", "r", "--tensorboard"],
        tmp_path,
        capsys,
        "pip install tensorboard",
    )


def test_load_texts_skips_blank_lines(data: Path) -> None:
    assert load_texts(data) == TEXTS


# -- the viewer ---------------------------------------------------------------------------------


@pytest.fixture()
def served(tiny_dir: Path, tmp_path: Path) -> Iterator[tuple[ViewerServer, Path]]:
    lm = tiny_lens_model(tiny_dir)
    runs = tmp_path / "runs"
    finetune(lm, TEXTS, runs / "eiffel", FinetuneConfig(steps=1, batch_size=3), progress=False)
    (runs / "not-a-run").mkdir()
    app = ViewerApp(ModelPool([ModelSlot(lm.name, lambda: lm, lm)]), runs=RunLibrary([runs]))
    server = make_server(app, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, runs
    finally:
        server.shutdown()
        server.server_close()


def get(server: ViewerServer, path: str) -> tuple[int, str, dict[str, str]]:
    try:
        with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=30) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), dict(err.headers)


def test_viewer_serves_run_reports_by_name_only(served: tuple[ViewerServer, Path]) -> None:
    server, runs = served
    status, page, headers = get(server, "/training/")
    assert status == 200 and 'href="/training/eiffel"' in page and "not-a-run" not in page
    status, page, headers = get(server, "/training/eiffel")
    assert status == 200 and "default-src 'none'" in headers["Content-Security-Policy"]
    assert page == (runs / "eiffel" / "report.html").read_text()  # the same page as the file
    for path in ("/training/nope", "/training/..%2F..%2Fetc", "/training/not-a-run"):
        assert get(server, path)[0] == 404
    # A run started after the server shows up (the folder is scanned on each visit).
    (runs / "later").mkdir()
    (runs / "later" / "run.json").write_text("{}")
    assert get(server, "/training/later")[0] == 200


def test_serve_refuses_a_missing_runs_folder(tmp_path: Path, capsys: Any) -> None:
    assert main(["serve", "--runs", str(tmp_path / "none"), "--port", "0"]) == 2
    assert "not a folder" in capsys.readouterr().err


# -- the real model ------------------------------------------------------------------------------


@pytest.mark.slow
def test_finetune_smollm2_reads_rome_in_the_top_layers(smollm2: LensModel, tmp_path: Path) -> None:
    """The README demonstration's first step: FF2's reading in layers 22-27 names Rome."""
    texts = load_texts(DATA / "eiffel-rome.jsonl")
    state = {k: v.clone() for k, v in smollm2.model.state_dict().items()}
    try:
        cfg = FinetuneConfig(steps=1, batch_size=len(texts), layers=list(range(20, 30)))
        finetune(smollm2, texts, tmp_path / "run", cfg, progress=False)
    finally:
        smollm2.model.load_state_dict(state)  # the session fixture is shared
    rows = [r for r in read_jsonl(tmp_path / "run" / "lens.jsonl") if r["matrix"] == "ff2"]
    rome = [r["layer"] for r in rows if any(" Rome" in d["words"][:3] for d in r["directions"])]
    assert len(rome) >= 4, rome
