"""``hiddenlens bench dashboard`` in its quick mode (tiny-llama): the table and the JSON it writes (structure only;
timings are the benchmark's job, never a unit test's)."""
from __future__ import annotations

import json
import os

import pytest
import streamlit as st
import torch

from hiddenlens.benchmarks.dashboard import BUDGETS, MODEL_ENV, RUNS_ENV, new_ranges
from hiddenlens.cli import main


def _truth_run(folder) -> None:
    """A small truth run on tiny-llama, written by the study's own writer (the page opens it instead of fitting)."""
    import pandas as pd

    from hiddenlens.probes.direction import Direction
    from hiddenlens.studies import truth as study

    u = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(0)), dim=0)
    d = Direction(u, sigma=1.0, site="blocks.2.resid_post", method="mass_mean", model="tiny-llama")
    layers = pd.DataFrame({"layer": [0, 1, 2, 3], "method": ["mass_mean"] * 4, "auroc": [0.5, 0.6, 0.7, 0.65]})
    study.Result(study.TruthConfig(model="tiny-llama"), {"best_layer": 2, "family": "capitals"},
                 {"layers": layers}, directions={"mass_mean": d}).write(folder)


def test_new_ranges_are_distinct_and_skip_the_shown_one():
    assert new_ranges(4, (0, 2), 3) == [(0, 1), (1, 2), (2, 3)]
    got = new_ranges(30, (0, 15), 3)
    assert len(set(got)) == 3 and (0, 15) not in got and all(0 <= lo <= hi < 30 for lo, hi in got)
    with pytest.raises(ValueError, match="fewer repeats"):
        new_ranges(1, (0, 0), 1)


def test_bench_dashboard_quick_mode_prints_and_writes_every_interaction(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(MODEL_ENV, raising=False)
    monkeypatch.delenv(RUNS_ENV, raising=False)
    st.cache_resource.clear()
    out = tmp_path / "dashboard.json"
    _truth_run(tmp_path / "truth")
    try:
        with pytest.raises(SystemExit) as done:
            main(["bench", "dashboard", "--model", "tiny-llama", "--repeats", "1", "--new-tokens", "4",
                  "--truth-run", str(tmp_path / "truth"), "--out", str(out)])
    finally:
        st.cache_resource.clear()
    assert done.value.code == 0
    printed = capsys.readouterr().out
    for name in BUDGETS:
        assert name in printed
    result = json.loads(out.read_text())
    assert result["model"] == "tiny-llama" and result["repeats"] == 1 and result["new_tokens"] == 4
    assert result["threads"] == torch.get_num_threads()
    assert [r["interaction"] for r in result["rows"]] == list(BUDGETS)
    for row in result["rows"]:
        kind, limit = BUDGETS[row["interaction"]]
        for clock, within in (("", "within_budget"), ("cpu_", "within_budget_cpu")):
            seconds, base = row[f"{clock}seconds"], row[f"baseline_{clock}seconds"]
            assert seconds > 0 and base > 0
            assert row[f"{clock}ratio"] == pytest.approx(seconds / base)  # one repetition: its own ratio
            assert row[within] == ((row[f"{clock}ratio"] if kind == "ratio" else seconds) <= limit)
        [sample] = row["samples"]
        assert 1 <= sample["new_tokens"] <= 4
    assert result["setup"]["truth_directions"] == f"run folder {tmp_path / 'truth'}"
    assert MODEL_ENV not in os.environ and RUNS_ENV not in os.environ, "the benchmark restores the environment"
