"""The mask explorer in a real browser: JupyterLab on 127.0.0.1 driven by headless Chromium through playwright.

Runs the tutorial notebook nbs/41_mask_explorer.ipynb top to bottom in JupyterLab, checks that the widget's
controls are in the page, changes the image, checks that the rendered figure changes, and saves screenshots
under tests/artifacts/. Skips (with the reason) without Chromium, playwright or JupyterLab. Playwright's own
browser downloads are never used: Chromium comes from the system (`.ci/run` installs the Debian package).
"""
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
NOTEBOOK = ROOT / "nbs" / "41_mask_explorer.ipynb"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def _chromium() -> str:
    for c in (os.environ.get("MGAB_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser")):
        if c and Path(c).is_file(): return c
    pytest.skip("no Chromium (Debian package `chromium`; .ci/run installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(proc, url: str, log: Path, timeout: float = 60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None: pytest.fail(f"JupyterLab exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError: time.sleep(.3)
    pytest.fail(f"JupyterLab did not answer at {url} within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def chromium():
    "The system Chromium and python playwright, or a skip naming what is missing"
    pytest.importorskip("playwright.sync_api", reason="python playwright is not installed (dev extra)")
    return _chromium()


@pytest.fixture
def lab(tmp_path, chromium):
    "JupyterLab serving a temp folder with a copy of the explorer notebook; yields (base url, token, root, log)"
    pytest.importorskip("jupyterlab", reason="JupyterLab is not installed (dev extra)")
    root = tmp_path / "lab"; root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    settings = tmp_path / "settings" / "@jupyterlab"
    for ext, name, value in [("apputils-extension", "notification", dict(fetchNews="false", checkForUpdates=False)),
                             ("notebook-extension", "tracker", dict(autoStartDefaultKernel=True))]:
        (settings / ext).mkdir(parents=True, exist_ok=True)
        (settings / ext / f"{name}.jupyterlab-settings").write_text(json.dumps(value))  # no news, no kernel dialog
    port, token = _free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MGAB_DATA=str(tmp_path / "data"), PYTHONPATH=os.pathsep.join(
                   [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               MPLBACKEND="Agg")
    log = tmp_path / "jupyterlab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.news_url=", "--ServerApp.terminals_enabled=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0: cmd.append("--allow-root")  # CI containers run as root
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    try:
        _wait_for_server(proc, f"{base}/api/status?token={token}", log)
        yield base, token, root, log
    finally:  # ask JupyterLab to stop (it shuts its kernels down), then make sure its process group is gone
        try: urllib.request.urlopen(urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST"),
                                    timeout=5)
        except OSError: proc.terminate()
        try: proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill(); proc.wait(5)
        try: os.killpg(proc.pid, signal.SIGKILL)  # a kernel left behind (the group is this server's own session)
        except ProcessLookupError: pass


def _blob_digest(page, img) -> str:
    "SHA-1 of the bytes behind a widget <img> (its src is a blob: URL that changes with the figure)"
    data = page.evaluate("""async (el) => {
        const b = await (await fetch(el.src)).arrayBuffer();
        return Array.from(new Uint8Array(await crypto.subtle.digest('SHA-1', b)));
    }""", img.element_handle())
    return bytes(data).hex()


def test_mask_explorer_in_jupyterlab(chromium, lab):
    from playwright import sync_api
    base, token, root, log = lab
    ARTIFACTS.mkdir(exist_ok=True)
    t0 = time.time()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport=dict(width=1400, height=1300))
            page.goto(f"{base}/lab/tree/{NOTEBOOK.name}?token={token}", timeout=60_000)
            page.wait_for_selector(".jp-NotebookPanel .jp-Notebook", timeout=60_000)
            page.locator(".jp-StatusBar-Widget", has_text="Idle").first.wait_for(timeout=60_000)  # kernel ready
            for attempt in range(3):
                dialog = page.locator(".jp-Dialog .jp-mod-accept")  # "Select Kernel", should JupyterLab still ask
                if dialog.count(): dialog.first.click()
                # Run > Run All Cells, as a user would
                page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
                page.locator(".lm-Menu-itemLabel", has_text=re.compile("^Run All Cells$")).click()
                try:
                    page.wait_for_function("""() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
                        .some(e => /\\[(\\*|\\d+)\\]/.test(e.textContent))""", timeout=15_000)
                    break
                except sync_api.TimeoutError:
                    if attempt == 2: raise
            # wait until every code cell ran (numbered prompts, none pending) or one failed
            page.wait_for_function("""() => {
                const err = [...document.querySelectorAll('.jp-OutputArea-output')]
                    .some(e => e.textContent.includes('Traceback (most recent call last)'));
                const p = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent);
                return err || (p.length > 0 && p.every(t => /\\[\\d+\\]/.test(t))); }""", timeout=120_000)
            tracebacks = [t for t in page.locator(".jp-OutputArea-output").all_inner_texts() if "Traceback" in t]
            assert not tracebacks, tracebacks[0][-3000:]
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=30_000)
            # the explorer's first view: a widget <img> with a figure
            img = page.locator(".jp-OutputArea-output img.widget-image").first
            img.wait_for(state="visible", timeout=30_000)
            page.wait_for_function("el => el.src.startsWith('blob:') && el.naturalWidth > 100",
                                   arg=img.element_handle(), timeout=30_000)
            panel = page.locator(".jp-OutputArea-output .widget-vbox").first
            panel.evaluate("e => e.scrollIntoView({block: 'start'})")
            # the controls are in the page
            select = panel.locator(".widget-dropdown select").first
            assert select.count() == 1 and len(select.locator("option").all()) == 300  # the 300 validation images
            for label in ("image", "generator", "grid", "c", "pred", "stability", "patch", "ViT size", "tokens"):
                assert panel.locator(".widget-label", has_text=re.compile(f"^{label}$")).count() == 1, label
            for text in ("◀", "▶", "compare grids", "8", "16", "32", "nearest", "majority"):
                assert panel.locator("button", has_text=text).count() >= 1, text
            assert panel.locator(".widget-upload").count() == 1
            page.screenshot(path=str(ARTIFACTS / "mask_explorer_1_first_image.png"), full_page=False)
            before_src, before = img.get_attribute("src"), _blob_digest(page, img)
            first = select.input_value()
            # choose another image in the dropdown: the kernel redraws and the figure changes
            other = select.locator("option").nth(40).get_attribute("value")
            select.select_option(other)
            page.wait_for_function("([el, s]) => el.src !== s && el.naturalWidth > 100",
                                   arg=[img.element_handle(), before_src], timeout=30_000)
            after = _blob_digest(page, img)
            assert after != before and select.input_value() != first
            # a second control: the patch size changes the token grid, again a new figure
            panel.locator("button", has_text="32").last.click()
            page.wait_for_function("([el, s]) => el.src !== s", arg=[img.element_handle(), img.get_attribute("src")],
                                   timeout=30_000)
            assert _blob_digest(page, img) not in (before, after)
            # a button: "compare grids" redraws the second view (Fig. 3) for the newly chosen image
            grids = panel.locator("img.widget-image").nth(1)
            src = grids.get_attribute("src")
            panel.locator("button", has_text="compare grids").click()
            page.wait_for_function("([el, s]) => el.src !== s && el.naturalWidth > 100",
                                   arg=[grids.element_handle(), src], timeout=30_000)
            panel.evaluate("e => e.scrollIntoView({block: 'start'})")
            page.screenshot(path=str(ARTIFACTS / "mask_explorer_2_after_changes.png"), full_page=False)
            panel.screenshot(path=str(ARTIFACTS / "mask_explorer_3_widget.png"))
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "mask_explorer_failure.png"), full_page=True)
            print(log.read_text()[-4000:])
            raise
        finally:
            browser.close()
    assert time.time() - t0 < 150, "the browser test should stay well under two minutes"
