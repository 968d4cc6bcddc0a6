"""Nothing lost: one test (or a few) per "Data loss" item of issue 10.

- ``edit --save`` never deletes what is not a saved edit, and replaces a saved edit atomically;
- ``evaluate`` keys rows so records without ids or with duplicate ids all get rows, and resuming
  after kill -9 of a real run never deletes a finished row;
- saved edits are verified (SHA-256, parse errors, shapes and finiteness against the model);
- an interrupted GGUF conversion (kill -9) leaves a temporary folder that the next conversion
  removes, while a live conversion's folder is kept; cache paths that cannot be used: one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from backward_lens.cli import main
from backward_lens.data import FactRecord
from backward_lens.editing import Edit
from backward_lens.editing.base import check_edit_fits
from backward_lens.errors import CacheError, DataError, EditError, OutputPathError
from backward_lens.evaluation.harness import record_keys
from backward_lens.models import LensModel
from tests.tiny_folder import save_tiny_llama, tiny_lens_model

P = "The Eiffel Tower is located in the city of"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def lm(model_dir: Path) -> LensModel:
    return tiny_lens_model(model_dir)


def _edit(lm: LensModel, eta: float = 0.3, target: str = " Rome") -> Edit:
    from backward_lens.editing import RewriteRequest, get_editor

    return get_editor("shift", layer=1, eta=eta)(lm, [RewriteRequest(P, "Eiffel Tower", target)])


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


# -- edit --save ---------------------------------------------------------------------------------


def test_save_refuses_occupied_paths_and_keeps_them(
    lm: LensModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    edit = _edit(lm)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("keep")
    (tmp_path / "f").write_text("keep too")
    for target in ("d", "f", ".", str(tmp_path), "f/x"):
        with pytest.raises(OutputPathError):
            edit.save(target)
    assert (tmp_path / "d" / "notes.txt").read_text() == "keep"
    assert (tmp_path / "f").read_text() == "keep too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]  # no temporaries left


def test_cli_save_into_folder_with_notes_exits_2(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The issue's reproduction: notes.txt survives, one line, exit 2."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("keep\n")
    argv = ["edit", "--model", str(model_dir), "--prompt", P, "--target", " Rome", "--save", "d"]
    code, err = _run(argv, capsys)
    assert code == 2 and err.startswith("backward-lens: error: --save: d is a folder")
    assert (tmp_path / "d" / "notes.txt").read_text() == "keep\n"


def test_save_replaces_a_saved_edit_with_no_moment_without_one(
    lm: LensModel, tmp_path: Path
) -> None:
    """A reader polling the folder while it is replaced 30 times always finds a complete edit.

    It finds the old or the new one, and the final edit is the last one saved.
    """
    path = tmp_path / "edit"
    edits = [_edit(lm, eta=0.1 + 0.01 * i) for i in range(3)]
    edits[0].save(path)
    seen: list[float] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(Edit.load(path).hparams["eta"])
            except BaseException as exc:  # any failure to read counts
                failures.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(30):
            edits[i % 3].save(path)
    finally:
        stop.set()
        thread.join()
    assert not failures, failures[:3]
    assert seen and set(seen) <= {e.hparams["eta"] for e in edits}
    assert Edit.load(path).hparams["eta"] == edits[29 % 3].hparams["eta"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit"]


def test_save_fallback_restores_the_old_edit_when_the_move_fails(
    lm: LensModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without renameat2, the old edit is renamed aside; it comes back if the swap fails.

    If moving the new one in fails, the old edit is restored unchanged.
    """
    import backward_lens.editing.base as base

    path = tmp_path / "edit"
    old = _edit(lm, eta=0.2)
    old.save(path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    monkeypatch.setattr(base, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def failing_replace(src: object, dst: object) -> None:
        if Path(str(dst)) == path and ".new-" in Path(str(src)).name:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(base.os, "replace", failing_replace)
    with pytest.raises(OSError):
        _edit(lm, eta=0.5).save(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit"]
    monkeypatch.setattr(base.os, "replace", real_replace)
    _edit(lm, eta=0.5).save(path)  # the fallback path itself replaces the edit
    assert Edit.load(path).hparams["eta"] == 0.5


# -- saved edits verified ----------------------------------------------------------------------


def _saved(lm: LensModel, folder: Path) -> Path:
    return _edit(lm).save(folder / "e")


def _flip_last_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01
    p.write_bytes(bytes(data))


def _rewrite_deltas(path: Path, deltas: dict[str, torch.Tensor], shapes: bool = True) -> None:
    """Replace the deltas and keep edit.json consistent (checksum, and shapes if asked).

    The result is a damaged edit that only the model-side checks can catch.
    """
    from safetensors.torch import save_file

    from backward_lens.editing.base import _file_sha256

    save_file(deltas, str(path / "deltas.safetensors"))
    meta = json.loads((path / "edit.json").read_text())
    meta["deltas_sha256"] = _file_sha256(path / "deltas.safetensors")
    if shapes:
        meta["parameters"] = {k: list(v.shape) for k, v in deltas.items()}
    (path / "edit.json").write_text(json.dumps(meta))


DAMAGE = {
    "flipped data byte": lambda p: _flip_last_byte(p / "deltas.safetensors"),
    "corrupt header": lambda p: (p / "deltas.safetensors").write_bytes(
        b"\xff" * 8 + (p / "deltas.safetensors").read_bytes()[8:]
    ),
    "truncated deltas": lambda p: (p / "deltas.safetensors").write_bytes(
        (p / "deltas.safetensors").read_bytes()[:100]
    ),
    "empty deltas": lambda p: (p / "deltas.safetensors").write_bytes(b""),
    "edit.json not JSON": lambda p: (p / "edit.json").write_text("{oops"),
    "edit.json not UTF-8": lambda p: (p / "edit.json").write_bytes(b"\xff\xfe{}"),
    "edit.json a list": lambda p: (p / "edit.json").write_text("[1, 2]"),
    "edit.json incomplete": lambda p: (p / "edit.json").write_text('{"format": 2, "method": "x"}'),
    "edit.json unknown format": lambda p: (p / "edit.json").write_text('{"format": 99}'),
    "edit.json missing": lambda p: (p / "edit.json").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_saved_edit_is_refused(lm: LensModel, tmp_path: Path, damage: str) -> None:
    path = _saved(lm, tmp_path)
    Edit.load(path, model=lm.model)  # intact: loads
    DAMAGE[damage](path)
    with pytest.raises(EditError):
        Edit.load(path, model=lm.model)


def test_checksum_is_the_sha256_of_the_deltas_file(lm: LensModel, tmp_path: Path) -> None:
    import hashlib

    path = _saved(lm, tmp_path)
    meta = json.loads((path / "edit.json").read_text())
    digest = hashlib.sha256((path / "deltas.safetensors").read_bytes()).hexdigest()
    assert meta["deltas_sha256"] == digest and meta["format"] == 2


def test_wrong_shape_and_non_finite_deltas_are_refused(lm: LensModel, tmp_path: Path) -> None:
    path = _saved(lm, tmp_path)
    name, delta = next(iter(Edit.load(path).deltas.items()))
    _rewrite_deltas(path, {name: torch.zeros(delta.shape[0], delta.shape[1] + 1)})
    edit = Edit.load(path)  # file-level checks pass: consistent checksum and shapes
    with pytest.raises(EditError, match="shape"):
        check_edit_fits(edit, lm.model)
    with pytest.raises(EditError, match="shape"):
        Edit.load(path, model=lm.model)
    bad = delta.clone()
    bad[0, 0] = float("nan")
    _rewrite_deltas(path, {name: bad})
    with pytest.raises(EditError, match="NaN or infinite"):
        Edit.load(path)
    wider = torch.zeros(delta.shape[0], delta.shape[1] + 1)
    _rewrite_deltas(path, {name: wider}, shapes=False)  # edit.json keeps the model's shape
    with pytest.raises(EditError, match="shape"):
        Edit.load(path)


def test_cli_load_of_a_damaged_edit_is_one_line(
    lm: LensModel, model_dir: Path, tmp_path: Path, capsys
) -> None:
    path = _saved(lm, tmp_path)
    _flip_last_byte(path / "deltas.safetensors")
    code, err = _run(["edit", "--model", str(model_dir), "--load", str(path)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("backward-lens: error:") and "SHA-256" in err


# -- evaluate: record keys and resume ------------------------------------------------------------


def _records_file(folder: Path, n: int, ids: list[object] | None = None) -> Path:
    lines = []
    for i in range(n):
        r: dict[str, object] = {
            "prompt": f"{P} {i}",
            "subject": "Eiffel Tower",
            "target_new": " Rome",
            "target_true": " Paris",
        }
        if ids is not None:
            r["id"] = ids[i]
        lines.append(json.dumps(r))
    path = folder / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _rows(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_record_keys_without_ids_and_with_duplicates() -> None:
    def rec(cid: int | str, prompt: str) -> FactRecord:
        return FactRecord(cid, prompt, "X", " a")

    keys, dups = record_keys([rec(-1, "X one"), rec(-1, "X two"), rec(-1, "X three")])
    assert len(set(keys)) == 3 and all(k.startswith(f"#{i}:") for i, k in enumerate(keys))
    assert dups == []
    keys, dups = record_keys([rec(7, "X a"), rec(7, "X b"), rec(8, "X c")])
    assert keys[2] == "8" and keys[0].startswith("#0:") and keys[1].startswith("#1:")
    assert dups == ["7"]
    # stable: the same records give the same keys; a changed record gets another key
    again, _ = record_keys([rec(7, "X a"), rec(7, "X b"), rec(8, "X c")])
    assert again == keys
    changed, _ = record_keys([rec(7, "X a!"), rec(7, "X b"), rec(8, "X c")])
    assert changed[0] != keys[0] and changed[1:] == keys[1:]


EVAL_ARGS = ["--method", "shift", "--fluency-records", "0", "--ppl-records", "0", "--quiet"]


@pytest.mark.parametrize("ids", [None, [1, 1, 2, 2, 3] * 4], ids=["no ids", "duplicate ids"])
def test_every_record_gets_a_row_and_resume_keeps_them(
    model_dir: Path,
    tmp_path: Path,
    ids: list[object] | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The issue's reproduction: 20 records without ids give 20 rows per method.

    The same holds with duplicate ids, and --resume keeps all of them (it used to leave 2).
    """
    data = _records_file(tmp_path, 20, ids)
    out = tmp_path / "ev"
    base = ["evaluate", "--model", str(model_dir), "--data", str(data), "--out", str(out)]
    assert main([*base, *EVAL_ARGS]) == 0
    if ids is not None:  # duplicate ids are reported (a warning; such records keyed by position)
        assert "3 id(s) occur more than once in the records (1, 2, 3)" in caplog.text
    first = (out / "results.jsonl").read_bytes()
    rows = _rows(out)
    assert len(rows) == 40 and len({(r["label"], r["key"]) for r in rows}) == 40
    assert main([*base, *EVAL_ARGS, "--resume"]) == 0
    assert (out / "results.jsonl").read_bytes() == first  # nothing recomputed, nothing deleted


def test_resume_refuses_a_damaged_middle_line_and_repairs_only_a_torn_tail(
    model_dir: Path, tmp_path: Path, capsys
) -> None:
    data = _records_file(tmp_path, 4)
    out = tmp_path / "ev"
    base = ["evaluate", "--model", str(model_dir), "--data", str(data), "--out", str(out)]
    assert main([*base, *EVAL_ARGS]) == 0
    good = (out / "results.jsonl").read_bytes()
    lines = good.splitlines(keepends=True)
    damaged = b"".join([lines[0], b"{garbage\n", *lines[1:]])
    (out / "results.jsonl").write_bytes(damaged)
    capsys.readouterr()
    assert main([*base, *EVAL_ARGS, "--resume"]) == 2
    assert "line 2 is damaged" in capsys.readouterr().err
    assert (out / "results.jsonl").read_bytes() == damaged  # untouched
    (out / "results.jsonl").write_bytes(good[:-40])  # a write torn by a crash
    assert main([*base, *EVAL_ARGS, "--resume"]) == 0
    after = (out / "results.jsonl").read_bytes()
    kept = good[: good[:-40].rfind(b"\n") + 1]
    assert after.startswith(kept)  # every complete line kept as it was; the torn one recomputed
    keys = [(r["label"], r["key"]) for r in _rows(out)]
    assert keys == [(r["label"], r["key"]) for r in map(json.loads, good.splitlines())]


@pytest.mark.integration  # kills a real run with SIGKILL
def test_kill_9_during_evaluate_then_resume_keeps_every_finished_row(
    model_dir: Path, tmp_path: Path
) -> None:
    """A real run is killed with SIGKILL after it has written a few rows, then resumed.

    The resumed run keeps every byte of those rows and completes the rest, one row per (method,
    record).
    """
    n = 8
    data = _records_file(tmp_path, n)
    out = tmp_path / "ev"
    argv = [
        *("evaluate", "--model", str(model_dir), "--data", str(data), "--out", str(out)),
        *EVAL_ARGS,
        *("--group-size", "1", "--batch-size", "1"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "backward_lens.cli", *argv]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and results.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.005)
        interrupted = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    before = results.read_bytes()
    complete = before[: before.rfind(b"\n") + 1]  # rows finished before the kill
    assert interrupted, "the run finished before it could be killed"
    assert before.count(b"\n") < 2 * n
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    after = results.read_bytes()
    assert after.startswith(complete)
    rows = _rows(out)
    assert sorted((r["label"], r["index"]) for r in rows) == sorted(
        (label, i) for label in ("unedited", "shift") for i in range(n)
    )


# -- GGUF conversion cache ------------------------------------------------------------------------

_HANG = """
import sys, time
from pathlib import Path
import torch, transformers
from backward_lens import gguf_cache

def hang(*args, **kwargs):
    time.sleep(600)

transformers.AutoTokenizer.from_pretrained = hang
gguf, entry = Path(sys.argv[1]), Path(sys.argv[2])
gguf_cache.convert_gguf(gguf, entry, torch.float32)
"""


@pytest.mark.integration  # kills a real run with SIGKILL
def test_kill_9_during_conversion_leaves_a_temporary_the_next_conversion_removes(
    tmp_path: Path,
) -> None:
    """A conversion killed with SIGKILL leaves ``<entry>.tmp-*`` with its owner's pid.

    The next conversion's clean-up removes it, but keeps the temporary of a conversion still
    running.
    """
    from backward_lens.gguf_cache import remove_stale_temporaries

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    entry = tmp_path / "cache" / "models" / "m-key-float32"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HANG, str(gguf), str(entry)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        temps: list[Path] = []
        while time.monotonic() < deadline and not temps:
            if entry.parent.is_dir():
                temps = [p for p in entry.parent.iterdir() if (p / "owner.json").is_file()]
            time.sleep(0.02)
        assert temps, "the conversion never started"
        owner = json.loads((temps[0] / "owner.json").read_text())
        assert owner["pid"] == proc.pid
        # while its owner lives, the temporary is left alone
        assert remove_stale_temporaries(entry.parent) == []
        assert temps[0].is_dir()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert temps[0].is_dir()  # kill -9 leaks it...
    live = entry.parent / f"{entry.name}.tmp-live"
    live.mkdir()
    (live / "owner.json").write_text(json.dumps({"pid": os.getpid(), "host": _host()}))
    unrelated = entry.parent / "notes"
    unrelated.mkdir()
    assert remove_stale_temporaries(entry.parent) == [temps[0]]  # ...until the next conversion
    assert not temps[0].exists() and live.is_dir() and unrelated.is_dir()


def _host() -> str:
    import socket

    return socket.gethostname()


def test_cached_conversion_cleans_up_and_refuses_unusable_cache_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backward_lens import gguf_cache

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "cache"))
    entry = gguf_cache.cache_entry(gguf, torch.float32)
    stale = entry.parent / f"{entry.name}.tmp-dead"
    stale.mkdir(parents=True)
    (stale / "owner.json").write_text(json.dumps({"pid": _dead_pid(), "host": _host()}))
    calls: list[Path] = []
    monkeypatch.setattr(gguf_cache, "convert_gguf", lambda g, e, d: calls.append(e))
    assert gguf_cache.cached_conversion(gguf, torch.float32) == entry
    assert calls == [entry] and not stale.exists()
    # an entry path taken by a file
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text("a file")
    with pytest.raises(CacheError, match="is a file"):
        gguf_cache.cached_conversion(gguf, torch.float32)
    assert entry.read_text() == "a file"
    # a cache root under a file
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "m.gguf" / "cache"))
    with pytest.raises(CacheError, match="it is a file"):
        gguf_cache.cached_conversion(gguf, torch.float32)
    # not GGUF at all
    (tmp_path / "fake.gguf").write_text("hello")
    with pytest.raises(Exception, match="not a GGUF file"):
        gguf_cache.cached_conversion(tmp_path / "fake.gguf", torch.float32)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_damaged_results_file_is_a_data_error(tmp_path: Path) -> None:
    from backward_lens.evaluation.harness import _read_done

    path = tmp_path / "results.jsonl"
    path.write_text('{"label": "a", "key": "1"}\nnot json\n{"label": "a", "key": "2"}\n')
    with pytest.raises(DataError):
        _read_done(path)


def test_explain_outputs_are_written_all_or_nothing(tmp_path: Path) -> None:
    """``explain`` writes its files through ``atomic_write_many``.

    When a later file fails, an earlier one is not overwritten and folders made for the run are
    removed again.
    """
    from backward_lens.io import atomic_write_many

    (tmp_path / "f").write_text("a file")
    (tmp_path / "keep.json").write_text("old")
    files = {
        tmp_path / "keep.json": b"new",
        tmp_path / "new" / "sub" / "a.png": b"png",
        tmp_path / "f" / "x.html": b"html",  # under a file: fails
    }
    with pytest.raises(OSError):
        atomic_write_many(files)
    assert (tmp_path / "keep.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "keep.json"]
    del files[tmp_path / "f" / "x.html"]
    assert atomic_write_many(files) == list(files)
    assert (tmp_path / "keep.json").read_text() == "new"
    assert (tmp_path / "new" / "sub" / "a.png").read_bytes() == b"png"


def test_save_removes_only_stale_leftovers_of_killed_saves(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A save killed mid-write leaves ``.NAME.new-*``; the next save removes it once stale.

    Stale means an hour untouched; a young one (a save in progress) is never removed, nor is
    ``.NAME.old-*``.
    """
    import os
    import time

    import torch

    from backward_lens.editing.base import STALE_WRITE_SECONDS, Edit

    stale = tmp_path / ".e.new-abc"
    young = tmp_path / ".e.new-def"
    aside = tmp_path / ".e.old-ghi"
    for folder in (stale, young, aside):
        folder.mkdir()
        (folder / "deltas.safetensors").write_bytes(b"partial")
    old = time.time() - STALE_WRITE_SECONDS - 60
    os.utime(stale, (old, old))
    os.utime(aside, (old, old))
    Edit(deltas={"w": torch.zeros(2, 2)}, method="test").save(tmp_path / "e")
    assert not stale.exists() and young.exists() and aside.exists()
    assert Edit.load(tmp_path / "e").deltas["w"].shape == (2, 2)
