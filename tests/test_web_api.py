"""The viewer without a browser: the standalone page, the JSON API, limits, locks, edit safety.

A tiny random Llama (3 layers, width 32, the real SmolLM2 tokenizer) stands in for the model, so
these tests are fast; the browser tests (test_web_browser.py) use the real default model.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from backward_lens.capture import capture
from backward_lens.editing import Edit, RewriteRequest, get_editor
from backward_lens.errors import EditError
from backward_lens.explain import explain
from backward_lens.models import LensModel
from backward_lens.web import app as app_module
from backward_lens.web.app import ViewerApp
from backward_lens.web.cells import cell_details
from backward_lens.web.pool import ModelPool, ModelSlot
from backward_lens.web.render import render_explanation_html
from backward_lens.web.server import ViewerServer, make_server
from tests.tiny import make_tiny

PROMPT = "The Eiffel Tower is located in the city of"
TARGET = " Rome"


@pytest.fixture(scope="module")
def tiny(tokenizer: Any) -> LensModel:
    return make_tiny("llama", tokenizer, seed=3)


@pytest.fixture()
def viewer(tiny: LensModel) -> Iterator[tuple[ViewerServer, ViewerApp]]:
    app = ViewerApp(ModelPool([ModelSlot(tiny.name, lambda: tiny, tiny)]))
    server = make_server(app, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, app
    finally:
        server.shutdown()
        server.server_close()


def call(
    server: ViewerServer,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """(status, decoded JSON or text) of one request; POST when a body is given."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(server.url.rstrip("/") + path, data=data, method=None)
    if data is not None:
        req.add_header("Content-Type", content_type)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, text, ctype = resp.status, resp.read().decode(), resp.headers["Content-Type"]
    except urllib.error.HTTPError as err:
        status, text, ctype = err.code, err.read().decode(), err.headers["Content-Type"]
    return status, json.loads(text) if "json" in (ctype or "") else text


def snapshot(lm: LensModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def assert_unchanged(lm: LensModel, before: dict[str, torch.Tensor]) -> None:
    after = lm.model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"model left modified: {changed}"


# -- the standalone page -----------------------------------------------------------------------


def test_standalone_page_is_self_contained_and_carries_the_data(tiny: LensModel) -> None:
    data = explain(tiny, PROMPT, TARGET, top_k=2).to_dict()
    data["prompt"] = PROMPT + " </script><script>alert(1)</script> & <b>"
    page = render_explanation_html(data)
    # No external resource of any kind: no http(s) or protocol-relative src/href, no <link>.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<link" not in page.lower() and "@import" not in page
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page)
    # The script tags are exactly: the data block, the viewer code, the start call.
    assert page.count("<script") == page.count("</script>") == 3
    block = re.search(r'<script type="application/json" id="bl-data">(.*?)</script>', page, re.S)
    assert block is not None
    assert json.loads(block.group(1)) == data  # the hostile prompt round-trips, escaped
    assert "renderExplanation" in page and ".bl-grid" in page  # JS and CSS are inlined


def test_standalone_page_refuses_a_non_explanation() -> None:
    with pytest.raises(ValueError, match="to_dict"):
        render_explanation_html({"prompt": "x"})


# -- explain and the page ----------------------------------------------------------------------


def test_page_and_config(viewer: tuple[ViewerServer, ViewerApp]) -> None:
    server, _ = viewer
    status, page = call(server, "/")
    assert status == 200 and "BackwardLens.app()" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    status, config = call(server, "/api/config")
    assert status == 200 and config["models"] == ["tiny-llama"]
    assert call(server, "/nothing")[0] == 404
    assert call(server, "/etc/passwd")[0] == 404
    assert call(server, "/../../etc/passwd")[0] == 404


def test_explain_matches_the_library(
    viewer: tuple[ViewerServer, ViewerApp], tiny: LensModel
) -> None:
    server, _ = viewer
    for normalized in (False, True):
        status, out = call(
            server,
            "/api/explain",
            {"prompt": PROMPT, "target": TARGET, "top_k": 4, "normalized": normalized},
        )
        assert status == 200, out
        expected = explain(tiny, PROMPT, TARGET, top_k=4, normalized=normalized).to_dict()
        assert out["explanation"] == json.loads(json.dumps(expected))
    assert out["reused_capture"] is True  # switching the lens re-reads the last capture
    body = {"prompt": PROMPT, "target": TARGET, "fresh": True}
    assert call(server, "/api/explain", body)[1]["reused_capture"] is False
    body = {"prompt": PROMPT + " Paris", "target": TARGET}
    assert call(server, "/api/explain", body)[1]["reused_capture"] is False


