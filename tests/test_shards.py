"""Shards (``--shard K/N``): merged shards equal the unsplit run (evaluate, study, sweep).

The split is deterministic and balanced, and the environment is read with clear errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from backward_lens.cli import main
from backward_lens.data import load_records
from backward_lens.distributed.shards import (
    Shard,
    batch_ranges,
    parse_shard,
    resolve_shard,
    shard_from_env,
)
from backward_lens.errors import InputError
from backward_lens.evaluation import evaluate, read_results, write_summary
from backward_lens.evaluation.harness import read_run
from backward_lens.evaluation.sweep import shift_sweep
from backward_lens.study import run_study
from tests.test_evaluation_harness import FACTS, SETTINGS, easyedit_file
from tests.tiny import make_tiny
from tests.tiny_folder import save_tiny_llama

TIMING = ("time_edit", "edit_batch", "seconds")


def _untimed(rows: list[dict]) -> list[dict]:  # type: ignore[type-arg]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


# ------------------------------------------------------------------------------------------
# the split and where it comes from


def test_parse_and_assignment_is_balanced() -> None:
    assert parse_shard("2/5") == Shard(2, 5)
    assert parse_shard(" 0 / 1 ") == Shard(0, 1)
    owners = [[k for k in range(3) if Shard(k, 3).owns(i)] for i in range(10)]
    assert owners == [[i % 3] for i in range(10)]  # each record in exactly one shard: i mod N
    sizes = [sum(Shard(k, 3).owns(i) for i in range(10)) for k in range(3)]
    assert sizes == [4, 3, 3]
    # batches depend on positions only; a shard owns whole batches, batch b when b mod N == K
    assert batch_ranges(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert batch_ranges(0, 3) == []
    assert Shard(1, 2).batches(7, 3) == [range(3, 6)]
    assert Shard(0, 2).batches(7, 3) == [range(0, 3), range(6, 7)]
    assert Shard().batches(7, 3) == batch_ranges(7, 3)
    assert Shard(1, 4).file_name("results.jsonl") == "results.shard-1-of-4.jsonl"
    assert Shard(0, 1).file_name("results.jsonl") == "results.jsonl"
    for bad, words in [("3/3", "out of range"), ("-1/2", "out of range"), ("1/0", "out of range")]:
        with pytest.raises(InputError, match=words):
            parse_shard(bad)
    with pytest.raises(InputError, match="write K/N"):
        parse_shard("half")


def test_shard_from_the_environment() -> None:
    assert shard_from_env({}) is None
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "4"}) == Shard(1, 4)
    # a Slurm array numbered from 1: K is the task id minus the array's first id
    slurm = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}
    assert shard_from_env(slurm) == Shard(2, 3)
    assert shard_from_env({**slurm, "RANK": "2", "WORLD_SIZE": "3"}) == Shard(2, 3)
    with pytest.raises(InputError, match="Slurm array says"):
        shard_from_env({**slurm, "RANK": "0", "WORLD_SIZE": "3"})
    with pytest.raises(InputError, match="WORLD_SIZE is not"):
        shard_from_env({"RANK": "0"})
    with pytest.raises(InputError, match="not an integer"):
        shard_from_env({"RANK": "a", "WORLD_SIZE": "2"})
    with pytest.raises(InputError, match="out of range"):
        shard_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    # --shard wins over the environment; nothing set is the whole job
    assert resolve_shard("0/2", {"RANK": "1", "WORLD_SIZE": "4"}) == Shard(0, 2)
    assert resolve_shard(None, {}) == Shard()
    assert resolve_shard(None, {"RANK": "0", "WORLD_SIZE": "1"}) == Shard()


# ------------------------------------------------------------------------------------------
# evaluate


@pytest.fixture(scope="module")
def tiny(tokenizer):  # type: ignore[no-untyped-def]
    return make_tiny("llama", tokenizer, seed=3)


MORE = FACTS + [(s + " II", t, n, o) for s, t, n, o in FACTS[:3]]  # 9 records


def test_merged_shards_equal_the_unsplit_run(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Batched (8 sequences a pass, groups of 2 records): merged shards are bit-equal."""
    records = load_records(easyedit_file(tmp_path / "cf.json", MORE))
    methods = ["unedited", "test-random", "shift:layer=1,eta=0.5"]  # shift: edits in one pass
    evaluate(tiny, records, methods, tmp_path / "one", settings=SETTINGS, progress=False)
    groups = {0: [0, 1, 6, 7], 1: [2, 3, 8], 2: [4, 5]}  # groups of 2: g = 0..4, g mod 3 == k
    for k in (2, 0, 1):  # any order
        res = evaluate(
            tiny,
            records,
            methods,
            tmp_path / "split",
            settings=SETTINGS,
            progress=False,
            shard=Shard(k, 3),
        )
        assert res.results_path.name == f"results.shard-{k}-of-3.jsonl"
        mine = read_results(res.results_path)
        assert sorted({r["index"] for r in mine}) == groups[k]
    assert not (tmp_path / "split" / "results.jsonl").exists()
    one, split = read_run(tmp_path / "one"), read_run(tmp_path / "split")
    assert len(split) == 3 * 9
    # the same lines, each method's in the same (record) order, which is the order the summary
    # sums in; every metric bit-equal (the records sharing a batched pass are the same)
    a, b = _untimed(one), _untimed(split)
    a.sort(key=lambda r: methods.index(r["label"]))  # stable: keeps each method's order
    b.sort(key=lambda r: methods.index(r["label"]))
    assert a == b
    # the summaries agree exactly (timing column aside)
    _, _, df_one = write_summary(tmp_path / "one")
    _, _, df_split = write_summary(tmp_path / "split")
    keep = [c for c in df_one.columns if "Time per edit" not in c]
    pd.testing.assert_frame_equal(df_one[keep], df_split[keep], check_exact=True)
    assert json.loads((tmp_path / "split" / "run.json").read_text())["shards"] == 3


