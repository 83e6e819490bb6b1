"""Studies: one way to run a study and keep its result (``run`` -> ``Result.write`` -> ``Result.read``), one
default output root, and the committed ``docs/results/*`` still readable (and re-composable) by their studies."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from hiddenlens import studies
from hiddenlens.studies.report import default_out, runs_root

ROOT = Path(__file__).resolve().parents[1]
#: committed result folder -> the study that wrote it (they predate study.json)
COMMITTED = {"bb": "bigram_backcopy", "intention": "intention", "iteration": "iteration", "leakage": "leakage",
             "sinks": "sinks", "steering": "steering", "truth": "truth", "tuned_lens": "tuned_lens",
             "patching": "patching", "truthprint": "truthprint", "reproduce": "reproduce"}


def test_one_default_output_root(monkeypatch, tmp_path):
    monkeypatch.delenv("HIDDENLENS_RUNS_DIR", raising=False)
    assert runs_root() == Path("runs")
    assert default_out("truth", "capitals") == Path("runs/truth/capitals")
    assert default_out("truth").parent == Path("runs/truth")                      # a timestamp by default
    monkeypatch.setenv("HIDDENLENS_RUNS_DIR", str(tmp_path))
    assert default_out("sinks", "a") == tmp_path / "sinks" / "a"
    for bad in ("../x", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            default_out("truth", bad)


def test_every_study_module_has_config_run_and_result():
    import dataclasses

    for name in studies.STUDIES:
        mod = studies.study_module(name)
        assert mod.Result.STUDY == name and dataclasses.is_dataclass(mod.Result.CONFIG), name
        assert callable(mod.Result.read) and callable(mod.Result.write), name
        # every study runs, except "view": the record of a dashboard view, computed by the page that saved it
        assert callable(getattr(mod, "run", None)) == (name != "view"), name
    with pytest.raises(KeyError, match="unknown study"):
        studies.study_module("nope")


@pytest.mark.parametrize("folder", sorted(COMMITTED))
def test_committed_results_read_and_rewrite(folder, tmp_path):
    """Past outputs read with their study's Result.read; writing them again composes the report and figures from
    the tables (the study's own report code) and reads back to the same tables."""
    mod = studies.study_module(COMMITTED[folder])
    res = mod.Result.read(ROOT / "docs" / "results" / folder)
    assert res.tables and res.summary and res.report_text and res.figure_files
    out = res.write(tmp_path / folder)
    assert json.loads((out / "study.json").read_text())["study"] == COMMITTED[folder]
    assert (out / "report.md").read_text().startswith("# ")
    back = studies.read_run(out)
    assert type(back) is mod.Result and sorted(back.tables) == sorted(res.tables)
    for name, df in res.tables.items():
        pd.testing.assert_frame_equal(back.tables[name], df, check_dtype=False)
    assert set(back.figure_files) >= set(json.loads((out / "study.json").read_text())["figures"])
    listed = [r[1] for r in studies.list_runs(tmp_path)]
    parts = [out / name for name in getattr(res, "parts", {})]  # a reproduction's studies are runs of their own
    assert sorted(listed) == sorted([out, *parts])


def test_a_folder_of_another_study_is_refused(tmp_path):
    truth = studies.study_module("truth")
    res = truth.Result.read(ROOT / "docs" / "results" / "truth")
    res.write(tmp_path / "t")
    with pytest.raises(ValueError, match="holds a 'truth' run"):
        studies.study_module("leakage").Result.read(tmp_path / "t")
    with pytest.raises(FileNotFoundError):
        studies.read_run(ROOT / "docs" / "results" / "truth")           # no study.json and no study named
    with pytest.raises(FileNotFoundError, match="does not exist"):
        truth.Result.read(tmp_path / "missing")


def test_truth_directions_survive_write_and_read(tmp_path):
    truth = studies.study_module("truth")
    res = truth.Result.read(ROOT / "docs" / "results" / "truth")
    assert set(res.directions) == {"mass_mean", "probe", "repe"} and len(res.iti) > 0
    back = truth.Result.read(res.write(tmp_path / "t"))
    for method, d in res.directions.items():
        assert back.directions[method].site == d.site and back.directions[method].vector.equal(d.vector)
    assert back.best_layer == res.best_layer


def test_dynamics_study_on_a_tiny_model(tmp_path):
    from hiddenlens.studies import dynamics

    config = dynamics.DynamicsConfig(model="tiny-llama", n_prompts=2, chars=60, batch_size=2, belief=False,
                                     example="hello there", target=" the")
    res = dynamics.run(config, progress=False)
    out = res.write(tmp_path / "dyn")
    back = dynamics.Result.read(out)
    assert back.config == config
    assert {"dynamics", "example_lens", "token_dynamics"} == set(back.tables)
    assert (out / "dynamics.png").is_file() and (out / "example_rank.png").is_file()
    assert set(back.tables["dynamics"].checkpoint) == {"tiny-llama"}


def test_cli_writes_under_the_runs_root_by_default(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from hiddenlens.cli import app

    monkeypatch.setenv("HIDDENLENS_RUNS_DIR", str(tmp_path / "runs"))
    res = CliRunner().invoke(app, ["analyze", "dynamics", "--model", "tiny-llama", "--n-prompts", "2", "--chars",
                                   "60", "--batch-size", "2", "--no-belief", "--example", "hello there",
                                   "--target", " the", "--name", "first"])
    assert res.exit_code == 0, res.output
    assert [(s, p) for s, p in studies.list_runs(tmp_path / "runs")] == [
        ("dynamics", tmp_path / "runs" / "dynamics" / "first")]