BAD_EXPLAIN = [
    ({"prompt": PROMPT, "target": TARGET, "top_k": 0}, "top_k"),
    ({"prompt": PROMPT, "target": TARGET, "top_k": 21}, "top_k"),
    ({"prompt": PROMPT, "target": TARGET, "top_k": "many"}, "top_k"),
    ({"prompt": PROMPT, "target": TARGET, "normalized": "yes"}, "normalized"),
    ({"prompt": "x" * 501, "target": TARGET}, "limit is 500"),
    ({"prompt": "word " * 100, "target": TARGET}, "at most 64"),
    ({"prompt": "", "target": TARGET}, "prompt is empty"),
    ({"prompt": PROMPT, "target": "  "}, "target is empty"),
    ({"prompt": PROMPT}, "target is required"),
    ({"prompt": PROMPT, "target": TARGET, "model": "/etc/passwd"}, "unknown model"),
    ({"prompt": PROMPT, "target": TARGET, "model": "../models/x.gguf"}, "unknown model"),
    ({"prompt": PROMPT, "target": TARGET, "model": "gemma3-270m"}, "unknown model"),
    ({"prompt": PROMPT, "target": TARGET, "path": "/etc/passwd"}, "unknown field"),
    ({"prompt": PROMPT, "target": TARGET, "session": "../x"}, "session"),
    (["not", "an", "object"], "JSON object"),
]


@pytest.mark.parametrize(("body", "message"), BAD_EXPLAIN)
def test_bad_explain_requests_get_400_with_a_message(
    viewer: tuple[ViewerServer, ViewerApp], body: Any, message: str
) -> None:
    status, out = call(viewer[0], "/api/explain", body)
    assert status == 400
    assert message in out["error"]


def test_transport_errors(viewer: tuple[ViewerServer, ViewerApp]) -> None:
    server, app = viewer
    status, out = call(server, "/api/explain", raw=b"{not json")
    assert status == 400 and "not valid JSON" in out["error"]
    status, out = call(server, "/api/explain", {"prompt": PROMPT}, content_type="text/plain")
    assert status == 415
    big = json.dumps({"prompt": "x" * (app.limits.max_body_bytes + 1)}).encode()
    status, out = call(server, "/api/explain", raw=big)
    assert status == 413 and "limit" in out["error"]
    status, out = call(server, "/api/explain", {"prompt": PROMPT}, headers={"Host": "evil.test"})
    assert status == 403
    assert call(server, "/api/nothing", {})[0] == 404


# -- cell details --------------------------------------------------------------------------------


def test_cell_needs_an_explanation_first(viewer: tuple[ViewerServer, ViewerApp]) -> None:
    status, out = call(
        viewer[0], "/api/cell", {"session": "fresh", "matrix": "ff2", "layer": 0, "position": 0}
    )
    assert status == 400 and "submit a prompt first" in out["error"]


def test_cell_limits(viewer: tuple[ViewerServer, ViewerApp]) -> None:
    server, _ = viewer
    assert call(server, "/api/explain", {"prompt": PROMPT, "target": TARGET})[0] == 200
    for body, message in [
        ({"matrix": "ff3", "layer": 0, "position": 0}, "matrix"),
        ({"matrix": "ff1", "layer": 3, "position": 0}, "layer"),
        ({"matrix": "ff1", "layer": 0, "position": 99}, "position"),
        ({"matrix": "ff1", "layer": 0, "position": 0, "neurons": 51}, "neurons"),
    ]:
        status, out = call(server, "/api/cell", body)
        assert status == 400 and message in out["error"], out


