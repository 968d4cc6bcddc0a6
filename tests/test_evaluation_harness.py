"""The evaluation harness: both data layouts, resume, bad records, unknown methods, summary."""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from backward_lens.cli import main
from backward_lens.data import load_records
from backward_lens.editing import EDITORS, Edit, RewriteRequest
from backward_lens.errors import InputError
from backward_lens.evaluation import EvalSettings, evaluate, read_results, write_summary
from backward_lens.evaluation.metrics import RecordPrompts
from backward_lens.evaluation.scoring import score_targets
from backward_lens.models import LensModel
from tests.tiny import make_tiny

FACTS = [
    ("Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
    ("Edwin of Northumbria", "The official religion of {} is", "Islam", "Christianity"),
    ("Toko Yasuda", "{} plays the instrument", "piano", "guitar"),
    ("Autonomous University of Madrid", "{} is located in the country of", "Sweden", "Spain"),
    ("Thomas Joannes Stieltjes", "The mother tongue of {} is", "English", "Dutch"),
    ("Apple A5", "{} was created by", "Google", "Apple"),
]


class _RandomFF2Edit:
    """A deterministic per-request edit of FF2 at layer 1 (stands in for a real editor)."""

    name = "test-random"

    def __init__(self, scale: float = 0.5) -> None:
        self.scale = scale

    def __call__(self, lm: LensModel, requests: Sequence[RewriteRequest]) -> Edit:
        module = lm.arch.resolve(1, "ff2").module
        pname = next(n for n, m in lm.model.named_modules() if m is module) + ".weight"
        g = torch.Generator().manual_seed(zlib.crc32(requests[0].prompt.encode()))
        delta = self.scale * torch.randn(module.weight.shape, generator=g)
        return Edit.from_deltas(lm, {pname: delta}, self.name, {"scale": self.scale}, requests)


EDITORS["test-random"] = _RandomFF2Edit


@pytest.fixture(scope="module")
def tiny(tokenizer) -> LensModel:  # type: ignore[no-untyped-def]
    return make_tiny("llama", tokenizer, seed=3)


def easyedit_file(path: Path, facts=FACTS) -> Path:  # type: ignore[no-untyped-def]
    rows = [
        {
            "case_id": i,
            "prompt": template.format(subject),
            "target_new": new,
            "subject": subject,
            "ground_truth": true,
            "rephrase_prompt": f"In short, {template.format(subject)}",
            "locality_prompt": template.format("Someone else"),
            "locality_ground_truth": true,
        }
        for i, (subject, template, new, true) in enumerate(facts)
    ]
    path.write_text(json.dumps(rows))
    return path


def rome_file(path: Path) -> Path:
    rows = [
        {
            "case_id": 100 + i,
            "requested_rewrite": {
                "prompt": template,
                "subject": subject,
                "target_new": {"str": new},
                "target_true": {"str": true},
            },
            "paraphrase_prompts": [
                f"Indeed, {template.format(subject)}",
                f"As is known, {template.format(subject)}",
            ],
            "neighborhood_prompts": [template.format(n) for n in ("Ann", "Bob", "Carl")],
            "generation_prompts": [f"{subject} is", f"People say {subject}"],
        }
        for i, (subject, template, new, true) in enumerate(FACTS[:3])
    ]
    path.write_text(json.dumps(rows))
    return path


SETTINGS = EvalSettings(
    batch_size=8, group_size=2, fluency_records=2, ppl_records=3, generation_length=16
)


def _strip(rows: list[dict]) -> dict:  # type: ignore[type-arg]
    """Lines keyed by (label, case_id), without the wall time (and how edits were batched)."""
    drop = ("time_edit", "edit_batch")
    return {(r["label"], r["case_id"]): {k: v for k, v in r.items() if k not in drop} for r in rows}


def _close(a, b) -> bool:  # type: ignore[no-untyped-def]
    """Equal, with floats compared to 1e-5 (batched passes sum in another order)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-5, abs=1e-5)
    return bool(a == b)


def _assert_same(a: dict, b: dict) -> None:  # type: ignore[type-arg]
    assert a.keys() == b.keys()
    for key in a:
        ma, mb = a[key].pop("metrics", {}), b[key].pop("metrics", {})
        assert _close(a[key], b[key]), key
        assert ma.keys() == mb.keys()
        for m in ma:
            if ma[m] is None or mb[m] is None:
                assert ma[m] is mb[m], (key, m)
            else:
                assert ma[m] == pytest.approx(mb[m], rel=1e-5, abs=1e-5), (key, m)


def test_layouts_score_every_prompt(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for layout, path, pairs_per_record in [
        ("easyedit", easyedit_file(tmp_path / "ee.json"), 6),
        ("rome", rome_file(tmp_path / "rome.json"), 12),
    ]:
        records = load_records(path)
        out = tmp_path / layout
        evaluate(tiny, records, ["unedited"], out, settings=SETTINGS, progress=False)
        rows = read_results(out)
        assert [r["case_id"] for r in rows] == [r.case_id for r in records]
        for record, row in zip(records, rows, strict=True):
            prompts = RecordPrompts.from_record(record)
            assert len(prompts.pairs()) == pairs_per_record
            want = prompts.metrics(score_targets(tiny, prompts.pairs(), batch_size=1))
            for key, value in want.items():
                assert row["metrics"][key] == pytest.approx(value, abs=1e-5)


def test_resume_after_interruption_is_identical(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    records = load_records(easyedit_file(tmp_path / "cf.json"))
    methods = ["unedited", "test-random", "test-random:scale=0.2"]
    full = tmp_path / "full"
    evaluate(tiny, records, methods, full, settings=SETTINGS, progress=False)
    expected = read_results(full)
    assert len(expected) == len(records) * len(methods)

    class Stop(Exception):
        pass

    seen: list[dict] = []  # type: ignore[type-arg]

    def stop_after(row: dict) -> None:  # type: ignore[type-arg]
        seen.append(row)
        if len(seen) == 7:
            raise Stop

    part = tmp_path / "part"
    with pytest.raises(Stop):
        evaluate(
            tiny, records, methods, part, settings=SETTINGS, on_result=stop_after, progress=False
        )
    assert len(read_results(part)) == 7
    with (part / "results.jsonl").open("a") as fh:  # a torn line, as a crash mid-write leaves
        fh.write('{"label": "unedited", "case_')
    with pytest.raises(InputError, match="--resume"):
        evaluate(tiny, records, methods, part, settings=SETTINGS, progress=False)
    result = evaluate(tiny, records, methods, part, settings=SETTINGS, resume=True, progress=False)
    assert result.reused == 7
    assert result.written == len(expected) - 7
    got = read_results(part)
    assert len(got) == len(expected)  # no duplicate, none missing
    _assert_same(_strip(got), _strip(expected))
    # a finished run is never recomputed
    again = evaluate(tiny, records, methods, part, settings=SETTINGS, resume=True, progress=False)
    assert again.written == 0
    # ... and resuming with other measuring settings is refused
    with pytest.raises(InputError, match="different settings"):
        evaluate(
            tiny,
            records,
            methods,
            part,
            resume=True,
            progress=False,
            settings=EvalSettings(fluency_records=0),
        )


class _RandomFF2EditNewDefault(_RandomFF2Edit):
    """The same editor after its default scale changed (as a new release's defaults might)."""

    def __init__(self, scale: float = 0.3) -> None:
        super().__init__(scale)


def test_resume_refuses_lines_edited_with_other_hparams(tiny, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A default that changed between a run and its resume is refused, not mixed into one row."""
    from backward_lens.distributed.shards import Shard

    records = load_records(easyedit_file(tmp_path / "cf.json"))
    part = tmp_path / "part"
    evaluate(tiny, records[:2], ["test-random"], part, settings=SETTINGS, progress=False)
    before = (part / "results.jsonl").read_text()
    assert {r["hparams"]["scale"] for r in read_results(part)} == {0.5}
    monkeypatch.setitem(EDITORS, "test-random", _RandomFF2EditNewDefault)
    with pytest.raises(
        InputError, match=r"scale 0\.5 and 0\.3: a default changed.*test-random:scale=0\.3"
    ):
        evaluate(
            tiny, records, ["test-random"], part, settings=SETTINGS, resume=True, progress=False
        )
    assert (part / "results.jsonl").read_text() == before  # nothing written, nothing lost
    # the new values under their own label are a method of their own
    evaluate(
        tiny,
        records,
        ["test-random:scale=0.3"],
        part,
        settings=SETTINGS,
        resume=True,
        progress=False,
    )
    assert {r["label"]: r["hparams"]["scale"] for r in read_results(part)} == {
        "test-random": 0.5,
        "test-random:scale=0.3": 0.3,
    }
    # one shard of a job is checked against the lines of the others too
    sharded = tmp_path / "sharded"

    def run_shard(k: int) -> None:
        evaluate(
            tiny,
            records,
            ["test-random"],
            sharded,
            settings=SETTINGS,
            progress=False,
            shard=Shard(k, 2),
        )

    monkeypatch.setitem(EDITORS, "test-random", _RandomFF2Edit)
    run_shard(1)
    monkeypatch.setitem(EDITORS, "test-random", _RandomFF2EditNewDefault)
    with pytest.raises(InputError, match="a default changed"):
        run_shard(0)
    rows = read_results(sharded)  # shard 1's group (records 2 and 3) only, as it wrote them
    assert [(r["case_id"], r["hparams"]["scale"]) for r in rows] == [(2, 0.5), (3, 0.5)]


def test_batched_and_one_at_a_time_agree(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    records = load_records(easyedit_file(tmp_path / "cf.json"))
    # shift's batched path also computes all the group's edits in one pass (``each``)
    methods = ["unedited", "test-random", "shift:layer=1,eta=0.5"]
    evaluate(tiny, records, methods, tmp_path / "a", settings=SETTINGS, progress=False)
    rows = read_results(tmp_path / "a")
    assert {r.get("edit_batch") for r in rows if r["method"] == "shift"} == {SETTINGS.group_size}
    single = EvalSettings(
        batch_size=1, group_size=1, fluency_records=2, ppl_records=3, generation_length=16
    )
    evaluate(tiny, records, methods, tmp_path / "b", settings=single, progress=False)
    _assert_same(_strip(read_results(tmp_path / "a")), _strip(read_results(tmp_path / "b")))


def test_edit_is_reverted_after_the_run(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    records = load_records(easyedit_file(tmp_path / "cf.json"))
    single = EvalSettings(batch_size=1, group_size=1, fluency_records=0, ppl_records=1)
    evaluate(tiny, records[:2], ["test-random"], tmp_path / "r", settings=single, progress=False)
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_records_are_skipped_with_a_reason(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = easyedit_file(tmp_path / "cf.json")
    rows = json.loads(path.read_text())
    rows[1]["subject"] = "Nobody In The Prompt"
    rows[2]["target_new"] = ""
    rows[3]["ground_truth"] = None
    path.write_text(json.dumps(rows))
    records = load_records(path)
    out = tmp_path / "bad"
    evaluate(tiny, records, ["unedited", "test-random"], out, settings=SETTINGS, progress=False)
    got = {(r["label"], r["case_id"]): r for r in read_results(out)}
    assert len(got) == 2 * len(records)
    for label in ("unedited", "test-random"):
        assert "subject" in got[(label, 1)]["reason"]
        assert "target_new" in got[(label, 2)]["reason"]
        assert "target_true" in got[(label, 3)]["reason"]
        for case in (1, 2, 3):
            assert got[(label, case)]["status"] == "skipped"
        for case in (0, 4, 5):
            assert got[(label, case)]["status"] == "ok"
    _md, _csv, df = write_summary(out)
    assert df.loc["test-random", "records"] == 3
    assert df.loc["test-random", "skipped"] == 3


def test_unknown_method_is_a_clear_error(tiny, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    records = load_records(easyedit_file(tmp_path / "cf.json"))
    with pytest.raises(InputError, match="unknown editing method 'nope'"):
        evaluate(tiny, records, ["nope"], tmp_path / "x", progress=False)
    assert not (tmp_path / "x" / "results.jsonl").exists()
    code = main(
        [
            "evaluate",
            "--method",
            "nope",
            "--data",
            str(tmp_path / "cf.json"),
            "--out",
            str(tmp_path / "y"),
            "--quiet",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown editing method 'nope'" in err
    assert "Traceback" not in err


def test_summary_means_and_baseline_row(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    records = load_records(easyedit_file(tmp_path / "cf.json"))
    out = tmp_path / "s"
    evaluate(tiny, records, ["test-random", "unedited"], out, settings=SETTINGS, progress=False)
    md, csv, df = write_summary(out)
    rows = [r for r in read_results(out) if r["label"] == "test-random"]
    values = (
        torch.tensor([r["metrics"]["neighborhood_magnitude"] for r in rows], dtype=torch.float64)
        * 100
    )
    col = "Neighborhood magnitude ↑"
    assert df.loc["test-random", f"{col} mean"] == pytest.approx(float(values.mean()))
    assert df.loc["test-random", f"{col} std"] == pytest.approx(float(values.std(unbiased=False)))
    assert list(df.index) == ["unedited", "test-random"]
    text = md.read_text()
    assert text.splitlines()[2].startswith("| unedited |")
    assert "Efficacy acc" in text and "Efficacy score" in text
    assert "(n=2)" in text  # fluency measured on the first 2 records only
    assert csv.read_text().startswith("method,records")


def test_read_results_drops_only_a_torn_last_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from backward_lens.errors import DataError

    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3', encoding="utf-8")
    assert read_results(tmp_path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\nnot json\n{"a": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2 is damaged"):
        read_results(path)
