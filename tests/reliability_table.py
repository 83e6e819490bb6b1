"""The reliability table of docs/reliability.md, built from the test suite's hostile cases.

Each hostile case is one test marked ``@pytest.mark.hostile(category, case, expect=..., risk=...)`` (see
tests/conftest.py). ``python tests/reliability_table.py`` runs every hostile case and rewrites the two tables in
docs/reliability.md from the outcomes: a passing case counts under what it asserts (a clear error, or a correct
result); a failing case counts under its risk (silently wrong, raw internal error, lost data, security exposure).
``--collect`` builds the tables from the marks alone (every case counted as passing), which is what
tests/test_reliability.py compares the page with; the suite itself runs the cases.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- hostile-table: begin -->", "<!-- hostile-table: end -->"
CASES_BEGIN, CASES_END = "<!-- hostile-cases: begin -->", "<!-- hostile-cases: end -->"
RISK_COLUMN = {"wrong": "silently wrong", "raw": "raw internal error", "lost": "lost data",
               "security": "security exposure"}
EXPECT_COLUMN = {"error": "clear error", "works": "works correctly"}


def hostile_cases(run: bool) -> list[dict]:
    """Every hostile case of the suite, with its outcome (``passed``/``failed``/...; None when only collected)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "hostile.json"
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "hostile",
                f"--hostile-report={report}", str(ROOT / "tests")]
        if not run:
            argv.insert(4, "--collect-only")
        subprocess.run(argv, cwd=ROOT, check=False, stdout=subprocess.DEVNULL if not run else None)
        if not report.is_file():
            raise RuntimeError("pytest wrote no hostile report; run it by hand to see why")
        return json.loads(report.read_text())


def result_column(case: dict) -> str:
    """Where a case counts: what it asserts when it passed (or was only collected), else its risk."""
    if case["outcome"] in (None, "passed"):
        return EXPECT_COLUMN[case["expect"]]
    return RISK_COLUMN[case["risk"]]


def _categories(cases: list[dict]) -> list[str]:
    from conftest import HOSTILE_CATEGORIES

    return [c for c in HOSTILE_CATEGORIES if any(x["category"] == c for x in cases)]


def summary_table(cases: list[dict]) -> str:
    """Markdown: per category, cases tried and how many gave each result; then how many cases carry each risk
    (what the case would be if it regressed)."""
    cols = list(EXPECT_COLUMN.values()) + list(RISK_COLUMN.values())
    head = ["category", "cases tried"] + cols + ["risk: silently wrong", "risk: raw error", "risk: lost",
                                                "risk: security"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = {c: [x for x in cases if x["category"] == c] for c in _categories(cases)}
    rows["all"] = cases
    for cat, xs in rows.items():
        got = Counter(result_column(x) for x in xs)
        risk = Counter(x["risk"] for x in xs)
        cells = [str(len(xs))] + [str(got[c]) for c in cols] + [str(risk[r]) for r in RISK_COLUMN]
        name = f"**{cat}**" if cat == "all" else cat
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def case_table(cases: list[dict]) -> str:
    """Markdown: one row per case (category, case, what the test asserts, the risk, the test)."""
    lines = ["| category | case | result | if it regressed | test |", "|---|---|---|---|---|"]
    order = {c: i for i, c in enumerate(_categories(cases))}
    for x in sorted(cases, key=lambda x: (order[x["category"]], x["test"])):
        test = x["test"].replace("|", "\\|")
        lines.append(f"| {x['category']} | {x['case'].replace('|', '/')} | {result_column(x)} | "
                     f"{RISK_COLUMN[x['risk']]} | `{test}` |")
    return "\n".join(lines)


def splice(text: str, begin: str, end: str, body: str) -> str:
    a, b = text.index(begin) + len(begin), text.index(end)
    return text[:a] + "\n" + body + "\n" + text[b:]


def render(doc: str, cases: list[dict]) -> str:
    return splice(splice(doc, BEGIN, END, summary_table(cases)), CASES_BEGIN, CASES_END, case_table(cases))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    found = hostile_cases(run="--collect" not in sys.argv)
    DOC.write_text(render(DOC.read_text(encoding="utf-8"), found), encoding="utf-8")
    print(f"{len(found)} hostile cases -> {DOC}")