@pytest.mark.parametrize("matrix", ["ff1", "ff2"])
def test_cell_neurons_against_the_dense_gradient(tiny: LensModel, matrix: str) -> None:
    cap = capture(tiny, PROMPT, TARGET)
    layer, position = 1, cap.n - 1
    out = cell_details(tiny, cap, matrix, layer, position, k=3, n_neurons=5)
    g = cap.gradient(layer, matrix)
    dense = g.dense().double()  # weight layout [d_out, d_in] (nn.Linear)
    x, delta = g.x.double(), g.delta.double()
    if matrix == "ff1":  # neuron j = row j of the [d_ff, d] gradient = sum_i delta_i[j] x_i
        neurons = dense
        terms = torch.stack([(delta[i][:, None] * x[i][None]).norm(dim=1) for i in range(g.n)])
        own = x[position]
    else:  # neuron j = column j of the [d, d_ff] gradient = sum_i x_i[j] delta_i
        neurons = dense.T
        terms = torch.stack([(x[i][:, None] * delta[i][None]).norm(dim=1) for i in range(g.n)])
        own = delta[position]
    dominated = (terms.argmax(0) == position).nonzero().flatten()
    norms = neurons.norm(dim=1)
    expected = dominated[norms[dominated].argsort(descending=True)][:5].tolist()
    assert [n["index"] for n in out["neurons"]] == expected
    assert out["gradient"]["n_dominated"] == len(dominated)
    for n in out["neurons"]:
        j = n["index"]
        assert n["norm"] == pytest.approx(float(norms[j]), rel=1e-4)
        assert n["share"] == pytest.approx(float(terms[position, j] / terms[:, j].sum()), rel=1e-4)
        cos = torch.nn.functional.cosine_similarity(neurons[j], own, dim=0)
        assert n["cosine"] == pytest.approx(float(cos), abs=1e-4)
    rank = int((tiny.lens.logits(own.float()) > tiny.lens.logits(own.float())[cap.target_id]).sum())
    assert out["lens"]["raw"]["target_rank"] == rank
    assert out["gradient"]["rank"] == int(torch.linalg.matrix_rank(g.dense()))


# -- edit safety ---------------------------------------------------------------------------------


def edit_body(**extra: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "target": TARGET, "layer": 1, "eta": 1.0, **extra}


def test_edit_applies_reverts_and_reports(
    viewer: tuple[ViewerServer, ViewerApp], tiny: LensModel
) -> None:
    server, _ = viewer
    before = snapshot(tiny)
    status, out = call(
        server,
        "/api/edit",
        edit_body(paraphrases=["The Eiffel Tower is in"], neighborhood="The Louvre is in\n\n"),
    )
    assert status == 200, out
    assert_unchanged(tiny, before)
    assert [r["kind"] for r in out["rows"]] == ["prompt", "paraphrase", "neighborhood"]
    # Both columns equal unbatched forward passes of each prompt, without and with the edit.
    target_id = tiny.tokenizer(TARGET, add_special_tokens=False)["input_ids"][0]
    prompts = [PROMPT, "The Eiffel Tower is in", "The Louvre is in"]
    edit = get_editor("shift", layer=1, eta=1.0)(tiny, [RewriteRequest(PROMPT, "", TARGET)])
    for column in ("before", "after"):
        for row, prompt in zip(out["rows"], prompts, strict=True):
            with torch.no_grad():
                ids = torch.tensor([tiny.tokenizer(prompt)["input_ids"]])
                if column == "after":
                    with edit.applied(tiny.model):
                        logits = tiny.model(ids).logits[0, -1]
                else:
                    logits = tiny.model(ids).logits[0, -1]
            got = row[column]
            assert got["token_id"] == int(logits.argmax())
            assert got["target_rank"] == int((logits > logits[target_id]).sum())
            assert got["target_prob"] == pytest.approx(
                float(logits.softmax(-1)[target_id]), rel=1e-4
            )
    assert out["rows"][0]["after"]["target_prob"] > out["rows"][0]["before"]["target_prob"]
    assert_unchanged(tiny, before)


BAD_EDIT = [
    (edit_body(eta=0), "eta"),
    (edit_body(eta=-1), "eta"),
    (edit_body(eta=10.5), "eta"),
    (edit_body(eta="nan"), "eta"),
    (edit_body(layer=3), "layer"),
    (edit_body(layer=-1), "layer"),
    (edit_body(paraphrases=["p"] * 9), "limit is 8"),
    (edit_body(neighborhood=[1, 2]), "list of strings"),
    (edit_body(neighborhood=["word " * 100]), "at most 64"),
    (edit_body(model="/tmp"), "unknown model"),
    (edit_body(weights="/tmp/x.safetensors"), "unknown field"),
]


