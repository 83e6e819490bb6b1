"""Hostile cases for the dashboard's Results page: paths out of the runs root, links, remote images in a report,
huge tables and reports, broken figures. Streamlit's AppTest, and one real-browser test (Chromium + Playwright)."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pandas as pd
import pytest
from test_browser import CHROMIUM, OFFLINE_FLAGS, streamlit_server, wait_idle
from test_dashboard import fresh_caches, run_page  # noqa: F401 - fresh_caches: autouse fixture (env, caches)

from hiddenlens.dashboard import results

REMOTE = ("http://evil.example/a.png", "https://evil.example/b.png", "//evil.example/c.png",
          "data:image/png;base64,iVBORw0KGgo=")
REPORT = """# Findings

![local figure](fig.png)

![remote](http://evil.example/a.png) and ![tracker]( https://evil.example/b.png "t")
![protocol relative](//evil.example/c.png) ![inline](data:image/png;base64,iVBORw0KGgo=)
<img src="http://evil.example/d.png"> ![by reference][r]

[r]: http://evil.example/e.png
"""


def png_bytes(size: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), "red").save(buf, format="PNG")
    return buf.getvalue()


def make_run(folder: Path, report: str = "# ok\n", **files: bytes | str) -> Path:
    """A small run folder: summary.json, report.md, fig.png and ``files``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"auroc": 0.75}))
    (folder / "report.md").write_text(report)
    (folder / "fig.png").write_bytes(png_bytes())
    for name, data in files.items():
        (folder / name.replace("__", ".")).write_bytes(data if isinstance(data, bytes) else data.encode())
    return folder


@pytest.fixture
def runs(tmp_path) -> Path:
    """The runs root the dashboard serves (``fresh_caches`` points HIDDENLENS_RUNS_DIR at it)."""
    (tmp_path / "runs").mkdir()
    return tmp_path / "runs"


def open_page(path: str):
    at = run_page("results")
    at.text_input(key="res_path").input(path).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def markdown_sent(at) -> str:
    return "\n".join(m.value for m in at.markdown)


# ---- paths -------------------------------------------------------------------------------------------------------
def escape(kind: str, runs: Path) -> str:
    """A path that leads out of ``runs`` to a readable run folder or file (``outside``)."""
    outside = make_run(runs.parent / "outside", report="# TOPSECRET\n")
    if kind == "absolute":
        return str(outside)
    if kind == "dotdot":
        return os.path.relpath("/", Path.cwd()) + str(outside)  # ../../.. up to / from the working directory
    target = Path("/etc/passwd") if kind == "link to a file" else outside
    (runs / "innocent").symlink_to(target)
    return str(runs / "innocent")


@pytest.mark.parametrize("kind, why", [
    pytest.param("absolute", "outside the runs root", marks=pytest.mark.hostile(
        "dashboard", "Results page: absolute path outside the runs root", expect="error", risk="security")),
    pytest.param("dotdot", "outside the runs root", marks=pytest.mark.hostile(
        "dashboard", "Results page: ../../.. relative path out of the runs root", expect="error", risk="security")),
    pytest.param("link to a file", "symbolic link", marks=pytest.mark.hostile(
        "dashboard", "Results page: link in the runs folder to /etc/passwd", expect="error", risk="security")),
    pytest.param("link to a folder", "symbolic link", marks=pytest.mark.hostile(
        "dashboard", "Results page: link in the runs folder to a folder outside it", expect="error",
        risk="security")),
])
def test_results_page_refuses_paths_out_of_the_runs_root(runs, kind, why):
    at = open_page(escape(kind, runs))
    assert len(at.error) == 1 and why in at.error[0].value and "Cannot open this results folder" in at.error[0].value
    assert not at.success and not at.json and not at.dataframe and not at.get("image")
    assert "TOPSECRET" not in markdown_sent(at) and "root:" not in markdown_sent(at)


@pytest.mark.hostile("dashboard", "Results page: a run folder holding a link to a file outside it",
                     expect="works", risk="security")
