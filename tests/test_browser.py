"""The three explorers in a real browser: JupyterLab on 127.0.0.1 driven by headless Chromium through playwright.

Runs the tutorial notebook nbs/45_mask_explorer.ipynb top to bottom in JupyterLab, with cells appended that open a
tiny `BiasExplorer` and a `RunViewer` on toy runs (one kernel, one Run All). Checks that the controls are in the
page, that a click on the image picks the mask / the query token, that changing the image changes the figures and
the compare panel, that "export figures" writes PNG, SVG and JSON files, and saves screenshots under
tests/artifacts/. Skips (with the reason) without Chromium, playwright or JupyterLab. Playwright's own
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

from mgab.datasets import EMBEDDED_CLASSES, EMBEDDED_CONFIG

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
NOTEBOOK = ROOT / "nbs" / "45_mask_explorer.ipynb"
TOY_CELLS = [  # appended to the tutorial: the other two explorers on a tiny random model and toy runs
    """
import warnings
warnings.filterwarnings("ignore", category=FutureWarning)
import json, tempfile
from pathlib import Path
import numpy as np, pandas as pd, torch
from mgab.vit import create_vit
from mgab.widgets.runs import RunViewer
from mgab.widgets.bias import BiasExplorer
torch.manual_seed(0)
img = np.zeros((32, 32, 3), np.uint8); img[:16, :16] = (220, 60, 40); img[16:] = (40, 90, 230)
lm = np.zeros((32, 32), np.uint8); lm[:16, :16] = 1; lm[24:] = 2
vit = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3,
                 u_pos_init=2., u_neg_init=-2.)
bx = BiasExplorer(vit, {"a": img, "b": img[::-1].copy()}, {"a": lm, "b": lm[::-1].copy()})
bx""", """
tmp = Path(tempfile.mkdtemp())
for name, k, model in (("bias", 1., {}), ("vanilla", 1.5, dict(bias=None))):
    d = tmp / name; d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(method="mae", epochs=3, model=dict(
        name="vit_tiny_patch16_224", patch_size=8, depth=2, **model))))
    pd.DataFrame(dict(epoch=[0, 1, 2], train_loss=[1., .8 * k, .6 * k])).to_csv(d / "metrics.csv", index=False)
    (d / "bias_history.json").write_text(json.dumps([dict(epoch=e, u_pos=[[e * .1] * 3] * 2,
                                                          u_neg=[[-e * .1] * 3] * 2) for e in range(3)]))