@pytest.mark.parametrize(("body", "message"), BAD_EDIT)
def test_bad_edit_requests_get_400_and_leave_the_model(
    viewer: tuple[ViewerServer, ViewerApp], tiny: LensModel, body: Any, message: str
) -> None:
    before = snapshot(tiny)
    status, out = call(viewer[0], "/api/edit", body)
    assert status == 400 and message in out["error"], out
    assert_unchanged(tiny, before)


def test_model_restored_when_reading_the_edited_model_fails(
    viewer: tuple[ViewerServer, ViewerApp], tiny: LensModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, app = viewer
    before = snapshot(tiny)
    real = app.predict
    calls = []

    def failing(lm: LensModel, prompts: list[str], target_id: int) -> list[dict[str, Any]]:
        calls.append(1)
        if len(calls) == 2:  # the read under the applied edit
            assert not torch.equal(
                lm.model.state_dict()["model.layers.1.mlp.down_proj.weight"],
                before["model.layers.1.mlp.down_proj.weight"],
            )
            raise RuntimeError("boom while edited")
        return real(lm, prompts, target_id)

    monkeypatch.setattr(app, "predict", failing)
    status, out = call(server, "/api/edit", edit_body())
    assert status == 500 and "boom while edited" in out["error"]
    assert len(calls) == 2
    assert_unchanged(tiny, before)
    monkeypatch.setattr(app, "predict", real)
    assert call(server, "/api/edit", edit_body())[0] == 200  # the lock was released
    assert_unchanged(tiny, before)


def test_model_restored_when_an_editor_misbehaves(
    viewer: tuple[ViewerServer, ViewerApp], tiny: LensModel
) -> None:
    server, app = viewer
    before = snapshot(tiny)

    def leaky_editor(layer: int, eta: float) -> Any:
        def run(lm: LensModel, requests: Any) -> Edit:
            w = lm.arch.resolve(layer, "ff2").module.weight
            with torch.no_grad():
                w.add_(1.0)  # changes the model and "forgets" to restore it
            return Edit.from_deltas(lm, {}, "leaky", {}, requests)

        return run

    def failing_editor(layer: int, eta: float) -> Any:
        def run(lm: LensModel, requests: Any) -> Edit:
            raise EditError("this edit cannot be made")

        return run

    app.editor_factory = leaky_editor
    status, out = call(server, "/api/edit", edit_body())
    assert status == 500 and "left edited" in out["error"]
    assert_unchanged(tiny, before)
    app.editor_factory = failing_editor
    status, out = call(server, "/api/edit", edit_body())
    assert status == 400 and out["error"] == "this edit cannot be made"
    assert_unchanged(tiny, before)


# -- concurrency ---------------------------------------------------------------------------------


def test_requests_on_one_model_are_serialised(
    viewer: tuple[ViewerServer, ViewerApp], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = viewer
    inside, peak = [0], [0]
    real = app_module.capture_requests
    guard = threading.Lock()

    def slow_capture(*args: Any, **kwargs: Any) -> Any:
        with guard:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        time.sleep(0.3)
        try:
            return real(*args, **kwargs)
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(app_module, "capture_requests", slow_capture)
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda i=i: results.append(
                call(
                    server,
                    "/api/explain",
                    {"prompt": f"{PROMPT} {i}", "target": TARGET, "session": f"s{i}"},
                )[0]
            )
        )
        for i in range(3)
    ]
    for t in threads:
        t.start()
    time.sleep(0.15)
    status, st = call(server, "/api/status")  # answers while the model is busy
    assert status == 200 and st["models"][0]["state"] == "busy"
    for t in threads:
        t.join()
    assert results == [200, 200, 200]
    assert peak[0] == 1


def test_lazy_model_loading_uses_only_the_configured_loader(tiny: LensModel) -> None:
    loads: list[str] = []

    def loader() -> LensModel:
        loads.append("other")
        return tiny

    pool = ModelPool([ModelSlot("first", lambda: tiny, tiny), ModelSlot("other", loader)])
    app = ViewerApp(pool)
    assert app.config()["models"] == ["first", "other"]
    assert loads == []
    app.explain({"prompt": PROMPT, "target": TARGET, "model": "other"})
    app.explain({"prompt": PROMPT, "target": TARGET, "model": "other"})
    assert loads == ["other"]
