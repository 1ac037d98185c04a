"""The real app in a real browser: every page loads a tiny run store without an exception.

Starts `streamlit run app/main.py` on a free port over a run store of tiny-random-llama, and
drives Debian's chromium (never a downloaded browser) through Playwright's executable_path.
SCREENSHOTS=<dir> saves a full-page screenshot of each page there.
"""

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from cache_builder.build import BuildSpec, build
from support import free_port, stop

ROOT = Path(__file__).resolve().parents[1]
PAGES = {"runs": "Runs", "prompt": "Prompt", "leaderboard": "Leaderboard", "logit-diff": "Logit difference by layer",
         "attention": "Attention", "mlp": "MLP", "probes": "Probes",
         "interventions": "Interventions", "sweep": "Attribution sweep", "mechanism": "Mechanism"}
START_TIMEOUT_S = 60
RUN_TIMEOUT_S = 60
SETTLE_S = 1.0


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200 and resp.read().decode().strip() == "ok"
    except OSError:
        return False


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is not installed (`apt-get install chromium`); "
                    "the browser test never downloads a browser")
    return path


@pytest.fixture(scope="module")
def app(chromium, tmp_path_factory):
    """(base URL, run name) of a streamlit server over a fresh tiny run store."""
    cache = tmp_path_factory.mktemp("cache")
    spec = BuildSpec("tiny-random-llama", "friedman2", 6, [0, 1, 2, 3, 4, 5],
                     regressors=["mean", "last", "linear", "knn", "gd-k10"], batch_size=3)
    build(spec, cache, progress=False)

    port = free_port()
    env = {**os.environ, "WORKBENCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    log_path = tmp_path_factory.mktemp("server") / "streamlit.log"
    log = open(log_path, "w+b")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def output() -> str:
        log.flush()
        return log_path.read_text(errors="replace")

    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(f"{base}/_stcore/health"):
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with code {proc.returncode}:\n{output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit not healthy after {START_TIMEOUT_S} s:\n{output()}")
            time.sleep(0.25)
        yield base, spec.name()
    finally:
        stop(proc)
        log.close()


def _wait_for_run(page) -> str | None:
    """Waits until the app is connected and its script has run and stopped; None, or what is wrong."""
    page.locator('[data-testid="stApp"]').wait_for(state="attached", timeout=RUN_TIMEOUT_S * 1000)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        state = page.evaluate("""() => {
            const app = document.querySelector('[data-testid="stApp"]');
            const status = document.querySelector('[data-testid="stStatusWidget"]');
            const shown = status !== null && status.offsetParent !== null;
            return {
                script: app && app.getAttribute('data-test-script-state'),
                connection: app && app.getAttribute('data-test-connection-state'),
                running: shown && (status.querySelector('[data-testid="stStatusWidgetRunningIcon"]') !== null
                                   || /running|connecting/i.test(status.innerText)),
            };
        }""")
        # "initial" until a script run has begun; then "running", and "notRunning" once it ended.
        done = (state["script"] in ("notRunning", "compilationError") and state["connection"] == "CONNECTED"
                and not state["running"])
        if done:
            page.wait_for_timeout(SETTLE_S * 1000)
            return None
        if time.monotonic() > deadline:
            return f"still running after {RUN_TIMEOUT_S} s ({state})"
        page.wait_for_timeout(250)


def _check_page(page, url: str, title: str) -> list[str]:
    page.goto(url, wait_until="domcontentloaded")
    problems = []
    stuck = _wait_for_run(page)
    if stuck:
        problems.append(stuck)
    if page.get_by_text("Page not found").count():
        problems.append("Streamlit says 'Page not found'")
    for exc in page.locator('[data-testid="stException"]').all():
        problems.append("exception:\n" + exc.inner_text().strip())
    headings = page.locator('[data-testid="stMain"] h1, section.main h1')
    texts = [h.inner_text().strip() for h in headings.all()]
    if title not in texts:
        problems.append(f"the page's heading {title!r} is missing (h1 texts: {texts})")
    return problems


def test_every_page_renders_without_exception(app, chromium):
    base, run = app
    shots = os.environ.get("SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
    failures = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(headless=True, executable_path=chromium,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            for path, title in PAGES.items():
                # The default page (Runs) lives at the root; /runs is "page not found".
                url = f"{base}/{'' if path == 'runs' else path}?run={run}"
                page = context.new_page()
                try:
                    problems = _check_page(page, url, title)
                except Exception as exc:  # a Playwright timeout or error: report it with the rest
                    problems = [f"{type(exc).__name__}: {exc}"]
                if shots:
                    try:
                        page.screenshot(path=str(Path(shots) / f"{path}.png"), full_page=True)
                    except Exception as exc:
                        problems.append(f"screenshot failed: {exc}")
                page.close()
                failures += [f"/{path}: {p}" for p in problems]
        finally:
            browser.close()
    assert not failures, "pages with problems:\n" + "\n\n".join(failures)
