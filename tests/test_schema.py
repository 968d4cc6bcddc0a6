"""The published JSON Schemas, the models they come from, and the one JSON serialiser."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from backward_lens import schema
from backward_lens.cli import main
from backward_lens.data import load_records
from backward_lens.errors import DataError, InputError
from backward_lens.evaluation import EvalSettings, evaluate
from backward_lens.explain import (
    Explanation,
    LayerReading,
    MatrixReading,
    PositionReading,
    PredictedToken,
    TargetToken,
    explain,
)
from backward_lens.io import dumps, to_jsonable
from backward_lens.models import LensModel
from tests.tiny import make_tiny
from tests.tokenizers import code_tokenizer

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"

try:
    import jsonschema
except ImportError:  # pragma: no cover - jsonschema comes with the test extras' tools
    jsonschema = None


def check(name: str, document: Any) -> None:
    """Validate ``document`` against the published file (jsonschema) and the model (pydantic)."""
    if jsonschema is not None:
        published = json.loads((SCHEMAS / schema.schema_file_name(name)).read_text())
        jsonschema.Draft202012Validator(published).validate(document)
    schema.validate(name, document)


def rejected(name: str, document: Any) -> bool:
    """Whether both the published schema and the model refuse ``document``."""
    with pytest.raises(DataError, match=f"not a valid {name} document"):
        schema.validate(name, document)
    if jsonschema is not None:
        published = json.loads((SCHEMAS / schema.schema_file_name(name)).read_text())
        errors = list(jsonschema.Draft202012Validator(published).iter_errors(document))
        assert errors, "the published schema accepted an invalid document"
    return True


@pytest.mark.parametrize("name", sorted(schema.DOCUMENTS))
def test_published_files_equal_the_generated_schemas(name: str) -> None:
    """``schemas/*.json`` cannot drift from the models (regenerate: ``backward-lens schema``)."""
    path = SCHEMAS / f"{name}.v{schema.SCHEMA_VERSION}.json"
    assert path.read_text(encoding="utf-8") == schema.schema_text(name), (
        f"{path} is out of date: backward-lens schema {name} > {path}"
    )
    generated = schema.json_schema(name)
    assert generated["$id"] == f"urn:backward-lens:schema:{name}:v{schema.SCHEMA_VERSION}"
    assert generated["properties"]["schema_version"]["const"] == schema.SCHEMA_VERSION
    assert "schema_version" in generated["required"]
    if jsonschema is not None:
        jsonschema.Draft202012Validator.check_schema(generated)


def test_schema_command_prints_the_published_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "result-row"]) == 0
    assert capsys.readouterr().out == (SCHEMAS / "result-row.v1.json").read_text()


def test_unknown_schema_name_is_an_input_error() -> None:
    with pytest.raises(InputError, match="no schema named 'rows'"):
        schema.json_schema("rows")


def test_explain_dataclasses_match_the_models() -> None:
    """The in-process dataclasses and the wire models have the same fields (no silent drift)."""
    pairs = [
        (PositionReading, schema.PositionReadingModel),
        (MatrixReading, schema.MatrixReadingModel),
        (LayerReading, schema.LayerReadingModel),
        (TargetToken, schema.TargetTokenModel),
        (PredictedToken, schema.PredictedTokenModel),
    ]
    for cls, model in pairs:
        assert [f.name for f in dataclasses.fields(cls)] == list(model.model_fields), cls
    fields = [f.name for f in dataclasses.fields(Explanation)]
    assert ["schema_version", *fields] == list(schema.ExplainDocument.model_fields)


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, LensModel]:
    tok = code_tokenizer()
    return {family: make_tiny(family, tok, seed=1) for family in ("gpt2", "llama")}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_explain_json_validates(
    family: str, tiny_models: dict[str, LensModel], tmp_path: Path
) -> None:
    """What ``explain --json`` writes (``Explanation.to_json``) matches the schema; llama: gate."""
    lm = tiny_models[family]
    expl = explain(lm, "The Eiffel Tower is located in the city of", " Rome", top_k=2)
    path = tmp_path / "expl.json"
    expl.to_json(path)
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["schema_version"] == schema.SCHEMA_VERSION
    assert ("gate" in document["layers"][0]) == (family == "llama")
    check("explain", document)
    assert main(["schema", "explain", "--validate", str(path)]) == 0


def test_invalid_explain_documents_are_rejected(tiny_models: dict[str, LensModel]) -> None:
    good = explain(tiny_models["gpt2"], "The capital of Spain is", " Madrid").to_dict()
    check("explain", good)
    missing = {k: v for k, v in good.items() if k != "loss"}
    assert rejected("explain", missing)
    assert rejected("explain", {**good, "schema_version": 2})
    assert rejected("explain", {**good, "unknown": 1})
    bad_layer = json.loads(json.dumps(good))
    bad_layer["layers"][0]["ff1"]["positions"][0]["target_rank"] = "first"
    assert rejected("explain", bad_layer)


def test_result_rows_validate_and_bad_rows_are_rejected(
    tiny_models: dict[str, LensModel], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real rows of ``evaluate`` (ok, skipped; with and without an edit) match the schema."""
    lm = tiny_models["gpt2"]
    facts = [
        ("Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
        ("Apple A5", "{} was created by", "Google", "Apple"),
        ("Nobody", "{} lives in", "", "Paris"),  # an empty target: skipped with a reason
    ]
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
    data = tmp_path / "facts.json"
    data.write_text(json.dumps(rows))
    settings = EvalSettings(
        batch_size=4, group_size=2, fluency_records=1, ppl_records=1, generation_length=8
    )
    out = tmp_path / "run"
    evaluate(
        lm,
        load_records(data),
        ["unedited", "shift:layer=1"],
        out,
        settings=settings,
        progress=False,
    )
    lines = (out / "results.jsonl").read_text(encoding="utf-8").splitlines()
    written = [json.loads(line) for line in lines]
    assert {r["status"] for r in written} == {"ok", "skipped"}
    assert any("edit_info" in r for r in written)
    for row in written:
        assert row["schema_version"] == schema.SCHEMA_VERSION
        check("result-row", row)
    assert main(["schema", "result-row", "--validate", str(out / "results.jsonl")]) == 0
    capsys.readouterr()

    ok = next(r for r in written if r["status"] == "ok")
    assert rejected("result-row", {k: v for k, v in ok.items() if k != "label"})
    assert rejected("result-row", {**ok, "status": "done"})
    assert rejected("result-row", {**ok, "metrics": {**ok["metrics"], "efficacy": 1.0}})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + json.dumps({**ok, "index": "three"}) + "\n")
    assert main(["schema", "result-row", "--validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("backward-lens: error: ") and "line 2" in err and "index" in err
    assert len(err.splitlines()) == 1


def test_one_serialiser() -> None:
    """NaN/inf to null (or kept), tensors and numpy to lists, dataclasses and models to dicts."""

    @dataclasses.dataclass
    class Point:
        x: float
        values: Any

    value = {
        "point": Point(math.nan, torch.tensor([1.5, math.inf])),
        3: (np.float32(2.5), np.int64(4), np.array([[1, 2]])),
        "path": Path("/tmp/x"),
        "reply": schema.ErrorReply(error="nope"),
    }
    assert to_jsonable(value) == {
        "point": {"x": None, "values": [1.5, None]},
        "3": [2.5, 4, [[1, 2]]],
        "path": "/tmp/x",
        "reply": {"error": "nope"},  # retry_after was not given: left out
    }
    assert json.loads(dumps(value))["point"]["values"] == [1.5, None]
    kept = dumps({"loss": math.nan, "ppl": math.inf}, finite=False)
    assert kept == '{"loss": NaN, "ppl": Infinity}'
    assert dumps({"word": "Zürich"}) == '{"word": "Zürich"}'
    assert dumps({"word": "Zürich"}, ensure_ascii=True) == '{"word": "Z\\u00fcrich"}'


def test_result_line_keeps_non_finite_numbers() -> None:
    """A diverged edit's perplexity stays visible (NaN/Infinity), as result lines always were."""
    line = schema.result_line({"label": "x", "metrics": {"perplexity": math.inf}})
    assert json.loads(line)["metrics"]["perplexity"] == math.inf
    assert json.loads(line)["schema_version"] == schema.SCHEMA_VERSION