def test_links_inside_a_run_folder_are_not_read(runs, tmp_path):
    (tmp_path / "secret.md").write_text("TOPSECRET")
    folder = make_run(runs / "truth" / "r1")
    (folder / "notes.md").symlink_to(tmp_path / "secret.md")
    (folder / "fig2.png").symlink_to(folder / "fig.png")
    at = open_page(str(folder))
    assert at.success and at.json
    warned = " ".join(w.value for w in at.warning)
    assert "notes.md could not be read: skipped: a symbolic link" in warned and "fig2.png" in warned
    assert "TOPSECRET" not in markdown_sent(at)
    assert len(at.get("image")) == 1, "only the real fig.png is shown"


def test_safe_run_folder_rule(tmp_path, monkeypatch):
    real = tmp_path / "data" / "runs"
    (real / "truth" / "r1").mkdir(parents=True)
    (tmp_path / "runs").symlink_to(real)  # the root itself may be a link (set by whoever starts the dashboard)
    root = tmp_path / "runs"
    assert results.safe_run_folder(root, root / "truth" / "r1") == real / "truth" / "r1"
    assert results.safe_run_folder(root, real / "truth" / "r1") == real / "truth" / "r1"
    assert results.safe_run_folder(root, f"{root}/truth/../truth/r1") == real / "truth" / "r1"
    monkeypatch.chdir(tmp_path)
    assert results.safe_run_folder("runs", "runs/truth/r1") == real / "truth" / "r1"  # relative: from the cwd
    (real / "truth" / "r1" / "report.md").write_text("x")
    (real / "truth" / "link").symlink_to(real / "truth" / "r1")
    for bad, match in [("", "no folder given"), ("runs/../data", "outside the runs root"),
                       ("/", "outside the runs root"), ("runs/truth/link", "symbolic link"),
                       ("runs/truth/link/report.md", "symbolic link"), ("runs/truth/r2", "does not exist"),
                       ("runs/truth/r1/report.md", "is a file")]:
        with pytest.raises(results.ResultsError, match=match):
            results.safe_run_folder("runs", bad)
    with pytest.raises(results.ResultsError, match="runs root .* is not a folder"):
        results.safe_run_folder(tmp_path / "missing", tmp_path / "missing" / "x")
    assert results.find_runs(root) == []  # no study.json yet
    (real / "truth" / "r1" / "study.json").write_text('{"study": "truth"}')
    assert results.find_runs(root) == [str(real / "truth" / "r1")]  # the link to r1 is not listed


# ---- reports and files ------------------------------------------------------------------------------------------
@pytest.mark.hostile("dashboard", "report.md with remote images (Markdown, HTML <img>, data:, by reference)",
                     expect="works", risk="security")
def test_remote_images_in_a_report_are_not_rendered(runs):
    at = open_page(str(make_run(runs / "r", REPORT)))
    sent = markdown_sent(at)
    for url in REMOTE:
        assert f"]({url}" not in sent and f"]( {url}" not in sent
        assert f"remote image not loaded: `{url}`" in sent
    assert "<img" not in sent.lower() and "![" not in sent, "no image markup reaches the browser"
    assert "remote image not loaded: `http://evil.example/d.png`" in sent
    assert len(at.get("image")) == 2, "the local figure: in the report and in the Figures tab"
    parts = results.report_parts(REPORT, {"fig": b""})
    assert parts[1] == ("image", "fig") and [k for k, _ in parts] == ["markdown", "image", "markdown"]


@pytest.mark.parametrize("fmt", [
    pytest.param("csv", marks=pytest.mark.hostile(
        "dashboard", "Results page: a 200k-row CSV table", expect="works", risk="wrong")),
    pytest.param("parquet", marks=pytest.mark.hostile(
        "dashboard", "Results page: a 200k-row Parquet table", expect="works", risk="wrong")),
])
def test_large_tables_are_read_lazily(runs, monkeypatch, fmt):
    folder = make_run(runs / "big")
    df = pd.DataFrame({"i": range(200_000), "x": 0.5, "text": "some words in a cell"})
    df.to_csv(folder / "big.csv", index=False) if fmt == "csv" else df.to_parquet(folder / "big.parquet")
    calls = []
    real_csv = pd.read_csv
    monkeypatch.setattr(pd, "read_csv", lambda src, **kw: calls.append((len(src.getvalue()), kw)) or real_csv(src,
                                                                                                            **kw))
    at = open_page(str(folder))
    table = at.dataframe[0].value
    assert len(table) == results.MAX_ROWS and list(table["i"][:3]) == [0, 1, 2]
    note = " ".join(c.value for c in at.caption)
    assert f"showing the first {results.MAX_ROWS:,}" in note and " MB file)" in note
    if fmt == "csv":
        assert len(calls) == 1 and calls[0][1]["nrows"] == results.MAX_ROWS + 1  # parsed: the first rows only
        assert calls[0][0] <= results.MAX_CSV_BYTES
    else:
        assert "of 200,000 rows" in note and not calls


