"""An executed notebook in JupyterLab: its figures render in a real browser (headless Chromium).

Executes notebook 00 with tiny parameters (a tiny random base and random teachers, as
tests/test_notebooks.py does), opens the executed copy in JupyterLab without running it, and checks
that every figure the notebook saved as an output is drawn in the page (a loaded <img> with a size),
and that no output area shows an error or a warning box. A screenshot goes to test-artifacts/.
Skips with the reason when Chromium or playwright is missing (`.ci/run` installs Chromium with apt).
"""
from __future__ import annotations

import json

import pytest
import torch

from flowopd_lib import notebook
from flowopd_lib.models.toy import ToyFlowModel
from test_explorer_browser import ARTIFACTS, CHROMIUM, free_port, launch_chromium, start_lab, stop_lab
from test_notebooks import NOTEBOOKS, random_teachers

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)")]

RENDERED = """() => Array.from(document.querySelectorAll('.jp-OutputArea-output img'))
                  .filter(img => img.complete && img.naturalWidth > 0 && img.getBoundingClientRect().width > 0).length"""


def executed_quickstart(directory) -> tuple[str, int]:
    """Notebook 00 run with tiny parameters; returns its file name and how many PNG outputs it holds."""
    torch.manual_seed(0)
    base = str(ToyFlowModel("tiny").save(directory / "tiny_base"))
    params = dict(base=base, teachers=random_teachers(base, directory / "teachers"), opd_updates=1, eval_prompts=4,
                  eval_samples=1, out_dir=str(directory / "out"))
    notebook.execute(NOTEBOOKS / "00_quickstart.ipynb", directory / "00_executed.ipynb", params, cwd=directory)
    cells = json.loads((directory / "00_executed.ipynb").read_text())["cells"]
    figures = sum("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", []))
    return "00_executed.ipynb", figures


def test_an_executed_notebook_shows_its_figures_in_jupyterlab(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing (pip install -e '.[dev]')")
    name, figures = executed_quickstart(tmp_path)
    assert figures >= 3  # the KL curve, the paired changes, the sample grid
    port = free_port()
    server = start_lab(tmp_path, port)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = launch_chromium(p, tmp_path)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/lab/tree/{name}")
            page.locator(".jp-OutputArea-output").first.wait_for(timeout=90_000)
            for output in page.locator(".jp-OutputArea-output img").all():  # JupyterLab draws cells lazily
                output.scroll_into_view_if_needed()
            page.wait_for_function(f"({RENDERED})() >= {figures}", timeout=60_000)
            rendered = page.evaluate(RENDERED)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
            page.screenshot(path=str(ARTIFACTS / "quickstart_page.png"), full_page=True)
            browser.close()
    finally:
        stop_lab(server)
    assert rendered >= figures, f"{rendered} of the notebook's {figures} figures were drawn"
    assert not [e for e in errors if "warn" in e.lower() or "Error" in e], errors
