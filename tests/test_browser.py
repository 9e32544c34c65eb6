"""The notebooks' widgets in a real browser: JupyterLab on localhost, driven by headless Chromium.

nbmake executes the cells, but only a browser shows that a widget is wired up: that the
JupyterLab widget manager renders it, that moving a control reaches the kernel, and that the
plot it draws comes back. Each case starts JupyterLab with a token on a free port (its config,
data and runtime directories temporary), opens a notebook in Chromium through Playwright,
runs its cells, moves one control and waits for the widget's image to change, then checks
that no cell and no widget callback raised. On failure a screenshot and the server's log are
left in the test's tmp_path (the assertion message says where).

Needs Debian's `chromium` (/usr/bin/chromium) and the Python `playwright` package; Playwright's
own browser download is never used (PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1, no `playwright install`).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.xdist_group("browser"),     # one JupyterLab for both cases under pytest -n
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: apt-get install -y chromium"),
]
os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
playwright_sync = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install playwright")

TIMEOUT_MS = 240_000       # one cell or one widget update on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_notebook(name: str, dest: Path, keep=None) -> Path:
    """notebooks/<name> into dest/notebooks/, outputs and widget state cleared; only the code
    cells `keep` accepts."""
    nb = json.loads((ROOT / "notebooks" / name).read_text())
    if keep is not None:
        nb["cells"] = [c for c in nb["cells"] if c["cell_type"] == "code" and keep("".join(c["source"]))]
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    nb["metadata"].pop("widgets", None)       # the committed run's widget state, as outputs
    path = dest / "notebooks" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1))
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server rooted at a temporary copy tree (results/ linked): (url, token, root, log)."""
    root = tmp_path_factory.mktemp("lab")
    (root / "results").symlink_to(ROOT / "results")          # ../results, as from notebooks/
    home = root / ".jupyter-home"
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTERLAB_WORKSPACES_DIR=str(home / "ws"),
               JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), OOC_MOE_QUICK="1",
               OMP_NUM_THREADS="1", MPLBACKEND="module://matplotlib_inline.backend_inline")
    # no announcements popup, no news check: nothing on the page but the notebook
    (home / "settings" / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (home / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings") \
        .write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = free_port(), "ooc-moe-browser-test"
    log = root / "jupyterlab.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0"]
        + (["--allow-root"] if os.geteuid() == 0 else []),
        cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start; its log:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url, token, root, log
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


def accept_kernel_dialog(page) -> None:
    """JupyterLab may ask which kernel to use (when a notebook opens while another session
    is starting): accept its preselected one, the notebook's own python3."""
    dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
    if dialog.count():
        dialog.locator(".jp-mod-accept").click()


def click_run_all(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def run_all(page):
    """Run > Run All Cells once the kernel is connected (again if no cell started: a click
    while the kernel is still connecting can be lost), then wait until every cell ran."""
    page.wait_for_function("() => document.body.innerText.includes('(ipykernel) | Idle')")
    prompts = "[...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]"
    started = f"() => {prompts}.some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))"
    finished = (f"() => {prompts}.length > 0 && "
                f"{prompts}.every(p => /\\[\\d+\\]/.test(p.textContent))")
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    for attempt in range(3):
        accept_kernel_dialog(page)
        click_run_all(page)
        try:
            page.wait_for_function(started, timeout=30_000, polling=500)
            break
        except playwright_sync.TimeoutError:
            continue
    while not page.evaluate(finished):
        accept_kernel_dialog(page)
        assert time.monotonic() < deadline, "the cells did not finish running"
        page.wait_for_timeout(1000)


def widget_images(page) -> str:
    """The src of every image drawn inside a widget's output area, joined."""
    return page.evaluate(
        "() => [...document.querySelectorAll('.widget-output img')].map(i => i.src).join('|')")


def wait_for_change(page, before: str):
    page.wait_for_function(
        """before => {
            const imgs = [...document.querySelectorAll('.widget-output img')];
            const now = imgs.map(i => i.src).join('|');
            return imgs.length > 0 && now !== before;
        }""", arg=before, timeout=TIMEOUT_MS, polling=500)


def save(page, path: Path, timeout_s: float = 120) -> dict:
    """Save the notebook from the browser and return it as written: the server rewrites the
    file in place, so poll until it parses with every code cell run (the copy had none)."""
    page.keyboard.press("Control+s")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            nb = json.loads(path.read_text())
            if all(c["execution_count"] for c in nb["cells"] if c["cell_type"] == "code"):
                return nb
        except json.JSONDecodeError:
            pass                                       # caught mid-write
        assert time.monotonic() < deadline, f"{path.name} was not saved with its outputs"
        page.wait_for_timeout(500)


def assert_no_errors(page, saved: dict):
    tracebacks = page.evaluate(
        """() => [...document.querySelectorAll('.jp-OutputArea-output')]
                 .map(o => o.innerText).filter(t => /Traceback|Error:/.test(t))""")
    assert not tracebacks, "an output shows an error:\n" + "\n---\n".join(tracebacks)[:4000]
    errors = [o for c in saved["cells"] if c["cell_type"] == "code"
              for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"the kernel raised: {[(e['ename'], e['evalue']) for e in errors]}"


def drive(lab, browser, tmp_path, name, keep, move):
    """Open `name` (a copy with the cells `keep` accepts), run it, `move` a control, check."""
    url, token, root, log = lab
    path = copy_notebook(name, root, keep)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    try:
        # a workspace of its own, reset: no tab of an earlier case comes back beside it
        page.goto(f"{url}/lab/workspaces/{Path(name).stem}/tree/notebooks/{name}"
                  f"?reset&token={token}")
        page.wait_for_selector(".jp-Notebook .jp-CodeCell")
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")
        run_all(page)
        page.wait_for_selector(".widget-output img")
        before = widget_images(page)
        move(page)
        wait_for_change(page, before)
        page.wait_for_timeout(500)
        assert_no_errors(page, save(page, path))
    except BaseException as exc:
        shot = tmp_path / f"{Path(name).stem}-failure.png"
        page.screenshot(path=str(shot), full_page=True)
        shutil.copy(log, tmp_path / "jupyterlab.log")
        raise AssertionError(f"{exc}\nscreenshot: {shot}\nJupyterLab log: {tmp_path / 'jupyterlab.log'}") from exc
    finally:
        page.close()


def move_hbm_slider(page):
    """Type a new value into the "HBM slots" slider's readout (as a user can), then Enter."""
    slider = page.locator(".widget-slider", has=page.locator("label", has_text="HBM slots"))
    readout = slider.locator(".widget-readout")
    readout.scroll_into_view_if_needed()      # JupyterLab does not render cells out of view
    value = int(readout.text_content())
    readout.click()
    page.keyboard.press("Control+a")
    page.keyboard.type(str(value + 8 if value + 8 <= 32 else value - 4))
    page.keyboard.press("Enter")


def pick_other_game(page):
    """Pick another entry in the widget's "game" menu (then another layer and run, if any)."""
    for label in ("game", "layer", "run"):
        menu = page.locator(".widget-dropdown", has=page.locator("label", has_text=label)).locator("select")
        options = menu.locator("option").all_inner_texts()
        if len(options) > 1:
            menu.select_option(label=options[1])
            return
    pytest.fail("the run/layer/game picker offers a single choice everywhere")


def test_notebook_01_hbm_slider_redraws(lab, browser, tmp_path):
    drive(lab, browser, tmp_path, "01_tiered_store.ipynb", None, move_hbm_slider)


SECTION_3 = ("QUICK = None", "quick_mode(QUICK)", 'ATARI = RESULTS / "atari"', "moe_run =",
             "sequential_results_widget(atari_runs)")


def test_notebook_05_picker_redraws(lab, browser, tmp_path):
    # the committed Atari results and the picker; section 2's training run is nbmake's to execute
    drive(lab, browser, tmp_path, "05_sequential_atari.ipynb",
          lambda source: any(key in source for key in SECTION_3), pick_other_game)
