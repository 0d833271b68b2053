"""Notebook 06 in a real browser: JupyterLab on localhost, headless Debian Chromium via playwright.

Runs a copy of the notebook with tiny parameters (a tiny random base and random teachers), moves
the explorer's step slider and checks that the state image and the KL/MAR curve (its step marker)
re-render in the page. Screenshots go to test-artifacts/. Skips with the reason when Chromium or
playwright is missing (`.ci/run` installs Chromium with apt where it can).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from flowopd_lib import adapters
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NEWS_OFF = {"fetchNews": "false", "checkForUpdates": False}  # the "Jupyter news?" toast covers the page

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)")]


def tiny_notebook(directory: Path) -> Path:
    """Notebook 06 with tiny parameters injected (papermill's way), next to its tiny models."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    model = tiny_model()
    base = str(model.save(directory / "base"))
    teachers = {}
    for task in ("geneval", "ocr"):
        adapters.add(model, task, rank=2, gaussian_init=False)
        teachers[task] = str(adapters.save(model, task, directory / "teachers" / task))
    params = dict(base=base, teachers=teachers, student=teachers["ocr"], steps=4, group_size=2,
                  out_dir=str(directory / "out"))
    nb = parameterize_notebook(load_notebook_node(str(ROOT / "notebooks" / "06_trajectory_explorer.ipynb")), params)
    path = directory / "06_tiny.ipynb"
    nbformat.write(nb, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(directory: Path, port: int) -> subprocess.Popen:
    """jupyter-lab on localhost, no token, its settings and workspaces in `directory`."""
    settings = directory / "lab-settings"
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(json.dumps(NEWS_OFF))
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(directory),
           "JUPYTER_RUNTIME_DIR": str(directory / "runtime"), "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "jupyter-lab"), "--allow-root", "--no-browser", "--ip=127.0.0.1",
               f"--port={port}", "--ServerApp.token=", "--ServerApp.password=", f"--ServerApp.root_dir={directory}",
               "--LabApp.expose_app_in_browser=True"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=open(directory / "lab.log", "w"))
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=2)
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"jupyter-lab did not answer on port {port}; see {directory / 'lab.log'}")


def launch_chromium(playwright, directory: Path):
    """Headless Debian Chromium with a fresh profile under `directory`, a 1400x1000 viewport."""
    return playwright.chromium.launch_persistent_context(tempfile.mkdtemp(dir=directory), executable_path=str(CHROMIUM),
                                                         headless=True, args=CHROMIUM_ARGS,
                                                         viewport={"width": 1400, "height": 1000})


def stop_lab(server: subprocess.Popen) -> None:
    """Stop jupyter-lab: a polite terminate, then a kill if it is still shutting its kernels down
    after 30 s (a loaded machine is slow to, and the test's result does not depend on it)."""
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=30)


KERNEL_IDLE = "window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel?.status === 'idle'"


def image_sources(page) -> dict[str, str]:
    return {name: page.get_attribute(f"img.flowopd-{name}", "src") for name in ("state", "student", "curve")}


def test_notebook_runs_in_jupyterlab_and_the_slider_rerenders(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing (pip install -e '.[dev]')")
    notebook = tiny_notebook(tmp_path)
    port = free_port()
    server = start_lab(tmp_path, port)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = launch_chromium(p, tmp_path)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/lab/tree/{notebook.name}")
            page.wait_for_function(KERNEL_IDLE, timeout=90_000)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            page.get_by_text("saved: [").wait_for(timeout=240_000)  # the last cell's output
            page.wait_for_function(KERNEL_IDLE, timeout=60_000)
            widget = page.locator(".jp-OutputArea-output").filter(has=page.locator("img.flowopd-state"))
            widget.scroll_into_view_if_needed()
            before, shot_before = image_sources(page), widget.screenshot(path=str(ARTIFACTS / "explorer_step0.png"))
            assert page.inner_text(".flowopd-slider .widget-readout") == "0"

            page.focus(".flowopd-slider .noUi-handle")
            for _ in range(2):
                page.keyboard.press("ArrowRight")
            page.wait_for_function(f"document.querySelector('img.flowopd-curve').src !== {json.dumps(before['curve'])}",
                                   timeout=30_000)
            time.sleep(0.5)  # let the other images swap in as well
            after, shot_after = image_sources(page), widget.screenshot(path=str(ARTIFACTS / "explorer_step2.png"))
            readout = page.inner_text(".flowopd-slider .widget-readout")
            page.screenshot(path=str(ARTIFACTS / "explorer_page.png"), full_page=True)
            browser.close()
    finally:
        stop_lab(server)
    assert readout == "2", f"the slider reads {readout} after two ArrowRight presses"
    unchanged = [name for name in before if after[name] == before[name]]
    assert not unchanged, f"these images did not re-render after the slider moved: {unchanged}"
    assert shot_before != shot_after, "the widget looks the same after moving the slider"