@pytest.mark.hostile("dashboard", "Results page: a malformed PNG figure", expect="error", risk="raw")
def test_malformed_png_is_a_warning(runs):
    folder = make_run(runs / "r", "# report\n\n![broken](broken.png)\n")
    (folder / "broken.png").write_bytes(results.PNG_MAGIC + b"\x00garbage" * 50)  # PNG magic, then damage
    (folder / "cut.png").write_bytes(png_bytes(64)[:-30])  # the end of the image data missing
    at = open_page(str(folder))
    warned = [w.value for w in at.warning]
    for name in ("broken.png", "cut.png"):
        assert any(w.startswith(f"{name} could not be read: ValueError: not a readable PNG image") for w in warned)
    assert at.json and len(at.get("image")) == 1, "the rest of the page renders: summary, fig.png"
    assert "image not shown (not a PNG of this run folder): `broken.png`" in markdown_sent(at)


@pytest.mark.hostile("dashboard", "Results page: a 70 MB report.md", expect="works", risk="raw")
def test_huge_report_shows_its_start_with_a_warning(runs):
    folder = make_run(runs / "r")
    line = "A line of the report, over and over. é\n".encode()
    with open(folder / "report.md", "wb") as fh:
        fh.write(b"# Huge report\n")
        for _ in range(70):
            fh.write(line * (2**20 // len(line)))
    at = open_page(str(folder))
    assert any("report.md is 7" in w.value and "showing its first 2.0 MB only" in w.value for w in at.warning)
    sent = markdown_sent(at)
    assert "# Huge report" in sent
    assert results.MAX_TEXT_BYTES // 2 < len(sent.encode()) <= results.MAX_TEXT_BYTES + 10**4
    assert at.json, "the rest of the page renders"


# ---- the real app in a browser ----------------------------------------------------------------------------------
@pytest.fixture
def live(tmp_path):
    """A live dashboard (the exact ``hiddenlens dashboard`` command) serving a runs root with one run whose report
    holds remote images; ``(url, runs)``."""
    runs = tmp_path / "runs"
    make_run(runs / "r1", REPORT)
    make_run(tmp_path / "outside", "# TOPSECRET\n")
    with streamlit_server(runs, tmp_path) as (url, _):
        yield url, runs


@pytest.mark.browser
@pytest.mark.hostile("dashboard", "real browser: paths out of the runs root and a report's remote images",
                     expect="works", risk="security")
def test_browser_refuses_escapes_and_fetches_no_remote_image(live):
    from playwright.sync_api import sync_playwright

    url, runs = live
    requests: list[str] = []

    def route(r):
        requests.append(r.request.url)
        return r.continue_() if r.request.url.startswith(url) else r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=OFFLINE_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.route("**/*", route)
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("[data-testid=stSidebar]", timeout=90_000)
            page.get_by_role("link", name="Results").click()
            folder = page.get_by_label("Results folder")
            for escape in (str(runs.parent / "outside"), str(runs) + "/../outside", "/etc"):
                folder.fill(escape)
                folder.press("Enter")
                wait_idle(page)
                error = page.get_by_test_id("stAlertContentError")
                assert error.count() == 1 and "outside the runs root" in error.inner_text()
                assert "TOPSECRET" not in page.get_by_test_id("stMain").inner_text()
            folder.fill(str(runs / "r1"))
            folder.press("Enter")
            wait_idle(page)
            main = page.get_by_test_id("stMain")
            main.get_by_text("remote image not loaded").first.wait_for(timeout=30_000)
            page.get_by_test_id("stImage").first.wait_for(timeout=30_000)  # the local figure, from the server
            page.wait_for_timeout(1000)
            assert page.get_by_test_id("stException").count() == 0
        finally:
            browser.close()
    assert requests and all(r.startswith(url) for r in requests), [r for r in requests if not r.startswith(url)]
    assert not [r for r in requests if "evil.example" in r]
