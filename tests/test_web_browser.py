"""The viewer in a real headless Chromium against the server with the real default model.

Needs Debian's ``chromium`` and ``chromium-driver`` and Selenium (the ``test`` extra):
``apt-get install -y chromium chromium-driver && pip install selenium``. Every cell the page shows
is compared with the library's own reading of the same prompt; the paper's expectation (" Rome"
as the least probable token of the last position's FF2 VJP in the top layers) is checked too. The
test takes a screenshot of the page (into docs/viewer.png for the README only when
BACKWARD_LENS_UPDATE_SCREENSHOT=1).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from backward_lens.explain import explain
from backward_lens.models import LensModel
from backward_lens.web.app import ViewerApp
from backward_lens.web.pool import ModelPool
from backward_lens.web.render import render_explanation_html
from backward_lens.web.server import ViewerServer, make_server

pytestmark = pytest.mark.slow

PROMPT = "The Eiffel Tower is located in the city of"
TARGET = " Rome"
EDIT_LAYER, EDIT_ETA = 21, 0.3
"""A forward pass shift that makes SmolLM2 answer " Rome" (0.3 is the smallest of 0.02, 0.1, 0.3
that flips it at the default layer 21; measured with the viewer's edit API)."""
README_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "viewer.png"
"""Rewritten only when BACKWARD_LENS_UPDATE_SCREENSHOT=1 (a test run leaves tracked files alone)."""
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1500,1200",
]


def _binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError(
        f"none of {names} is installed; run: apt-get install -y chromium chromium-driver"
    )


