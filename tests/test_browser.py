"""One real-browser test: ``streamlit run`` (the exact command ``hiddenlens dashboard`` uses) on a free local port,
driven by Debian's Chromium through Playwright. Visits every page, checks its key content and that no error or
exception is shown, clicks a head in the sink grid (a heatmap), turns the sidebar's "Prepend BOS" off and on, and
saves a 1280x900 screenshot of each page to docs/figures/dashboard/ (docs/dashboard.md shows them)."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[1] / "docs" / "figures" / "dashboard"
OFFLINE_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read() == b"ok":
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url}/_stcore/health did not answer ok within {timeout} s")


@pytest.fixture
def server(tmp_path):
    from test_dashboard import _truth_run, _write_report

    runs = tmp_path / "runs"
    _write_report(runs / "truth-probe")
    _truth_run(runs / "truth")
    with streamlit_server(runs, tmp_path) as (url, _):
        yield url, runs


@contextlib.contextmanager
def streamlit_server(runs: Path, cwd: Path):
    """A live dashboard on tiny-llama (the exact ``streamlit run`` command ``hiddenlens dashboard`` uses) on a free
    local port, serving ``runs``: yields ``(url, port)``; stopped when the block ends."""
    from hiddenlens.cli.dashboard import streamlit_command

    port = free_port()
    argv, env = streamlit_command("tiny-llama", port=port, runs=str(runs))
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_idle(page, timeout: float = 120_000) -> None:
    page.wait_for_timeout(200)  # let a click's rerun start before waiting for the script to finish
    page.wait_for_selector("[data-testid=stApp][data-test-script-state=notRunning]", timeout=timeout)
    # a busy machine draws lazily loaded elements (metrics, tables) a moment after the script ends: skeletons first
    page.wait_for_function("!document.querySelector('[data-testid=stSkeleton]')", timeout=30_000)
    page.wait_for_timeout(300)


def check_page(page, errors: list[str], title: str, shot: str, min_charts: int = 0) -> None:
    page.get_by_role("heading", name=title).first.wait_for(timeout=60_000)
    wait_idle(page)
    if min_charts:
        page.get_by_test_id("stPlotlyChart").nth(min_charts - 1).wait_for(timeout=60_000)
        page.wait_for_timeout(500)  # plotly draws after the element appears
    assert page.get_by_test_id("stException").count() == 0, f"{title}: exception shown"
    assert page.get_by_test_id("stAlertContentError").count() == 0, \
        f"{title}: error shown: {page.get_by_test_id('stAlertContentError').all_inner_texts()}"
    assert not errors, f"{title}: page errors {errors}"
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{shot}.png"))


def visit(page, errors: list[str], link: str, title: str, shot: str, min_charts: int = 0) -> None:
    page.get_by_role("link", name=link).click()
    check_page(page, errors, title, shot, min_charts)


@pytest.mark.browser
def test_every_page_in_chromium(server):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "Debian's chromium is needed (README set-up: apt-get install chromium)"
    url, runs = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=OFFLINE_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("[data-testid=stSidebar]", timeout=90_000)
            check_page(page, errors, "Overview", "overview")
            metrics = page.get_by_test_id("stMetricValue")
            metrics.nth(4).wait_for(timeout=30_000)  # a busy machine draws the metrics a moment after the script ends
            assert metrics.first.inner_text() == "tiny-llama"
            assert "Running tiny-llama on cpu" in page.get_by_test_id("stSidebar").inner_text()
            box = page.get_by_label("Prompt (shared by all pages)")
            box.fill("The capital of France is Paris. The capital of Italy is")
            box.press("Control+Enter")
            wait_idle(page)

            visit(page, errors, "Latent dynamics", "Latent dynamics", "dynamics", min_charts=3)
            assert box.input_value().endswith("Italy is"), "the prompt survives a page change"

            visit(page, errors, "Attention sinks", "Attention sinks", "sinks", min_charts=3)
            grid = page.get_by_test_id("stPlotlyChart").first
            assert grid.locator(".heatmaplayer").count() == 1, "the head grid is a heatmap"
            area = grid.locator(".nsewdrag").first.bounding_box()  # the plot area: axes span -0.5 .. n - 0.5
            n_layers = n_heads = 4  # tiny-llama
            layer, head = 1, 2
            page.mouse.click(area["x"] + (head + 0.85) / n_heads * area["width"],  # as a user clicks: in the
                             area["y"] + (1 - (layer + 0.2) / n_layers) * area["height"])  # cell, off its centre
            wait_idle(page)
            page.get_by_text(f"Dormancy of L{layer}H{head}").wait_for(timeout=30_000)
            main = page.get_by_test_id("stMain")
            assert "Position 0 is the tokenizer's BOS" in main.inner_text()
            bos = page.get_by_test_id("stSidebar").get_by_text("Prepend BOS")
            bos.click()  # BOS off: position 0 becomes the prompt's first token, on this page and the others
            wait_idle(page)
            page.get_by_text("BOS is off in the sidebar").wait_for(timeout=30_000)
            assert "Attention pattern L1H2" in main.inner_text()
            bos.click()  # back on (the default) for the screenshot
            wait_idle(page)
            check_page(page, errors, "Attention sinks", "sinks", min_charts=3)
            assert "Position 0 is the tokenizer's BOS" in main.inner_text()

            visit(page, errors, "Intention", "Intention", "intention")
            assert "H_int of the prompt" in page.get_by_test_id("stMain").inner_text()

            page.get_by_role("link", name="Truthful directions").click()
            folder = page.get_by_label("Report folder of `hiddenlens truth directions`")
            folder.fill(str(runs / "truth"))
            folder.press("Enter")
            page.get_by_test_id("stMetricLabel").filter(has_text="p_true").first.wait_for(timeout=120_000)
            check_page(page, errors, "Truthful directions", "truth", min_charts=2)

            visit(page, errors, "Semantic leakage", "Semantic leakage", "leakage", min_charts=2)
            main = page.get_by_test_id("stMain").inner_text()
            assert "replaced at blocks" in main and "capital of Italy is" in main, "the shared prompt is used"

            visit(page, errors, "Latent iteration", "Latent iteration", "iteration", min_charts=1)
            assert "Tokens iterated" in page.get_by_test_id("stMain").inner_text()

            page.get_by_role("link", name="Results").click()
            folder = page.get_by_label("Results folder")
            folder.fill(str(Path(__file__).parent))  # a folder with no results: an error on the page, no crash
            folder.press("Enter")
            wait_idle(page)
            assert page.get_by_test_id("stAlertContentError").count() == 1
            assert page.get_by_test_id("stException").count() == 0
            page.get_by_test_id("stSelectbox").filter(has_text="Runs found").click()
            page.get_by_role("option", name=str(runs / "truth-probe")).click()
            wait_idle(page)
            wait_idle(page)
            check_page(page, errors, "Results", "results")  # the Report tab: report.md with its figure in place
            assert page.get_by_test_id("stImage").count() == 2  # the figure: in report.md and in the Figures tab
            page.get_by_role("link", name="Overview").click()  # the folder is remembered across a page change
            check_page(page, errors, "Overview", "overview")
            page.get_by_role("link", name="Results").click()
            page.get_by_text("Opened ").first.wait_for(timeout=60_000)
            assert page.get_by_label("Results folder").input_value() == str(runs / "truth-probe")
        finally:
            browser.close()