rv = RunViewer(tmp)
rv"""]


def _notebook_with_toys() -> dict:
    "The mask explorer tutorial with the toy cells appended: one kernel and one Run All for the three explorers"
    nb = json.loads(NOTEBOOK.read_text())
    nb["cells"] += [dict(cell_type="code", execution_count=None, id=f"toy{i}", metadata={}, outputs=[],
                         source=src.strip()) for i, src in enumerate(TOY_CELLS)]
    return nb


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
    (root / NOTEBOOK.name).write_text(json.dumps(_notebook_with_toys()))
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
               MPLBACKEND="Agg", OMP_NUM_THREADS="1")  # the kernel's torch: one thread, as the tests' (conftest)
    log = tmp_path / "jupyterlab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.news_url=", "--ServerApp.terminals_enabled=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0: cmd.append("--allow-root")  # CI containers run as root
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    try:
        _wait_for_server(proc, f"{base}/api/status?token={token}", log)
        yield base, token, root, log, tmp_path / "data"
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


ACTIVE = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook on screen (JupyterLab restores other tabs too)


def _run_all(page, base: str, token: str, name: str):
    "Open notebook `name` in JupyterLab, Run > Run All Cells as a user would, wait for it, fail on a traceback"
    from playwright import sync_api
    page.goto(f"{base}/lab/tree/{name}?token={token}", timeout=60_000)
    page.wait_for_selector(f"{ACTIVE} .jp-Notebook", timeout=60_000)
    page.locator(".jp-StatusBar-Widget", has_text="Idle").first.wait_for(timeout=60_000)  # kernel ready
    for attempt in range(3):
        dialog = page.locator(".jp-Dialog .jp-mod-accept")  # "Select Kernel", should JupyterLab still ask
        if dialog.count(): dialog.first.click()
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile("^Run All Cells$")).click()
        try:
            page.wait_for_function("""(nb) => [...document.querySelectorAll(nb + ' .jp-InputArea-prompt')]
                .some(e => /\\[(\\*|\\d+)\\]/.test(e.textContent))""", arg=ACTIVE, timeout=15_000)
            break
        except sync_api.TimeoutError:
            if attempt == 2: raise
    # wait until every code cell ran (numbered prompts, none pending) or one failed
    page.wait_for_function("""(nb) => {
        const err = [...document.querySelectorAll(nb + ' .jp-OutputArea-output')]
            .some(e => e.textContent.includes('Traceback (most recent call last)'));
        const p = [...document.querySelectorAll(nb + ' .jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent);
        return err || (p.length > 0 && p.every(t => /\\[\\d+\\]/.test(t))); }""", arg=ACTIVE, timeout=120_000)
    out = page.locator(f"{ACTIVE} .jp-OutputArea-output")
    tracebacks = [t for t in out.all_inner_texts() if "Traceback" in t]
    assert not tracebacks, tracebacks[0][-3000:]
    stderr = page.locator(f"{ACTIVE} .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    warned = [t for t in stderr.all_inner_texts() if "Warning" in t]
    assert not warned, f"stray warnings under the cells of {name}: {warned[0][:500]}"
    page.wait_for_selector(f"{ACTIVE} .jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=30_000)


def _new_src(page, img, old: str, timeout=30_000):
    "Wait until widget <img> `img` shows a new figure (its blob: src changes)"
    page.wait_for_function("([el, s]) => el.src !== s && el.naturalWidth > 20", arg=[img.element_handle(), old],
                           timeout=timeout)
    return img.get_attribute("src")


def _exported(page, panel, data: Path, stem: str) -> list[str]:
    "Click 'export figures' and return the names of the files that appeared under `data/exports`"
    before = set(p.name for p in (data / "exports").glob("*")) if (data / "exports").is_dir() else set()
    panel.locator("button", has_text="export figures").click()
    panel.locator(".widget-html", has_text="exported").first.wait_for(timeout=30_000)
    return sorted(p.name for p in (data / "exports").glob(f"{stem}*") if p.name not in before)


def test_explorers_in_jupyterlab(chromium, lab):
    from playwright import sync_api
    base, token, root, log, data = lab
    ARTIFACTS.mkdir(exist_ok=True)
    t0 = time.time()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport=dict(width=1440, height=900))
        try:
            # -- the mask explorer tutorial, top to bottom
            _run_all(page, base, token, NOTEBOOK.name)
            panel = page.locator(f"{ACTIVE} .mgab-maskexplorer").first
            panel.evaluate("e => e.scrollIntoView({block: 'start'})")
            masks = panel.locator("img.mgab-view-masks")
            masks.wait_for(state="visible", timeout=30_000)
            page.wait_for_function("el => el.src.startsWith('blob:') && el.naturalWidth > 100",
                                   arg=masks.element_handle(), timeout=30_000)
            # natural size: the 2x PNG shown at most at half its pixel width, never stretched to the page
            w, nat = masks.evaluate("e => [e.getBoundingClientRect().width, e.naturalWidth]")
            assert nat / 2 - 2 < w < nat / 2 + 2, (w, nat)
            select = panel.locator(".widget-dropdown select").first
            n_val = EMBEDDED_CONFIG["n_val"] * len(EMBEDDED_CLASSES)  # the embedded validation images
            assert len(select.locator("option").all()) == n_val
            for label in ("image", "generator", "grid", "c", "pred", "stability", "patch", "ViT size", "tokens"):
                assert panel.locator(".widget-label", has_text=re.compile(f"^{label}$")).count() == 1, label
            for text in ("◀", "▶", "compare grids", "export figures", "nearest", "majority"):
                assert panel.locator("button", has_text=text).count() >= 1, text
            assert "sam generator only" in panel.inner_text()  # greyed-out thresholds say why
            page.screenshot(path=str(ARTIFACTS / "mask_explorer_1_first_image.png"))
            # compare grids, then another image: the compare panel follows (never the previous image)
            grids = panel.locator("img.mgab-view-grids")
            panel.locator("button", has_text="compare grids").click()
            page.wait_for_function("el => el.naturalWidth > 100", arg=grids.element_handle(), timeout=30_000)
            g0, m0, d0 = grids.get_attribute("src"), masks.get_attribute("src"), _blob_digest(page, grids)
            select.select_option(select.locator("option").nth(40).get_attribute("value"))
            _new_src(page, masks, m0); _new_src(page, grids, g0)
            assert _blob_digest(page, grids) != d0
            # a click on the image picks the mask under it (the token buttons lie over the picture)
            mask_box = panel.locator(".mgab-mask input")
            picker = panel.locator(".mgab-token-picker")
            picker.scroll_into_view_if_needed()
            m1 = masks.get_attribute("src")
            for x, y in ((.5, .5), (.1, .1), (.9, .9), (.3, .7)):
                picker.click(position=dict(x=224 * x, y=224 * y))
                page.wait_for_timeout(300)
                if mask_box.input_value() != "0": break
            assert mask_box.input_value() != "0", "a click on the image picked no mask"
            _new_src(page, masks, m1)
            files = _exported(page, panel, data, "maskexplorer")
            assert {f.rsplit(".", 1)[1] for f in files} == {"png", "svg", "json"}, files
            assert any(f.endswith("-masks.svg") for f in files) and any(f.endswith("-grids.png") for f in files)
            panel.evaluate("e => e.scrollIntoView({block: 'start'})")
            page.screenshot(path=str(ARTIFACTS / "mask_explorer_2_after_changes.png"))
            panel.screenshot(path=str(ARTIFACTS / "mask_explorer_3_widget.png"))

            # -- the bias explorer and the run viewer on a tiny model and toy runs (the appended cells)
            bxp = page.locator(f"{ACTIVE} .mgab-biasexplorer").first
            bxp.evaluate("e => e.scrollIntoView({block: 'start'})")
            att = bxp.locator("img.mgab-view-attention")
            page.wait_for_function("el => el.naturalWidth > 100", arg=att.element_handle(), timeout=30_000)
            qbox = bxp.locator(".mgab-query-text input")
            assert qbox.input_value() == "10"  # the middle token of the 4 x 4 grid
            a0 = att.get_attribute("src")
            bxp.locator(".mgab-token-picker").click(position=dict(x=3 * 64 + 32, y=1 * 64 + 32))  # token 7
            page.wait_for_function("el => el.value === '7'", arg=qbox.element_handle(), timeout=30_000)
            _new_src(page, att, a0)
            assert "token 7" in bxp.locator(".mgab-token").nth(7).get_attribute("title")  # hover text
            page.screenshot(path=str(ARTIFACTS / "bias_explorer_1_clicked_query.png"))
            sel = bxp.locator(".widget-dropdown select").first
            a1 = att.get_attribute("src"); sel.select_option("b"); _new_src(page, att, a1)
            files = _exported(page, bxp, data, "biasexplorer")
            assert sum(f.endswith(".png") for f in files) == 3 and sum(f.endswith(".json") for f in files) == 1
            bxp.screenshot(path=str(ARTIFACTS / "bias_explorer_2_widget.png"))
            rvp = page.locator(f"{ACTIVE} .mgab-runviewer").first
            rvp.evaluate("e => e.scrollIntoView({block: 'start'})")
            loss = rvp.locator("img.mgab-view-loss")
            page.wait_for_function("el => el.naturalWidth > 100", arg=loss.element_handle(), timeout=30_000)
            assert "patch 8, depth 2" in rvp.inner_text() and "both" in rvp.inner_text()  # truthful labels
            l0 = loss.get_attribute("src")
            rvp.locator(".widget-dropdown select").nth(1).select_option(label="bias")  # minus run: bias
            _new_src(page, loss, l0)
            rvp.screenshot(path=str(ARTIFACTS / "run_viewer_1_widget.png"))
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "explorers_failure.png"), full_page=True)
            print(log.read_text()[-4000:])
            raise
        finally:
            browser.close()
    assert time.time() - t0 < 150, "the browser test should stay well under two minutes"