@pytest.fixture(scope="module")
def server(smollm2: LensModel) -> Iterator[ViewerServer]:
    srv = make_server(ViewerApp(ModelPool.with_builtins(smollm2)), "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _binary("chromium", "chromium-browser")
    profile = tempfile.mkdtemp(prefix="bl-chromium-")
    for flag in [*CHROME_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(_binary("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver: Any, seconds: float = 180) -> Any:
    return WebDriverWait(driver, seconds)


def grid_tokens(driver: Any, matrix: str) -> dict[tuple[int, int], str]:
    """(layer, position) -> the token shown in that cell (read from the DOM in one call)."""
    cells = driver.execute_script(
        "return Array.from(document.querySelectorAll('#bl-grid-' + arguments[0] + ' td.bl-cell'))"
        ".map(c => [+c.dataset.layer, +c.dataset.pos, c.dataset.token, c.textContent]);",
        matrix,
    )
    out = {}
    for layer, pos, token, text in cells:
        assert text == token.replace("\n", "\u21b5").replace("\t", "\u21e5").replace("\r", "\u240d")
        out[(layer, pos)] = token
    return out


def expected_tokens(lm: LensModel, normalized: bool) -> dict[str, dict[tuple[int, int], str]]:
    expl = explain(lm, PROMPT, TARGET, top_k=3, normalized=normalized)
    return {
        "ff1": {
            (lr.layer, i): p.top[0] for lr in expl.layers for i, p in enumerate(lr.ff1.positions)
        },
        "ff2": {
            (lr.layer, i): p.bottom[0] for lr in expl.layers for i, p in enumerate(lr.ff2.positions)
        },
    }


def submit_and_wait(driver: Any, lens_text: str) -> None:
    wait(driver).until(
        ec.text_to_be_present_in_element((By.ID, "bl-summary"), f"lens: {lens_text}")
    )
    wait(driver).until(ec.element_to_be_clickable((By.ID, "bl-submit")))


def test_viewer_end_to_end(
    server: ViewerServer, browser: Any, smollm2: LensModel, tmp_path: Path
) -> None:
    d = browser
    down_proj = smollm2.arch.resolve(EDIT_LAYER, "ff2").module.weight
    weight_before = down_proj.detach().clone()
    d.get(server.url)
    assert d.find_element(By.ID, "bl-model").get_attribute("value") == "smollm2-135m"
    options = [o.text for o in d.find_elements(By.CSS_SELECTOR, "#bl-model option")]
    assert options == ["smollm2-135m", "gemma3-270m"]

    # 1. Submit the prompt and target; the grid shows what the library computes.
    for field, text in (("bl-prompt-input", PROMPT), ("bl-target-input", TARGET)):
        box = d.find_element(By.ID, field)
        box.clear()
        box.send_keys(text)
    d.find_element(By.ID, "bl-submit").click()
    submit_and_wait(d, "raw")
    n_layers, n = smollm2.n_layers, len(smollm2.tokenizer(PROMPT)["input_ids"])
    shown = {m: grid_tokens(d, m) for m in ("ff1", "ff2")}
    assert len(shown["ff2"]) == n_layers * n
    assert shown == expected_tokens(smollm2, normalized=False)
    # The paper's reading: the last position's FF2 VJP has " Rome" as least probable token in
    # the top layers (Fig. 4; measured: layers 23-29 of 30 on SmolLM2).
    top_layers = range(n_layers - 7, n_layers)
    assert [shown["ff2"][(layer, n - 1)] for layer in top_layers] == [TARGET] * 7
    # The rank column shows each layer's gradient rank.
    ranks = d.find_elements(By.CSS_SELECTOR, "#bl-grid-ff2 td.bl-rank")
    assert len(ranks) == n_layers and all(1 <= int(r.text) <= n for r in ranks)

    # 2. Hover: the tooltip lists the top/bottom tokens and the target's rank.
    cell = d.find_element(
        By.CSS_SELECTOR, f'#bl-grid-ff2 td[data-layer="{n_layers - 2}"][data-pos="{n - 1}"]'
    )
    ActionChains(d).move_to_element(cell).perform()
    tip = d.find_element(By.ID, "bl-tooltip")
    wait(d, 10).until(lambda _: tip.is_displayed())
    assert "bottom 3" in tip.text and "Rome" in tip.text and f"of {smollm2.vocab_size}" in tip.text

    # 3. Click: the details panel lists the neurons this cell dominates.
    cell.click()
    wait(d).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#bl-neurons tr[data-neuron]")))
    assert "dominates" in d.find_element(By.ID, "bl-details").text

    # 4. Toggle the normalised lens: the grid is re-read and matches the library again.
    d.find_element(By.ID, "bl-lens-norm").click()
    submit_and_wait(d, "normalised")
    assert {m: grid_tokens(d, m) for m in ("ff1", "ff2")} == expected_tokens(smollm2, True)
    d.find_element(By.ID, "bl-lens-raw").click()
    submit_and_wait(d, "raw")

    # 5. Apply a forward pass shift: the prompt now predicts " Rome".
    d.find_element(By.ID, "bl-edit-layer").send_keys(str(EDIT_LAYER))
    d.find_element(By.ID, "bl-edit-eta").send_keys(str(EDIT_ETA))
    d.find_element(By.ID, "bl-edit-para").send_keys("The Eiffel Tower can be found in the city of")
    d.find_element(By.ID, "bl-edit-neigh").send_keys("The Louvre is located in the city of")
    d.find_element(By.ID, "bl-edit-apply").click()
    wait(d).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#bl-edit-table")))
    rows = d.find_elements(By.CSS_SELECTOR, "#bl-edit-table tr[data-kind]")
    assert [r.get_attribute("data-kind") for r in rows] == ["prompt", "paraphrase", "neighborhood"]
    first = rows[0].find_elements(By.TAG_NAME, "td")
    assert first[2].text.startswith(" Paris (") and first[3].text.startswith(" Rome (")
    assert "Reverted" in d.find_element(By.ID, "bl-edit-status").text
    assert torch.equal(down_proj.detach(), weight_before)  # the server model is unedited

    # Screenshot for the README: grid, details and edit result, with a tooltip open.
    cell = d.find_element(
        By.CSS_SELECTOR, f'#bl-grid-ff2 td[data-layer="{n_layers - 2}"][data-pos="{n - 1}"]'
    )
    cell.click()
    wait(d).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#bl-neurons tr[data-neuron]")))
    for _ in range(2):  # the viewport is smaller than the window: measure, resize, re-measure
        height = d.execute_script("return document.documentElement.scrollHeight")
        inner = d.execute_script("return window.innerHeight")
        outer = d.get_window_size()["height"]
        d.set_window_size(1500, min(int(height) + int(outer) - int(inner) + 20, 6000))
    d.execute_script("window.scrollTo(0, 0);")
    ActionChains(d).move_to_element(cell).perform()
    update = os.environ.get("BACKWARD_LENS_UPDATE_SCREENSHOT") == "1"
    shot = README_SCREENSHOT if update else tmp_path / "viewer.png"
    assert d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000  # a real page, not an empty frame
    d.set_window_size(1500, 1200)

    # 6. Revert and re-check: a fresh forward/backward pass predicts " Paris" again.
    d.find_element(By.ID, "bl-edit-revert").click()
    wait(d).until(
        lambda drv: (
            drv.find_element(By.ID, "bl-edit-status").get_attribute("data-reverted") == "yes"
        )
    )
    assert "Paris" in d.find_element(By.ID, "bl-summary").text
    assert "one forward + backward pass" in d.find_element(By.ID, "bl-status").text  # not cached
    assert torch.equal(down_proj.detach(), weight_before)


def test_errors_are_shown_in_the_page(server: ViewerServer, browser: Any) -> None:
    d = browser
    d.get(server.url)
    box = d.find_element(By.ID, "bl-prompt-input")
    box.clear()
    box.send_keys("word " * 70)
    d.find_element(By.ID, "bl-submit").click()
    status = d.find_element(By.ID, "bl-status")
    wait(d, 60).until(lambda _: "bl-error" in (status.get_attribute("class") or ""))
    assert "at most 64" in status.text
    eta = d.find_element(By.ID, "bl-edit-eta")
    eta.send_keys("50")
    box.clear()
    box.send_keys(PROMPT)
    d.find_element(By.ID, "bl-edit-apply").click()
    edit_status = d.find_element(By.ID, "bl-edit-status")
    wait(d, 60).until(lambda _: "bl-error" in (edit_status.get_attribute("class") or ""))
    assert "eta must be a number above 0.0 and at most 10.0" in edit_status.text


def test_standalone_page_in_the_browser(browser: Any, smollm2: LensModel, tmp_path: Path) -> None:
    """The page of ``explain --html`` opens from disk and shows the same grid, without a server."""
    expl = explain(smollm2, PROMPT, TARGET, top_k=3)
    page = tmp_path / "eiffel.html"
    page.write_text(render_explanation_html(expl.to_dict()), encoding="utf-8")
    browser.get_log("browser")  # drop messages of earlier tests (e.g. their 400 responses)
    browser.get(page.as_uri())
    wait(browser, 30).until(ec.presence_of_element_located((By.ID, "bl-grid-ff2")))
    shown = {m: grid_tokens(browser, m) for m in ("ff1", "ff2")}
    assert shown == expected_tokens(smollm2, normalized=False)
    circles = browser.find_elements(By.CSS_SELECTOR, "#bl-rank-chart circle[data-matrix=ff2]")
    ranks = {int(c.get_attribute("data-layer")): int(c.get_attribute("data-rank")) for c in circles}
    assert ranks == {lr.layer: lr.ff2.positions[-1].target_rank for lr in expl.layers}
    cell = browser.find_element(By.CSS_SELECTOR, '#bl-grid-ff1 td[data-layer="0"][data-pos="0"]')
    cell.click()
    assert "top 3" in browser.find_element(By.ID, "bl-details").text
    assert browser.get_log("browser") == []  # no script error, no failed resource load
