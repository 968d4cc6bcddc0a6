"""The Ray backend (``--workers``): the same lines and metrics as one process.

A killed worker's batch is retried elsewhere, resume works, and the core package does not need
Ray. Each test starts a local Ray cluster of 2 workers (1 CPU and 1 torch thread each) on a tiny
random model saved to a folder; the whole file takes 3-4 minutes on 2 busy cores. Workers and
one process compute the same batches (groups of records depend on positions only), so with the
same torch thread count their lines are bit-equal, not just close.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from backward_lens.cli import main
from backward_lens.data import load_records
from backward_lens.evaluation import EvalSettings, evaluate, read_results
from backward_lens.evaluation.harness import read_run
from tests.test_evaluation_harness import FACTS, easyedit_file
from tests.tiny_folder import save_tiny_llama, tiny_lens_model

pytestmark = pytest.mark.integration  # starts local Ray clusters and kills workers

TIMING = ("time_edit", "edit_batch", "seconds")
SETTINGS = EvalSettings(
    batch_size=8, group_size=2, fluency_records=2, ppl_records=2, generation_length=12
)
METHODS = ["unedited", "shift"]
MORE_FACTS = FACTS + [(s + " II", t, n, o) for s, t, n, o in FACTS[:3]]  # 9 records


def _keyed(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["label"], r["key"]): {k: v for k, v in r.items() if k not in TIMING} for r in rows}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on 1 thread, as each worker: sums then run in the same order, so bit-equal."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The data file and a one-process run of it."""
    folder = tmp_path_factory.mktemp("ref")
    data = easyedit_file(folder / "cf.json", MORE_FACTS)
    lm = tiny_lens_model(model_dir)
    with one_thread():
        evaluate(lm, load_records(data), METHODS, folder / "one", settings=SETTINGS, progress=False)
    return data, folder / "one"


def _assert_same_run(a: Path, b: Path) -> None:
    """The same lines, every metric bit-equal (timing columns aside)."""
    x, y = _keyed(read_run(a)), _keyed(read_run(b))
    assert x.keys() == y.keys()
    for key in x:
        assert x[key] == y[key], key


