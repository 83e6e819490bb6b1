"""docs/reliability.md shows the hostile cases the suite holds: its tables equal the ones built from the marks.

The cases themselves run as ordinary tests (tests/test_hostile_*.py); a regressed case fails there. This test
keeps the page in step with the suite (add a case, and the page must say so).
"""
from __future__ import annotations

import pytest

from reliability_table import DOC, hostile_cases, render


@pytest.fixture(scope="module")
def cases():
    return hostile_cases(run=False)


def test_reliability_page_matches_the_suite(cases):
    assert len(cases) >= 50, f"only {len(cases)} hostile cases collected"
    assert len({c["test"] for c in cases}) == len(cases)
    doc = DOC.read_text(encoding="utf-8")
    assert render(doc, cases) == doc, ("docs/reliability.md is out of date with the hostile cases; regenerate it "
                                       "with `python tests/reliability_table.py`")


def test_every_issue_12_category_has_cases(cases):
    assert {c["category"] for c in cases} == {"store", "run folders", "inputs", "steering", "dashboard", "host"}