def test_resumed_shard_is_bit_equal(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A shard stopped in the middle of a group, resumed: its group is recomputed whole.

    So the lines are those of the uninterrupted run, and none is written twice.
    """
    records = load_records(easyedit_file(tmp_path / "cf.json", MORE))
    methods = ["unedited", "test-random"]
    kw = {"settings": SETTINGS, "progress": False, "shard": Shard(0, 2)}
    evaluate(tiny, records, methods, tmp_path / "full", **kw)

    class Stop(Exception):
        pass

    def stop(row: dict) -> None:  # type: ignore[type-arg]
        if row["index"] == 4 and row["label"] == "test-random":  # group 2, records 4 and 5
            raise Stop

    with pytest.raises(Stop):
        evaluate(tiny, records, methods, tmp_path / "part", on_result=stop, **kw)
    partial = read_results(tmp_path / "part" / "results.shard-0-of-2.jsonl")
    assert ("test-random", 4) in {(r["label"], r["index"]) for r in partial}
    assert ("test-random", 5) not in {(r["label"], r["index"]) for r in partial}
    result = evaluate(tiny, records, methods, tmp_path / "part", resume=True, **kw)
    assert result.reused == len(partial) and result.written == 2 * 5 - len(partial)
    key = lambda r: (r["label"], r["key"])  # noqa: E731
    full = sorted(_untimed(read_run(tmp_path / "full")), key=key)
    resumed = sorted(_untimed(read_run(tmp_path / "part")), key=key)
    assert full == resumed and len(full) == 2 * 5


def test_unbatched_shards_are_exactly_equal(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With one prompt per pass nothing depends on which records share a batch: bit-equal."""
    from dataclasses import replace

    records = load_records(easyedit_file(tmp_path / "cf.json", MORE))
    methods = ["unedited", "test-random"]
    settings = replace(SETTINGS, batch_size=1, group_size=1)
    evaluate(tiny, records, methods, tmp_path / "one", settings=settings, progress=False)
    for k in range(2):
        evaluate(
            tiny,
            records,
            methods,
            tmp_path / "two",
            settings=settings,
            progress=False,
            shard=Shard(k, 2),
        )
    one = {(r["label"], r["key"]): r for r in _untimed(read_run(tmp_path / "one"))}
    two = {(r["label"], r["key"]): r for r in _untimed(read_run(tmp_path / "two"))}
    assert one == two and len(one) == 2 * 9
    _, _, df_one = write_summary(tmp_path / "one")
    _, _, df_two = write_summary(tmp_path / "two")
    keep = [c for c in df_one.columns if "Time per edit" not in c]
    pd.testing.assert_frame_equal(df_one[keep], df_two[keep], check_exact=True)


def test_merge_tolerates_only_a_torn_last_line_per_file(tmp_path: Path) -> None:
    row = {"label": "m", "key": "0", "index": 0, "status": "ok"}
    (tmp_path / "results.shard-0-of-2.jsonl").write_text(json.dumps(row) + '\n{"label": "m", "k')
    row1 = dict(row, key="1", index=1)
    shard1 = tmp_path / "results.shard-1-of-2.jsonl"
    shard1.write_text(json.dumps(row1) + "\n")
    assert read_run(tmp_path) == [row, row1]
    # reading never cuts another process's file
    assert (tmp_path / "results.shard-0-of-2.jsonl").read_text().endswith('"k')
    shard1.write_text("garbage\n" + json.dumps(row1) + "\n")
    with pytest.raises(Exception, match="line 1 is damaged"):
        read_run(tmp_path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_cli_shards_from_env_and_layout_check(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    data = easyedit_file(tmp_path / "cf.json")
    out = tmp_path / "run"
    base = ["evaluate", "--model", str(model_dir), "--data", str(data), "--out", str(out)]
    base += ["--method", "shift", "--fluency-records", "0", "--ppl-records", "0"]
    base += ["--group-size", "1", "--quiet"]  # shards own whole groups: here, single records
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(base) == 0
    lines = read_results(out / "results.shard-1-of-2.jsonl")
    assert {r["index"] for r in lines} == {1, 3, 5}
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert main([*base, "--shard", "0/2"]) == 0
    assert len(read_results(out)) == 2 * 6  # unedited + shift, every record once
    capsys.readouterr()
    # another split of the same folder is refused in one line, before anything is written
    assert main([*base, "--shard", "0/3"]) == 2
    err = capsys.readouterr().err
    assert "split into 2 shards" in err and "same N" in err and err.count("\n") == 1
    assert not (out / "results.shard-0-of-3.jsonl").exists()
    assert main(base) == 2  # unsplit on a split folder
    assert "this run is unsplit" in capsys.readouterr().err
    # a shard with other measuring settings is refused too, even without --resume
    other = [*base[:-1], "--shard", "1/2", "--overwrite", "--seed", "7"]
    assert main(other) == 2
    assert "different settings" in capsys.readouterr().err
    assert main([*base, "--shard", "2/2"]) == 2
    assert "out of range" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(base) == 2
    assert "Slurm array says" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# study and sweep


STUDY = [
    {"prompt": f"{s} {t.split('{}')[-1].strip()}", "subject": s, "target": n} for s, t, n, _ in MORE
]


def test_study_shards_equal_the_unsplit_run(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(dict(r, id=i)) + "\n" for i, r in enumerate(STUDY)))
    # batches of 2 records captured together: shards own whole batches (b mod 3 == k), so the
    # aggregate is bit-equal to the unsplit run's
    kw = {"model": tiny, "n": 9, "batch_size": 2, "progress": False}
    one = run_study("norms", data, out=tmp_path / "one", **kw)
    for k in range(3):
        part = run_study("norms", data, out=tmp_path / "split", shard=Shard(k, 3), **kw)
    assert part.n_ok == one.n_ok  # the last shard's summary covers every shard
    for name in ("aggregate.json", "aggregate.csv"):
        assert (tmp_path / "split" / name).read_text() == (tmp_path / "one" / name).read_text()
    files = sorted(p.name for p in (tmp_path / "split").glob("raw*.jsonl"))
    assert files == [f"raw.shard-{k}-of-3.jsonl" for k in range(3)]
    with pytest.raises(InputError, match="split into 3 shards"):
        run_study("norms", data, out=tmp_path / "split", shard=Shard(0, 2), **kw)
    # resumed with half a batch done (a run stopped mid-batch): the batch is captured whole
    # again and only its missing line is appended, bit-equal to the uninterrupted run
    raw = tmp_path / "one" / "raw.jsonl"
    lines = raw.read_text().splitlines(keepends=True)
    raw.write_text("".join(lines[:3]))  # batch 0 whole, batch 1 half
    (tmp_path / "one" / "aggregate.json").unlink()
    again = run_study("norms", data, out=tmp_path / "one", **kw)
    assert again.n_ok == one.n_ok
    assert (tmp_path / "split" / "aggregate.json").read_text() == (
        tmp_path / "one" / "aggregate.json"
    ).read_text()
    resumed = [json.loads(x) for x in raw.read_text().splitlines()]
    assert sorted(r["key"] for r in resumed) == sorted(str(i) for i in range(9))  # none twice
    drop = {"seconds"}
    by_key = {
        r["key"]: {k: v for k, v in r.items() if k not in drop}
        for path in (tmp_path / "split").glob("raw*.jsonl")
        for r in map(json.loads, path.read_text().splitlines())
    }
    assert {r["key"]: {k: v for k, v in r.items() if k not in drop} for r in resumed} == by_key


def test_sweep_shards_equal_the_unsplit_sweep(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    records = load_records(easyedit_file(tmp_path / "cf.json", MORE))
    etas = [0.5, 2.0, 20.0]
    full = shift_sweep(tiny, records, [0, 1], etas, batch_size=8, progress=False)
    parts = [
        shift_sweep(tiny, records, [0, 1], etas, batch_size=8, progress=False, shard=Shard(k, 3))
        for k in range(3)
    ]
    assert [list(p.index) for p in parts] == [[0, 3, 6], [1, 4], [2, 5]]
    pd.testing.assert_frame_equal(pd.concat(parts).sort_index(), full, check_exact=True)


def test_sweep_cli_merges_parts(model_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = easyedit_file(tmp_path / "cf.json", MORE)
    args = ["sweep", "--model", str(model_dir), "--data", str(data), "--layers", "1,2"]
    args += ["--etas", "0.5,4", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--out", str(tmp_path / "two"), "--shard", "1/2"]) == 0
    assert "1 of 2 parts" in capsys.readouterr().out
    assert not (tmp_path / "two" / "sweep.csv").exists()
    assert main(["sweep", "--summary-only", "--out", str(tmp_path / "two")]) == 2
    assert "run the missing shard(s) 0/2" in capsys.readouterr().err
    bad = [a if a != "0.5,4" else "0.5,5" for a in args]
    assert main([*bad, "--out", str(tmp_path / "two"), "--shard", "0/2"]) == 2
    assert "different etas" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "two"), "--shard", "0/2"]) == 0
    assert (tmp_path / "two" / "sweep.csv").read_text() == (
        tmp_path / "one" / "sweep.csv"
    ).read_text()
    assert main(["sweep", "--summary-only", "--out", str(tmp_path / "two")]) == 0


# ------------------------------------------------------------------------------------------
# the GGUF conversion cache writes sharded safetensors


@pytest.mark.slow
def test_gguf_cache_writes_sharded_safetensors(tmp_path: Path, smollm2) -> None:  # type: ignore[no-untyped-def]
    import torch

    from backward_lens import gguf_cache, models

    gguf = models.BUILTIN_MODELS["smollm2-135m"].gguf_path()
    entry = tmp_path / "entry"
    gguf_cache.convert_gguf(gguf, entry, torch.float32, max_shard_size="200MB")  # ~540 MB model
    shards = sorted(entry.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (entry / "model.safetensors").exists()
    index = json.loads((entry / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(p.stat().st_size <= 200e6 for p in shards)
    manifest = json.loads((entry / "manifest.json").read_text())["files"]
    assert {p.name for p in shards} | {"model.safetensors.index.json"} <= set(manifest)
    assert gguf_cache.cache_entry_is_valid(entry)
    lm = models.load_model(str(entry))
    ref = dict(smollm2.model.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in lm.model.named_parameters())
    del lm
    with shards[1].open("r+b") as f:  # one flipped byte in one shard: the entry is invalid
        f.seek(shards[1].stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not gguf_cache.cache_entry_is_valid(entry)


# ------------------------------------------------------------------------------------------
# big models: capture less, project a memory budget at a time


def test_explain_matrices_and_lens_budget(tiny) -> None:  # type: ignore[no-untyped-def]
    import torch

    from backward_lens.explain import explain
    from backward_lens.lens import LOGIT_CHUNK_BYTES

    full = explain(tiny, "The mother tongue of Danielle Darrieux is", " French", layers=[0, 2])
    less = explain(
        tiny,
        "The mother tongue of Danielle Darrieux is",
        " French",
        layers=[0, 2],
        matrices=["ff1", "ff2"],
    )
    assert [lr.gate is not None for lr in full.layers] == [True, True]  # llama: gated MLP
    assert [lr.gate for lr in less.layers] == [None, None]
    for a, b in zip(full.layers, less.layers, strict=True):
        assert a.ff1 == b.ff1 and a.ff2 == b.ff2  # the same readings, without the gate
    with pytest.raises(InputError, match="explain reads ff1 and ff2"):
        explain(tiny, "The Louvre is in", " Paris", matrices=["ff2"])
    # the lens: any budget gives the same projection; the default budget is 32 MiB of logits
    vectors = torch.randn(
        50, tiny.model.config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    ref = tiny.lens.project(vectors, k=4, target=7)
    one_row = tiny.lens.project(vectors, k=4, target=7, max_chunk_bytes=1)  # one row a chunk
    assert torch.equal(ref.top_ids, one_row.top_ids) and torch.equal(
        ref.bottom_ids, one_row.bottom_ids
    )
    assert torch.equal(ref.target_rank, one_row.target_rank)
    torch.testing.assert_close(ref.top_probs, one_row.top_probs, rtol=1e-5, atol=1e-7)
    assert LOGIT_CHUNK_BYTES == 32 << 20
