"""The interactive HTML report, opened in a real headless Chromium: hover a cell, read the
tooltip, compare it with the result's JSON; a screenshot goes to test-artifacts/."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from mlxterp.errors import OutputPathError
from mlxterp.experiments.pipeline.plan import SweepValues
from mlxterp.experiments.pipeline.results import PatchingResult

NAMES = ("When Mary and John went to the store, John gave a drink to",
         "When John and Mary went to the store, Mary gave a drink to")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from Debian's packages (scripts/setup.sh installs it on Linux)."""
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("Chromium and chromedriver are not installed (scripts/setup.sh installs them on Linux)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def open_report(browser, path: Path) -> float:
    """Load the page and wait for its script to finish drawing; seconds it took."""
    start = time.perf_counter()
    browser.get(path.as_uri())
    while browser.execute_script("return document.body.dataset.ready") != "true":
        assert time.perf_counter() - start < 60, "the report did not finish drawing"
        time.sleep(0.05)
    return time.perf_counter() - start


def hover(browser, index: int) -> str:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    cell = browser.find_element(By.CSS_SELECTOR, f'#grid [data-site="{index}"]')
    ActionChains(browser).move_to_element(cell).perform()
    return browser.find_element(By.ID, "tooltip").text


def test_hovering_a_cell_shows_what_the_json_says(browser, wrapped, tmp_path):
    from selenium.webdriver.common.by import By

    result = wrapped.patching_sweep(*NAMES, component="input", over=("layer", "position"),
                                    layers=[0, 12, 24], metric="kl")
    path = result.to_html(tmp_path / "report.html")
    assert "<script src" not in path.read_text() and "http" not in path.read_text().split("<script")[1][:200]
    open_report(browser, path)
    saved = json.loads(result.to_json())
    index = result.labels.index({"layer": 12, "position": 9})
    tip = hover(browser, index)
    assert tip.startswith("L12 pos 9 ' John'")
    assert f"recovery {PatchingResult.from_json(result.to_json()).recovery[:, index].mean():.1f}%" in tip
    assert "token: ' John' (clean) / ' Mary' (corrupted)" in tip
    assert f"patched {saved['metric_values']['patched'][0][index]:.4g}" in tip
    marked = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".prompt .differ")]
    assert marked == [" Mary", " John", " John", " John", " Mary", " Mary"]  # white-space: pre
    browser.find_element(By.ID, "show-ranking").click()
    assert browser.find_element(By.ID, "grid").value_of_css_property("display") == "none"
    ranked = browser.find_elements(By.CSS_SELECTOR, "#ranking text")
    best = result.top(1)[0][0]
    assert ranked[0].text == f"1. {best}"
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "report-ranking.png"))
    browser.find_element(By.ID, "show-grid").click()
    hover(browser, index)
    browser.save_screenshot(str(ARTIFACTS / "report-grid-hover.png"))
    with pytest.raises(OutputPathError, match="exists"):
        result.to_html(path)
    with pytest.raises(OutputPathError, match="use one of .htm, .html"):
        result.to_html(tmp_path / "report.txt")


@pytest.mark.slow  # over 15 s here: CI's slow round runs it
def test_tens_of_thousands_of_sites_still_open(browser, tmp_path, capsys):
    """A synthetic layer x head x position result of 40,320 sites (a 32-layer, 32-head model on
    a 40-token prompt): the page opens and draws every cell. Size and load time are printed."""
    layers, heads, positions = 32, 32, 40
    sites = [{"layer": la, "head": h, "position": p}
             for la in range(layers) for h in range(heads) for p in range(positions)]
    tokens = [[f" t{p}" for p in range(positions)]]
    rng = np.random.default_rng(0)
    values = SweepValues.empty(1, len(sites))
    values.corrupted[:] = 1.0  # a distance of 1 from the clean run (the donor, at 0)
    values.patched[0] = 1 + rng.normal(0, 0.05, len(sites))  # recoveries of about +-5 %
    result = PatchingResult(
        sites=sites, over=("layer", "head", "position"), component="self_attn", metric="kl",
        direction="denoise", metric_values=values, clean=["synthetic"], corrupted=["synthetic"],
        tokens=tokens, corrupted_tokens=tokens)
    path = result.to_html(tmp_path / "big.html")
    seconds = open_report(browser, path)
    drawn = browser.execute_script("return document.querySelectorAll('#grid rect').length")
    assert drawn == len(sites)
    assert hover(browser, len(sites) - 1).startswith("L31 H31 pos 39")
    with capsys.disabled():
        print(f"\n{len(sites)} sites: {path.stat().st_size / 2**20:.1f} MiB, opened in {seconds:.1f} s")


def test_every_axis_label_is_inside_its_drawing_and_the_page(browser, tmp_path):
    """The rotated position labels of a layer x position sweep were clipped on the left (and
    long ones at the bottom); every text of both views now lies inside its svg (what the svg
    clips) and the page, as laid out. Long tokens where the prompts differ make long labels."""
    tokens = [" supercalifragilistic", " expialidocious", " and", " so", " on"]
    corrupted = [" antidisestablishment", " arianism", " and", " so", " on"]
    sites = [{"layer": layer, "position": p} for layer in range(3) for p in range(5)]
    values = SweepValues.empty(1, len(sites))
    values.corrupted[:] = 1.0
    values.patched[0] = np.linspace(0.2, 1.0, len(sites))
    result = PatchingResult(sites=sites, over=("layer", "position"), component="input", metric="kl",
                            direction="denoise", metric_values=values, clean=["".join(tokens)],
                            corrupted=["".join(corrupted)], tokens=[tokens], corrupted_tokens=[corrupted])
    open_report(browser, result.to_html(tmp_path / "report.html"))
    outside = browser.execute_script("""
        const bad = [];
        for (const view of ["grid", "ranking"]) {
          document.getElementById(view).style.display = "";
          const page = document.documentElement.scrollWidth;
          for (const svg of document.querySelectorAll(`#${view} svg`)) {
            const frame = svg.getBoundingClientRect();
            for (const text of svg.querySelectorAll("text")) {
              const r = text.getBoundingClientRect();
              if (r.left < Math.max(frame.left, 0) - 0.5 || r.right > Math.min(frame.right, page) + 0.5
                  || r.top < frame.top - 0.5 || r.bottom > frame.bottom + 0.5) bad.push(text.textContent);
            }
          }
        }
        return bad;""")
    labels = browser.execute_script("return document.querySelectorAll('#grid svg text').length")
    assert labels == 3 + 5 and outside == []
