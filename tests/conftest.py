"""Shared fixtures: tiny random models for most tests, the embedded model loaded once per session."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_llama():
    import hiddenlens as hl
    return hl.load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    import hiddenlens as hl
    return hl.load_model("tiny-gpt2")


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (fp32, default SDPA attention), loaded once for the whole session."""
    import hiddenlens as hl
    return hl.load_model("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="session")
def smollm_eager(smollm):
    """The embedded model with eager attention (for parity against HF's output_attentions), over the same weight
    tensors as ``smollm``: the weights are loaded once per session."""
    return smollm.with_attention("eager")


# ---- hostile cases: the reliability table of docs/reliability.md -------------------------------------------------
#: categories of hostile cases, in the table's order
HOSTILE_CATEGORIES = ("store", "run folders", "inputs", "steering", "dashboard", "host")
#: what a case's test asserts: a clear one-line error naming the input and the fix, or a correct result
HOSTILE_EXPECT = ("error", "works")
#: what the case would be if it regressed (and what main did before issue 12): a silently wrong result, a raw
#: internal error, lost data, or a security exposure
HOSTILE_RISK = ("wrong", "raw", "lost", "security")


def pytest_addoption(parser):
    parser.addoption("--hostile-report", default=None, metavar="PATH",
                     help="write every hostile case (marker hostile) and its outcome to PATH as JSON")


def hostile_case(item) -> dict | None:
    """The ``@pytest.mark.hostile(category, case, expect=..., risk=...)`` mark of a test item, checked."""
    mark = item.get_closest_marker("hostile")
    if mark is None:
        return None
    category, case = mark.args
    expect, risk = mark.kwargs["expect"], mark.kwargs["risk"]
    if category not in HOSTILE_CATEGORIES or expect not in HOSTILE_EXPECT or risk not in HOSTILE_RISK:
        raise ValueError(f"{item.nodeid}: bad hostile mark {mark.args} {mark.kwargs}")
    return {"test": item.nodeid, "category": category, "case": case, "expect": expect, "risk": risk,
            "outcome": None}


def pytest_collection_modifyitems(config, items):
    config.stash[_HOSTILE] = {item.nodeid: c for item in items if (c := hostile_case(item)) is not None}


def pytest_runtest_logreport(report):
    cases = _config.stash.get(_HOSTILE, {}) if _config else {}
    case = cases.get(report.nodeid)
    if case is None:
        return
    if report.failed:
        case["outcome"] = "failed"
    elif report.when == "call" and case["outcome"] is None:
        case["outcome"] = "passed"
    elif report.skipped:
        case["outcome"] = "skipped"


def pytest_configure(config):
    global _config
    _config = config


def pytest_sessionfinish(session):
    path = session.config.getoption("--hostile-report")
    if path:
        import json
        from pathlib import Path

        Path(path).write_text(json.dumps(list(session.config.stash.get(_HOSTILE, {}).values()), indent=1))


_HOSTILE = pytest.StashKey[dict]()
_config = None
