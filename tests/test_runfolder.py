"""The one run folder (``backward_lens.runfolder``).

Config check, torn-line repair, append, shard files and done keys, shared by the evaluation
harness, the study runner and tracing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backward_lens.distributed.shards import Shard
from backward_lens.errors import DataError, InputError
from backward_lens.evaluation.plan import results_folder
from backward_lens.runfolder import RunFolder, differing_keys
from backward_lens.study.runner import run_folder as study_folder
from backward_lens.tracing.run import run_folder as tracing_folder


def test_append_read_and_repair_only_a_torn_last_line(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run", "raw.jsonl", "config.json")
    assert folder.read_rows() == [] and not folder.holds_rows()
    with folder.writer() as writer:
        writer.write({"key": "a", "value": 1.5})
        writer.write({"key": "b", "value": [1, 2]})
    folder.append({"key": "c"})
    assert folder.rows_path.read_text().count("\n") == 3
    assert folder.done(folder.read_rows()) == {"a", "b", "c"}
    with folder.rows_path.open("a") as fh:  # a crash mid-write
        fh.write('{"key": "d", "val')
    other = RunFolder(tmp_path / "run", "raw.jsonl", "config.json")
    assert [r["key"] for r in other.read_all_rows()] == ["a", "b", "c"]  # read, not cut
    assert folder.rows_path.read_text().endswith('"val')
    assert [r["key"] for r in folder.read_rows()] == ["a", "b", "c"]  # the owner cuts the tail
    assert folder.rows_path.read_text().endswith('{"key":"c"}\n')
    folder.append({"key": "d"})  # the next line starts on a fresh line
    assert [r["key"] for r in folder.read_rows()] == ["a", "b", "c", "d"]
    text = folder.rows_path.read_text().splitlines()
    folder.rows_path.write_text("\n".join([text[0], "not json", *text[1:]]) + "\n")
    with pytest.raises(DataError, match="line 2 is damaged"):
        folder.read_rows()
    folder.rows_path.write_text('{"no key": 1}\n{"key": "x"}\n')  # a line without a key
    with pytest.raises(DataError, match="line 1 is damaged"):
        folder.read_rows()


def test_config_check_names_the_differing_keys(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path, "raw.jsonl", "config.json")
    assert folder.read_config() is None
    folder.write_config({"model": "m", "seed": 0, "n": 5})
    stored = folder.read_config()
    assert stored == {"model": "m", "seed": 0, "n": 5}
    folder.check_config({"model": "m", "seed": 0, "n": 5}, stored)  # the same run
    folder.check_config({"model": "m", "seed": 0, "n": 9}, stored, ignore=("n",))
    assert differing_keys({"model": "x", "seed": 0, "new": 1}, stored) == ["model", "new"]
    with pytest.raises(InputError) as info:
        folder.check_config({"model": "m2", "seed": 1, "n": 5}, stored, advice="use --fresh")
    message = str(info.value)
    assert "holds a different run (different model, seed: model was 'm', now 'm2')" in message
    assert message.endswith("; use --fresh") and "\n" not in message
    folder.config_path.write_text("[1, 2")
    with pytest.raises(DataError, match="is damaged"):
        folder.read_config()


def test_shards_have_their_own_files_and_one_layout(tmp_path: Path) -> None:
    one = RunFolder(tmp_path, "results.jsonl", "run.json", Shard(1, 3))
    assert one.rows_path.name == "results.shard-1-of-3.jsonl"
    one.append({"key": "a"})
    zero = RunFolder(tmp_path, "results.jsonl", "run.json", Shard(0, 3))
    assert zero.others_hold_rows() and not zero.holds_rows()
    zero.check_layout()
    zero.append({"key": "b"})
    zero.append({"key": "a"})  # a key seen twice: the merge keeps its first line
    assert [r["key"] for r in zero.read_all_rows()] == ["b", "a"]
    with pytest.raises(InputError, match="split into 3 shards"):
        RunFolder(tmp_path, "results.jsonl", "run.json", Shard(0, 2)).check_layout()
    with pytest.raises(InputError, match="this run is unsplit"):
        RunFolder(tmp_path, "results.jsonl", "run.json").check_layout()
    zero.discard_rows()
    assert not zero.rows_path.exists() and one.rows_path.exists()


def test_every_run_uses_the_run_folder(tmp_path: Path) -> None:
    """Evaluation, study and tracing folders are RunFolders with their own names and keys."""
    evaluation = results_folder(tmp_path, Shard(0, 2))
    assert (evaluation.rows_path.name, evaluation.config_name) == (
        "results.shard-0-of-2.jsonl",
        "run.json",
    )
    row = {"label": "shift", "key": "7", "index": 0, "status": "ok", "value": float("nan")}
    evaluation.append(row)
    line = json.loads(evaluation.rows_path.read_text().replace("NaN", "null"))
    assert line["schema_version"]  # result lines go through the results schema's serialiser
    assert evaluation.done(evaluation.read_rows()) == {("shift", "7")}
    study = study_folder(tmp_path / "s", Shard(1, 2))
    assert (study.rows_path.name, study.config_name) == ("raw.shard-1-of-2.jsonl", "config.json")
    trace = tracing_folder(tmp_path / "t")
    assert (trace.rows_path.name, trace.config_name) == ("raw.jsonl", "config.json")
