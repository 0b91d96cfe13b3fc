"""The tutorial notebook in a real browser: JupyterLab + headless Chromium driven by Playwright.

Runs every cell of ``notebooks/04_generation_panel.ipynb`` (a copy, so autosave never touches the repo), types a
prompt into the panel, clicks Generate and checks that text streams into the rendered output widget.
Screenshots go to ``tests/artifacts/browser/``.

Needs Debian's ``chromium`` at /usr/bin/chromium (Playwright's own browser download does not work here),
``playwright`` and ``jupyterlab`` (the dev extra).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "04_generation_panel.ipynb"
ARTIFACTS = ROOT / "tests" / "artifacts" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The news/update toast would cover part of the page and asks to be answered.
NO_NEWS = {"fetchNews": "false", "checkForUpdates": False}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (dev extra)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, token: str, path: str, method: str = "GET") -> object:
    request = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a loopback port with a token and its own config/runtime/workspace/settings dirs."""
    home = tmp_path_factory.mktemp("lab")
    workdir = home / "work"
    workdir.mkdir()
    shutil.copy(NOTEBOOK, workdir / NOTEBOOK.name)
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps(NO_NEWS))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings")}
    port, token = _free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    log = open(home / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--allow-root", "--no-browser", f"--port={port}",
         f"--ServerApp.token={token}", "--ServerApp.ip=127.0.0.1", f"--ServerApp.root_dir={workdir}"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                _api(base, token, "/api/status")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start; see {home / 'server.log'}")
                time.sleep(0.5)
        yield base, token
    finally:
        try:
            for session in _api(base, token, "/api/sessions"):
                _api(base, token, f"/api/sessions/{session['id']}", method="DELETE")
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()


def test_tutorial_runs_and_generate_streams_into_the_output_widget(lab, tmp_path):
    base, token = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000})
        try:
            page = browser.new_page()
            page.goto(f"{base}/lab/tree/{NOTEBOOK.name}?token={token}")
            # The notebook's own execution indicator says idle before the kernel is ready; the status bar does not.
            page.locator(".jp-StatusBar-TextItem", has_text="| Idle").first.wait_for(timeout=120_000)
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
            _wait_until_every_cell_ran(page, timeout_s=480)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            assert "Traceback" not in " ".join(errors.all_inner_texts())
            output = page.locator(".jupyter-widgets.widget-output").first
            output.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "01_after_run_all.png"))

            before = output.inner_text()
            prompt = page.locator(".widget-textarea textarea").first
            prompt.fill("Write one sentence about llamas.")
            page.locator(".jp-OutputArea-output .widget-button", has_text="Generate").click()
            texts = _poll_output_until_done(page, output, timeout_s=240)
            page.screenshot(path=str(ARTIFACTS / "02_after_generate.png"))
            n_tokens = int(page.locator(".rf-stats").inner_text().split(" tokens")[0])

            page.locator(".lm-TabBar-tab", has_text="Tokens").click()
            tokens = page.locator(".widget-tab .rf-token")  # the notebook also prints a static copy
            tokens.first.wait_for()
            assert tokens.count() == n_tokens
            assert tokens.first.get_attribute("title").startswith("p=")  # what hovering shows
            page.screenshot(path=str(ARTIFACTS / "03_tokens.png"))

            page.locator(".lm-TabBar-tab", has_text="Inside the model").click()
            page.locator(".widget-button", has_text="Look inside").click()
            lens = page.locator(".rf-logit-lens")
            lens.wait_for(timeout=180_000)
            assert "final" in lens.inner_text()
            assert page.locator(".rf-attention td").count() > 0
            page.screenshot(path=str(ARTIFACTS / "04_inside.png"))
        finally:
            browser.close()
    final = texts[-1].strip()
    assert final and final != before.strip()
    assert len({t for t in texts if t.strip()}) >= 2, f"text should stream in pieces, saw only {texts[-1:]}"
    print(f"screenshots in {ARTIFACTS}")


def _wait_until_every_cell_ran(page, timeout_s: float) -> None:
    """Every code cell shows an execution count ``[n]:`` (not ``[*]:`` or ``[ ]:``)."""
    page.wait_for_function(
        """() => {
            const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
            return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
        }""", timeout=timeout_s * 1000)


def _poll_output_until_done(page, output, timeout_s: float) -> list[str]:
    """Every distinct text the output widget showed until the panel's status said done or stopped."""
    status = page.locator(".widget-html", has_text=re.compile(r"^(ready|generating|done|stopped|error)"))
    texts: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = output.inner_text()
        if not texts or text != texts[-1]:
            texts.append(text)
        state = status.first.inner_text()
        if state.startswith("error"):
            pytest.fail(f"the panel reported {state}")
        if len(texts) > 1 and state.startswith(("done", "stopped")):
            return texts[1:]  # the first one is what was shown before the click
        time.sleep(0.05)
    pytest.fail(f"generation did not finish in {timeout_s} s; output so far: {texts[-1]!r}")