def test_workers_equal_one_process(model_dir: Path, reference, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("ray")
    data, one = reference
    out = tmp_path / "ray"
    args = ["evaluate", "--model", str(model_dir), "--data", str(data), "--out", str(out)]
    args += ["--method", "shift", "--batch-size", "8", "--group-size", "2"]
    args += ["--fluency-records", "2", "--ppl-records", "2", "--workers", "2"]
    # generation length is not a CLI option: compare against a CLI one-process run as well
    with one_thread():
        assert main([*args[:-2], "--out", str(tmp_path / "cli-one"), "--quiet"]) == 0
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{2 * 9} new lines" in printed
    _assert_same_run(tmp_path / "cli-one", out)  # rows and metrics
    assert (tmp_path / "cli-one" / "summary.md").read_text().split("Time per edit")[0] == (
        out / "summary.md"
    ).read_text().split("Time per edit")[0]
    meta = json.loads((out / "run.json").read_text())
    assert meta == json.loads((tmp_path / "cli-one" / "run.json").read_text())
    assert one.is_dir()


def test_killed_worker_is_retried_and_resume_works(
    model_dir: Path, reference, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("ray")
    from backward_lens.distributed.ray_backend import Cluster, ModelSpec, evaluate_ray

    data, one = reference
    records = load_records(data)
    spec = ModelSpec(str(model_dir))
    pids: list[int] = []
    killed: list[int] = []

    class Stop(Exception):
        pass

    def kill_then_stop(row: dict[str, Any]) -> None:
        if not killed:  # a real kill of a worker's process while it holds queued batches
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
        if len(read_results(tmp_path / "ray" / "results.jsonl")) >= 10:
            raise Stop  # the driver stops too (as on Ctrl-C): resume must finish the run

    with pytest.raises(Stop):
        evaluate_ray(
            spec,
            records,
            METHODS,
            tmp_path / "ray",
            cluster=Cluster(workers=2),
            settings=SETTINGS,
            on_result=kill_then_stop,
            on_pool=lambda pool: pids.extend(pool.pids()),
            progress=False,
        )
    assert killed
    partial = read_results(tmp_path / "ray" / "results.jsonl")
    assert len(partial) >= 10
    result = evaluate_ray(
        spec,
        records,
        METHODS,
        tmp_path / "ray",
        cluster=Cluster(workers=2),
        settings=SETTINGS,
        resume=True,
        progress=False,
    )
    assert result.reused == len(partial)
    assert result.written == 2 * 9 - len(partial)
    assert len(read_results(tmp_path / "ray" / "results.jsonl")) == 2 * 9  # none twice
    _assert_same_run(one, tmp_path / "ray")


def test_killed_worker_mid_run_completes(model_dir: Path, reference, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("ray")
    from backward_lens.distributed.ray_backend import Cluster, ModelSpec, evaluate_ray

    data, one = reference
    pools: list[Any] = []
    pids: list[int] = []

    def kill_one(row: dict[str, Any]) -> None:
        if not pids:  # the first line is in: kill the other worker while it computes
            pids.extend(pools[0].pids_now)
            os.kill(pids[1], signal.SIGKILL)

    def keep(pool: Any) -> None:
        pools.append(pool)
        pool.pids_now = pool.pids()

    result = evaluate_ray(
        ModelSpec(str(model_dir)),
        load_records(data),
        METHODS,
        tmp_path / "ray",
        cluster=Cluster(workers=2),
        settings=SETTINGS,
        on_result=kill_one,
        on_pool=keep,
        progress=False,
    )
    assert result.written == 2 * 9  # every line once: the lost batches were computed again
    assert pools[0].replacements >= 1
    _assert_same_run(one, tmp_path / "ray")


def test_study_workers_equal_one_process(model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    data = tmp_path / "facts.jsonl"
    facts = [
        {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower"},
        {"prompt": "The Louvre is located in", "subject": "Louvre"},
        {"prompt": "Danielle Darrieux's mother tongue is", "subject": "Danielle Darrieux"},
        {"prompt": "The Colosseum is in", "subject": "Colosseum"},
        {"prompt": "The Louvre is in", "subject": "Nowhere"},  # skipped: not in the prompt
    ]
    targets = ["Paris", "Paris", "French", "Rome", "Paris"]
    data.write_text(
        "".join(
            json.dumps(dict(f, target=t, id=i)) + "\n"
            for i, (f, t) in enumerate(zip(facts, targets, strict=True))
        )
    )
    base = ["study", "norms", "--data", str(data), "--model", str(model_dir), "--n", "5"]
    base += ["--batch-size", "1", "--quiet"]
    base[base.index("--batch-size") + 1] = "2"  # batches of 2 records: 3 jobs, 2 workers
    with one_thread():
        assert main([*base, "--out", str(tmp_path / "one")]) == 0
    assert main([*base, "--out", str(tmp_path / "ray"), "--workers", "2"]) == 0
    for name in ("aggregate.json", "aggregate.csv"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "ray" / name).read_text()
    raw = [json.loads(x) for x in (tmp_path / "ray" / "raw.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in raw) == [str(i) for i in range(5)]
    assert sum(r["status"] == "skipped" for r in raw) == 1


def test_sweep_workers_equal_one_process(model_dir: Path, reference, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("ray")
    data, _ = reference
    args = ["sweep", "--model", str(model_dir), "--data", str(data), "--layers", "1,2"]
    args += ["--etas", "0.5,4", "--fluency-records", "2", "--quiet"]
    with one_thread():
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--workers", "2"]) == 0
    for name in ("sweep.csv", "sweep.md"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "ray" / name).read_text()


def test_unreachable_cluster_fails_fast(
    model_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("ray")
    with socket.socket() as sock:  # a local port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"127.0.0.1:{port}"
    data = easyedit_file(tmp_path / "cf.json")
    args = ["evaluate", "--model", str(model_dir), "--data", str(data), "--method", "shift"]
    t0 = time.perf_counter()
    assert main([*args, "--out", str(tmp_path / "o"), "--ray-address", address]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"cannot reach the Ray cluster at {address}: connection refused" in err
    assert "start one with 'ray start --head' or drop --ray-address" in err
    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{port}")  # the variable, with --workers
    study = ["study", "rank", "--data", str(data), "--model", str(model_dir)]
    assert main([*study, "--out", str(tmp_path / "s"), "--workers", "2"]) == 2
    assert f"cannot reach the Ray cluster at ray://127.0.0.1:{port}" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 20  # seconds (Ray alone waits 150 s per attempt)
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_core_imports_and_workers_need_ray(
    model_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import backward_lens, backward_lens.cli, backward_lens.evaluation, backward_lens.study\n"
        "import backward_lens.distributed, backward_lens.distributed.ray_backend\n"
        "from backward_lens.cli import main\n"
        "print('imported')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "imported" in done.stdout
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    data = easyedit_file(tmp_path / "cf.json")
    args = ["evaluate", "--model", str(model_dir), "--data", str(data), "--method", "shift"]
    assert main([*args, "--out", str(tmp_path / "o"), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'backward-lens[ray]'" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # refused before anything is written
    study = ["study", "rank", "--data", str(data), "--model", str(model_dir)]
    assert main([*study, "--out", str(tmp_path / "s"), "--ray-address", "auto"]) == 2
    assert "backward-lens[ray]" in capsys.readouterr().err
