"""Dashboard tests: every page under Streamlit's AppTest on tiny-llama, plus the pure helpers behind them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from hiddenlens.dashboard import attention, modelstore, results

from dashboard_app import intention_live, run_page


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch, tmp_path):
    """Each test starts with no model and no cached result (Streamlit's caches are process-global)."""
    monkeypatch.setenv(modelstore.MODEL_ENV, "tiny-llama")
    monkeypatch.setenv(modelstore.RUNS_ENV, str(tmp_path / "runs"))
    st.cache_resource.clear()
    st.cache_data.clear()
    modelstore.clear()
    yield
    st.cache_resource.clear()
    modelstore.clear()


def plotly_specs(at: AppTest) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def no_errors(at: AppTest) -> None:
    assert not at.exception
    assert [e.value for e in at.error] == []


# ---- pages ---------------------------------------------------------------------------------------------------
def test_overview_shows_model_card_and_sites():
    at = run_page()
    no_errors(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Model"] == "tiny-llama"
    assert metrics["Device"] == "cpu" and metrics["Precision"] == "float32" and metrics["Backend"] == "hf"
    arch = at.dataframe[0].value
    assert arch.loc[0, "n_layers"] == 4 and arch.loc[0, "n_kv_heads"] == 2
    handle = modelstore.get_model(modelstore.ModelKey("tiny-llama"))
    assert list(at.dataframe[1].value["site"]) == handle.site_names()
    running = [c.value for c in at.sidebar.caption if c.value.startswith("Running")]
    assert running and "tiny-llama" in running[0] and "cpu" in running[0]
    [download] = at.get("download_button")  # the site table comes with its CSV: every row, as shown
    assert download.proto.label == "Download CSV"


def test_dynamics_heatmap_follows_controls():
    at = run_page("dynamics")
    no_errors(at)
    heat = plotly_specs(at)[0]["data"][0]
    assert heat["type"] == "heatmap" and heat["y"] == ["embed", "L0", "L1", "L2", "L3"]
    n_tokens = len(heat["x"])
    assert heat["text"][0][0]  # top token written in the cells
    at.slider(key="dyn_positions").set_value(4).run()
    no_errors(at)
    heat = plotly_specs(at)[0]["data"][0]
    assert len(heat["x"]) == min(4, n_tokens)
    at.selectbox(key="dyn_stat").set_value("kl_final").run()
    spec = plotly_specs(at)[0]
    assert "KL" in spec["layout"]["title"]["text"]
    assert "lens first agrees with it at" in at.markdown[0].value


def test_dynamics_tuned_lens_from_a_file(tmp_path):
    from hiddenlens.analyses.tuned_lens import TunedLens

    handle = modelstore.get_model(modelstore.ModelKey("tiny-llama"))
    TunedLens.for_model(handle).save(tmp_path / "lens.safetensors")  # zero-initialised: equals the logit lens
    at = run_page("dynamics")
    logit = plotly_specs(at)[0]["data"][0]
    at.radio(key="dyn_lens").set_value("tuned").run()
    at.text_input(key="dyn_tuned_path").input(str(tmp_path / "lens.safetensors")).run()
    no_errors(at)
    tuned = plotly_specs(at)[0]
    assert tuned["layout"]["title"]["text"].startswith("tuned lens")
    assert tuned["data"][0]["text"] == logit["text"], "an untrained tuned lens reads out like the logit lens"
    at.text_input(key="dyn_tuned_path").input(str(tmp_path / "missing.safetensors")).run()
    assert not at.exception and "no tuned lens at" in at.error[0].value


def test_sinks_pick_a_head_shows_its_pattern():
    at = run_page("sinks")
    no_errors(at)
    grid = plotly_specs(at)[0]["data"][0]
    assert grid["type"] == "heatmap" and np.shape(grid["z"]) == (4, 4)  # tiny-llama: 4 layers x 4 heads
    at.selectbox(key="sink_layer").set_value(2).run()
    at.selectbox(key="sink_head").set_value(3).run()
    no_errors(at)
    assert at.metric[0].label == "Dormancy of L2H3"
    assert 0.0 <= float(at.metric[0].value) <= 1.0
    pattern = plotly_specs(at)[1]
    assert pattern["data"][0]["type"] == "heatmap" and "L2H3" in pattern["layout"]["title"]["text"]
    at.selectbox(key="sink_metric").set_value("value_ratio").run()
    assert "value norm ratio" in plotly_specs(at)[0]["layout"]["title"]["text"]
    at.toggle(key="sink_domains").set_value(True).run()
    no_errors(at)
    titles = [s["layout"]["title"]["text"] for s in plotly_specs(at)]
    assert "Dormancy on prose" in titles and "Dormancy on code" in titles
    assert {"dormancy_prose", "dormancy_code", "diff"} <= set(at.dataframe[0].value.columns)


def _write_report(folder: Path) -> None:
    """A small truth run, written by the study's own ``Result.write`` (so it has a study.json)."""
    import torch

    from hiddenlens.probes.direction import Direction
    from hiddenlens.studies import truth as study

    u = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(0)), dim=0)
    d = Direction(u, sigma=1.0, site="blocks.2.resid_post", method="mass_mean", model="tiny-llama")
    layers = pd.DataFrame({"layer": [0, 1, 2], "method": "mass_mean", "auroc": [0.5, 0.6, 0.75]})
    summary = {"model": "tiny-llama", "family": "capitals", "auroc": 0.75, "best_layer": 2, "best_probe_auroc": 0.75}
    study.Result(study.TruthConfig(model="tiny-llama"), summary, {"layers": layers},
                 directions={"mass_mean": d}).write(folder)


def test_results_page_loads_a_report_folder(tmp_path):
    folder = tmp_path / "runs" / "truth-probe"
    _write_report(folder)
    at = run_page("results")
    assert at.selectbox(key="res_found").options == [str(folder)]  # found under the runs root (it has a study.json)
    at.text_input(key="res_path").input(str(folder)).run()
    no_errors(at)
    table = at.dataframe[0].value
    assert list(table["auroc"]) == [0.5, 0.6, 0.75]
    assert any("Best layer" in m.value for m in at.markdown) and any("`truth` run" in m.value for m in at.success)
    assert at.get("image"), "the PNG figure is shown"
    assert at.json[0].value and json.loads(at.json[0].value)["auroc"] == 0.75


def test_results_page_shows_errors_for_bad_paths(tmp_path):
    broken = tmp_path / "runs" / "broken"  # the Results page opens only folders under the runs root
    broken.mkdir(parents=True)
    at = run_page("results")
    at.text_input(key="res_path").input(str(tmp_path / "runs" / "missing")).run()
    assert not at.exception
    assert "does not exist" in at.error[0].value
    (broken / "table.parquet").write_bytes(b"not parquet at all")
    at.text_input(key="res_path").input(str(broken)).run()
    assert not at.exception
    assert "holds no results" in at.error[0].value and "table.parquet" in at.error[0].value
    (broken / "summary.json").write_text('{"ok": 1}')
    at.text_input(key="res_path").input(str(broken) + " ").run()  # new path string: re-read
    assert not at.exception and not at.error
    assert "table.parquet could not be read" in at.warning[0].value


def test_switching_model_frees_the_previous_one_but_never_another_sessions():
    import gc
    import weakref

    other = run_page()  # a second session on the default tiny-llama
    at = run_page()
    first = weakref.ref(modelstore.loaded_model(modelstore.ModelKey("tiny-llama")))
    at.sidebar.selectbox(key="pick_kind").select_index(2).run()  # options have display labels
    no_errors(at)
    assert {m.label: m.value for m in at.metric}["Model"] == "tiny-gpt2"
    gc.collect()
    assert first() is not None and first().hf_model is not None, "a switch pulled the model from under a session"
    other.run()
    no_errors(other)
    assert {m.label: m.value for m in other.metric}["Model"] == "tiny-llama"
    other.sidebar.selectbox(key="pick_kind").select_index(2).run()  # the last session leaves tiny-llama
    at.run()
    other.run()  # Streamlit keeps the previous run's session state until the next run ends
    gc.collect()
    assert first() is None, "a model no session uses stays in memory"
    assert modelstore.loaded_keys() == [modelstore.ModelKey("tiny-gpt2")]


def test_project_checkpoint_picker_loads_a_bigram_backcopy_step(tmp_path):
    from hiddenlens.models.bb_model import BBConfig, build_model, save_checkpoint
    from hiddenlens.models.bb_task import BBGenerator

    cfg = BBConfig(steps=1)
    gen = BBGenerator(None, k=cfg.k, seq_length=cfg.seq_length)
    model = build_model(cfg, gen.vocab_size, gen.bos_id)
    for step in (0, 500):
        save_checkpoint(model, gen, cfg, tmp_path / "runs" / "bb" / f"step_{step:06d}", step)
    at = run_page()
    at.sidebar.selectbox(key="pick_kind").select_index(4).run()  # "Project checkpoint"
    found = at.sidebar.selectbox(key="pick_checkpoint")
    assert found.options == [str(tmp_path / "runs" / "bb" / f"step_{s:06d}") for s in (0, 500)]
    found.select_index(1).run()
    no_errors(at)
    assert at.dataframe[0].value.loc[0, "family"] == "gpt2" and at.dataframe[0].value.loc[0, "n_layers"] == 1
    assert {m.label: m.value for m in at.metric}["Model"].endswith("step_000500")


def test_bad_model_spec_is_an_error_on_the_page(tmp_path):
    at = run_page()
    at.sidebar.selectbox(key="pick_kind").select_index(3).run()  # "Local folder or hub id"
    at.sidebar.text_input(key="pick_custom").input(str(tmp_path / "no-such-model")).run()
    assert not at.exception
    assert "Could not load" in at.sidebar.error[0].value
    assert "No model is loaded" in at.warning[0].value


def test_intention_prompt_entropy_and_a_loaded_run(tmp_path):
    from hiddenlens.studies.report import write_table

    at = run_page("intention")
    no_errors(at)
    metrics = {m.label: float(m.value) for m in at.metric}
    assert 0 < metrics["H_int of the prompt (top-100, bits)"] <= np.log2(100) + 1e-6
    assert 0 < metrics["H_int, full vocabulary (bits)"] <= np.log2(512) + 1e-6
    run = tmp_path / "runs" / "intention"  # under the runs root: the dashboard opens only folders there
    run.mkdir(parents=True)
    write_table(run, "regimes", pd.DataFrame({
        "regime": ["direct", "cot"], "accuracy": [0.2, 0.5], "accuracy_ci_low": [0.1, 0.3],
        "accuracy_ci_high": [0.4, 0.7], "h_int_bits": [3.0, 1.5], "h_int_ci_low": [2.5, 1.0],
        "h_int_ci_high": [3.5, 2.0], "recov_auroc": [0.6, 0.7], "recov_ci_low": [0.5, 0.6],
        "recov_ci_high": [0.7, 0.8]}))
    write_table(run, "dims", pd.DataFrame({
        "regime": ["direct"] * 2 + ["cot"] * 2, "state": "pre", "layer": [2, 3, 2, 3],
        "participation_ratio": [4.0, 5.0, 3.0, 3.5]}))
    at.text_input(key="int_path").input(str(run)).run()
    no_errors(at)
    titles = [s["layout"]["title"]["text"] for s in plotly_specs(at)]
    assert titles[:3] == ["Accuracy (Wilson 95% CI)", "H_int (bootstrap 95% CI)",
                          "Recov: AUROC of correctness from the states"]
    dims = plotly_specs(at)[3]
    assert [t["name"] for t in dims["data"]] == ["cot", "direct"] and dims["data"][0]["x"] == ["L2", "L3"]
    at.text_input(key="int_path").input(str(tmp_path / "runs")).run()  # a folder that is not an intention run
    assert not at.exception and "Cannot open this run" in at.error[0].value


def test_intention_live_regimes_on_a_small_set():
    at = run_page("intention")
    at.radio(key="int_source").set_value("Compute live on a small set").run()
    at.slider(key="int_n").set_value(4).run()
    at.multiselect(key="int_regimes").set_value(["direct", "cot"]).run()
    at.slider(key="int_budget").set_value(4).run()
    at.toggle(key="int_run").set_value(True).run()
    no_errors(at)
    table = at.dataframe[0].value
    assert list(table["regime"]) == ["direct", "cot"] and (table["n"] == 4).all()
    assert ((0 <= table["accuracy"]) & (table["accuracy"] <= 1)).all()


def _truth_run(folder: Path) -> None:
    import torch

    from hiddenlens.probes.direction import Direction
    from hiddenlens.studies import truth as study

    layers = pd.DataFrame({"layer": [0, 1, 2, 3] * 2, "method": ["mass_mean"] * 4 + ["probe"] * 4,
                           "auroc": [0.5, 0.6, 0.7, 0.65, 0.55, 0.6, 0.75, 0.7]})
    projections = pd.DataFrame({"text": ["a.", "b."], "label": [1, 0], "projection": [1.0, -1.0]})
    u = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(0)), dim=0)
    d = Direction(u, sigma=1.0, site="blocks.2.resid_post", method="mass_mean", model="tiny-llama")
    study.Result(study.TruthConfig(model="tiny-llama"), {"best_layer": 2, "family": "capitals"},
                 {"layers": layers, "projections": projections}, directions={"mass_mean": d}).write(folder)


def test_truth_loaded_run_and_alpha_changes_the_steered_text(tmp_path):
    _truth_run(tmp_path / "runs" / "truth")  # under the runs root: the dashboard opens only folders there
    at = run_page("truth")
    at.text_input(key="truth_path").input(str(tmp_path / "runs" / "truth")).run()
    no_errors(at)
    specs = plotly_specs(at)
    assert "AUROC per layer" in specs[0]["layout"]["title"]["text"]
    assert [t["name"] for t in specs[1]["data"]] == ["false", "true"]
    html = [h.proto.body for h in at.get("html")]
    assert len(html) == 2 and "p_true" in html[0]
    at.slider(key="truth_alpha").set_value(0.0).run()
    texts = at.dataframe[0].value.iloc[0]
    assert texts["plain"] == texts["steered"], "alpha = 0 leaves generation unchanged"
    at.slider(key="truth_alpha").set_value(20.0).run()
    no_errors(at)
    texts = at.dataframe[0].value.iloc[0]
    assert texts["plain"] != texts["steered"], "a large alpha changes the greedy continuation"


def test_leakage_layer_range_and_span():
    at = run_page("leakage")
    no_errors(at)
    at.selectbox(key="leak_span").set_value("France").run()
    at.slider(key="leak_layers").set_value((1, 3)).run()
    no_errors(at)
    assert any("*France* replaced at blocks 1-3" in m.value for m in at.markdown)
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["KL(after || before), next token"].split()[0]) >= 0
    bars = plotly_specs(at)[0]
    assert [t["name"] for t in bars["data"]] == ["before", "after"]


def test_iteration_threshold_controls_what_is_iterated():
    at = run_page("iteration")
    no_errors(at)
    at.slider(key="iter_threshold_entropy").set_value(0.0).run()
    assert {m.label: m.value for m in at.metric}["Tokens iterated"] == "100%"
    at.slider(key="iter_threshold_entropy").set_value(8.0).run()  # above ln(512): nothing is that uncertain
    no_errors(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Tokens iterated"] == "0%" and metrics["Fixes"] == "0" and metrics["Breaks"] == "0"
    assert metrics["Accuracy first pass"] == metrics["Accuracy after"]


# ---- pure helpers and the launcher ---------------------------------------------------------------------------
def test_head_grid_and_pool():
    heads = pd.DataFrame({"layer": [1, 0, 1, 0], "head": [0, 1, 1, 0], "dormancy": [0.3, 0.2, 0.4, 0.1]})
    assert attention.head_grid(heads, "dormancy").tolist() == [[0.1, 0.2], [0.3, 0.4]]
    pooled, factor = attention.pool(np.ones((2, 3, 130, 130)), 64)
    assert factor == 3 and pooled.shape == (2, 3, 44, 44)
    assert pooled[0, 0, 0, 0] == 1.0


def test_find_checkpoints_and_report_folders(tmp_path):
    (tmp_path / "a" / "step-100").mkdir(parents=True)
    (tmp_path / "a" / "step-100" / "hiddenlens_model.json").write_text('{"kind": "x"}')
    (tmp_path / "b").mkdir()
    assert modelstore.find_checkpoints(tmp_path) == [str(tmp_path / "a" / "step-100")]
    assert modelstore.find_checkpoints(tmp_path / "nope") == []
    (tmp_path / "b" / "summary.json").write_text("{}")
    assert results.find_runs(tmp_path) == []                  # a run folder is one a study wrote: it has study.json
    (tmp_path / "b" / "study.json").write_text('{"study": "truth"}')
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "study.json").write_text('{"study": "no-such-study"}')
    assert results.find_runs(tmp_path) == [str(tmp_path / "b")]


def test_dashboard_command_binds_localhost_with_safe_settings():
    from hiddenlens.cli.dashboard import app_path, streamlit_command

    argv, env = streamlit_command("tiny-llama", port=8600)
    assert argv[argv.index("run") + 1] == str(app_path()) and app_path().is_file()
    for flag in ("--server.address=127.0.0.1", "--server.port=8600", "--server.enableXsrfProtection=true",
                 "--browser.gatherUsageStats=false", "--server.fileWatcherType=none", "--server.maxUploadSize=16"):
        assert flag in argv
    assert env[modelstore.MODEL_ENV] == "tiny-llama"


def _patch_inputs(at: AppTest, clean: str, corrupted: str, answer: str = " a", wrong: str = " b") -> AppTest:
    at.text_input(key="patch_clean").input(clean)
    at.text_input(key="patch_corrupted").input(corrupted)
    at.text_input(key="patch_answer").input(answer)
    at.text_input(key="patch_wrong").input(wrong)
    return at.run()


def test_patching_page_maps_dla_and_attribution():
    at = run_page("patching")
    assert not at.exception  # the embedded model's defaults do not fit the byte-level tiny tokenizer: a message
    at = _patch_inputs(at, "The capital of France is", "The capital of Italy is")
    no_errors(at)
    metrics = {m.label: m.value for m in at.metric}
    assert {"Logit difference, clean", "Logit difference, corrupted", "Pearson r"} <= set(metrics)
    specs = plotly_specs(at)
    heat = specs[0]["data"][0]
    assert heat["type"] == "heatmap" and heat["y"] == ["L0", "L1", "L2", "L3"]
    assert heat["x"][-1].endswith("is") and heat["zmin"] == -heat["zmax"]  # tokens on x; diverging around 0
    assert abs(heat["z"][-1][-1] - 1.0) < 1e-4, "the clean last state at the last layer restores the clean run"
    assert abs(heat["z"][0][0]) < 1e-4  # the shared first token: patching it changes nothing
    dla = specs[1]
    assert dla["data"][0]["type"] == "bar" and dla["data"][0]["x"][:3] == ["embed", "L0 attn", "L0 mlp"]
    scatter = specs[2]
    assert "Pearson r" in scatter["layout"]["title"]["text"] and len(scatter["data"][1]["x"]) == 4 * len(heat["x"])
    assert len(at.get("download_button")) == 3
    at.toggle(key="patch_heads").set_value(True).run()
    no_errors(at)
    assert any({"layer", "head", "diff"} <= set(d.value.columns) for d in at.dataframe)
    assert len(at.get("download_button")) == 4
    at.selectbox(key="patch_site").set_value("attn.z").run()
    no_errors(at)
    heads = plotly_specs(at)[0]["data"][0]
    assert heads["x"] == ["H0", "H1", "H2", "H3"] and heads["y"] == ["L0", "L1", "L2", "L3"]
    assert len(plotly_specs(at)) == 3  # the map, the DLA bars and the attribution scatter
    at.selectbox(key="patch_direction").set_value("noise").run()
    no_errors(at)
    assert "(noise)" in plotly_specs(at)[0]["layout"]["title"]["text"]


def test_patching_page_shows_bad_pairs_as_one_message():
    at = _patch_inputs(run_page("patching"), "The capital of France is", "The capital of Peru is")
    assert not at.exception
    assert len(at.error) == 1 and "same token length" in at.error[0].value
    assert not plotly_specs(at)
    at = _patch_inputs(at, "The capital of France is", "The capital of Italy is", " Rome", " b")
    assert not at.exception
    assert len(at.error) == 1 and "single-token" in at.error[0].value


# ---- issue 13: scales, head grids, truth colours, intention defaults, stale spans, collapsed summary -----------
def test_scale_helper_log_clipped_linear():
    from hiddenlens.dashboard import figures

    z = np.array([[20000.0, 1.0, 10.0], [0.0, 100.0, 1000.0]])
    drawn, lo, hi, label = figures.apply_scale(z, "log")
    assert label == "log10" and (lo, hi) == (0.0, pytest.approx(np.log10(20000.0)))
    assert drawn[1, 0] == 0.0  # a zero is floored at the smallest positive value, never -inf
    drawn, lo, hi, label = figures.apply_scale(z, "clipped at p99")
    assert hi == pytest.approx(np.percentile(z, 99)) and drawn.max() == pytest.approx(hi) and lo == 0.0
    drawn, lo, hi, _ = figures.apply_scale(z, "linear")
    assert (drawn == z).all() and (lo, hi) == (0.0, 20000.0)
    assert figures.default_scale("norm") == figures.default_scale("kl_final") == "log"
    assert figures.default_scale("entropy") == "linear"
    with pytest.raises(ValueError):
        figures.apply_scale(z, "sqrt")


def test_dynamics_and_sinks_plots_name_their_scale():
    at = run_page("dynamics")
    no_errors(at)
    heat, curves, norms = plotly_specs(at)[:3]
    assert "(linear scale)" in heat["layout"]["title"]["text"]  # entropy: bounded, linear by default
    assert "(log10 scale)" in curves["layout"]["title"]["text"] and "(log10 scale)" in norms["layout"]["title"]["text"]
    assert "log10" in norms["data"][0]["colorbar"]["title"]["text"]
    at.selectbox(key="dyn_stat").set_value("kl_final").run()
    heat = plotly_specs(at)[0]
    assert "(log10 scale)" in heat["layout"]["title"]["text"] and "log10" in heat["data"][0]["colorbar"]["title"]["text"]
    at.radio(key="dyn_norm_scale").set_value("linear").run()
    linear_max = plotly_specs(at)[2]["data"][0]["zmax"]
    at.radio(key="dyn_norm_scale").set_value("clipped at p99").run()
    no_errors(at)
    norms = plotly_specs(at)[2]
    assert "clipped at p99" in norms["layout"]["title"]["text"]
    assert norms["data"][0]["zmax"] < linear_max  # the outlier no longer sets the top of the colour bar
    at = run_page("sinks")
    no_errors(at)
    titles = [s["layout"]["title"]["text"] for s in plotly_specs(at)]
    assert any(t.startswith("Residual norm per layer") and "(log10 scale)" in t for t in titles)
    at.radio(key="sink_norm_scale").set_value("linear").run()
    titles = [s["layout"]["title"]["text"] for s in plotly_specs(at)]
    assert any(t.startswith("Residual norm per layer") and "(linear scale)" in t for t in titles)


def test_head_grid_axes_and_colour_range_are_the_data():
    from hiddenlens.dashboard import figures

    scores = np.arange(12, dtype=float).reshape(3, 4) / 10 + 0.25
    scores[0, 1] = np.nan  # a head without a value is blank, not the bottom of the colour bar
    spec = figures.head_grid(scores, "t", "dormancy", selected=(1, 2)).to_plotly_json()
    layout, (heat, clicks) = spec["layout"], spec["data"]
    assert heat["type"] == "heatmap" and heat["z"][2] == pytest.approx(list(scores[2]))
    # Magma from black at the minimum; as rgb() strings, which Streamlit's theme leaves alone (it rewrites the hex
    # colours #000001-#000040 of a figure, and Magma's black is #000004: the minimum was drawn pink)
    assert heat["colorscale"][0] == [0.0, "rgb(0, 0, 4)"] and heat["colorscale"][-1][0] == 1.0
    assert "#0000" not in json.dumps(spec)
    assert list(heat["x"]) == [0, 1, 2, 3] and list(heat["y"]) == [0, 1, 2]  # integer head / layer axes
    # the click targets: one invisible marker on each cell centre (Streamlit selects scatter points, not cells)
    assert clicks["type"] == "scatter" and clicks["marker"]["opacity"] == 0
    assert list(zip(clicks["y"], clicks["x"])) == [(la, h) for la in range(3) for h in range(4)]
    assert clicks["customdata"][1] == "n/a" and clicks["customdata"][4] == "0.650"  # hover: the cell's value
    assert list(layout["yaxis"]["range"]) == [-0.5, 2.5] and list(layout["xaxis"]["range"]) == [-0.5, 3.5]
    assert layout["xaxis"]["dtick"] == 1 and layout["yaxis"]["dtick"] == 1
    assert (heat["zmin"], heat["zmax"]) == (0.25, pytest.approx(1.35))  # the data's range: no band below its min
    [box] = layout["shapes"]  # the selected head (layer 1, head 2) is outlined
    assert (box["x0"], box["x1"], box["y0"], box["y1"]) == (1.5, 2.5, 0.5, 1.5)


def test_true_and_false_share_one_colour_on_every_page(tmp_path):
    from hiddenlens.dashboard import figures, highlight

    assert highlight.colour(1.0).startswith(figures.TRUE_COLOUR.replace("rgb", "rgba").rstrip(")"))
    assert highlight.colour(0.0).startswith(figures.FALSE_COLOUR.replace("rgb", "rgba").rstrip(")"))
    _truth_run(tmp_path / "runs" / "truth")
    at = run_page("truth")
    at.text_input(key="truth_path").input(str(tmp_path / "runs" / "truth")).run()
    no_errors(at)
    hist = plotly_specs(at)[1]["data"]
    assert {t["name"]: t["marker"]["color"] for t in hist} == {"false": figures.FALSE_COLOUR,
                                                               "true": figures.TRUE_COLOUR}


def test_intention_live_defaults_match_the_cli_and_a_degenerate_result_warns(monkeypatch):
    import inspect

    from hiddenlens.cli import analyze
    from hiddenlens.dashboard import backend

    cli_shots = inspect.signature(analyze.intention).parameters["shots"].default.default
    calls = []

    def fake_live(key, n, regimes, budget, seed=0, shots=None):
        calls.append(shots)
        reg = pd.DataFrame({"regime": list(regimes), "n": n, "accuracy": 0.0, "h_int_bits": 1.0})
        dims = pd.DataFrame({"regime": list(regimes), "layer": 0, "participation_ratio": 1.0})
        return {"regimes": reg, "dims": dims, "items": pd.DataFrame()}

    monkeypatch.setattr(backend, "live_regimes", fake_live)
    at = run_page("intention")
    at.radio(key="int_source").set_value("Compute live on a small set").run()
    assert at.number_input(key="int_shots").value == cli_shots
    at.toggle(key="int_run").set_value(True).run()
    no_errors(at)
    assert calls == [cli_shots]
    assert any("accuracy is 0 in every regime" in w.value for w in at.warning)


def test_leakage_span_follows_a_prompt_change():
    at = run_page("leakage")
    at.selectbox(key="leak_span").set_value("France").run()
    no_errors(at)
    at.sidebar.text_area(key="hl_prompt").input("The capital of Spain is").run()
    no_errors(at)
    span = at.selectbox(key="leak_span").value
    assert span and span in "The capital of Spain is"
    assert any("no longer holds the span 'France'" in i.value for i in at.info)
    assert any(f"*{span}* replaced" in m.value for m in at.markdown)


def test_results_summary_is_collapsed(tmp_path):
    folder = tmp_path / "runs" / "report"
    _write_report(folder)
    at = run_page("results")
    at.text_input(key="res_path").input(str(folder)).run()
    no_errors(at)
    summary = [e for e in at.expander if e.label == "summary.json"]
    assert summary and not summary[0].proto.expanded


# ---- issue 13: one BOS convention, true heatmaps, full model names, site shapes, results, save as run ------------
def _pattern_tokens(at: AppTest) -> list[str]:
    """The key-axis tokens of the sinks page's attention pattern (labels ``i:token``, index dropped)."""
    spec = next(s for s in plotly_specs(at) if s["layout"]["title"]["text"].startswith("Attention pattern"))
    return [label.split(":", 1)[1] for label in spec["data"][0]["x"]]


def test_bos_toggle_defaults_to_the_cli_convention_and_drives_the_sinks_page():
    from hiddenlens.dashboard import ui
    from hiddenlens.studies.report import PREPEND_BOS

    at = run_page("sinks")
    no_errors(at)
    assert PREPEND_BOS is True and at.sidebar.toggle(key=ui.BOS_STATE).value is True
    with_bos = _pattern_tokens(at)
    assert with_bos[0] == "<|bos|>"  # tiny-llama's BOS is position 0
    at.sidebar.toggle(key=ui.BOS_STATE).set_value(False).run()
    no_errors(at)
    assert _pattern_tokens(at) == with_bos[1:], "without BOS the prompt's own first token is position 0"
    assert any("BOS is off" in c.value for c in at.caption)
    at.switch_page("views/overview.py").run()  # the toggle is the sidebar's: it holds across pages
    assert at.sidebar.toggle(key=ui.BOS_STATE).value is False
    assert any(f"**{len(with_bos) - 1} tokens**" in c.value and "not prepended" in c.value for c in at.caption)


def test_cli_bos_flags_default_to_the_dashboard_convention(tmp_path, capsys):
    import inspect

    from hiddenlens.cli import analyze, demo, main
    from hiddenlens.studies import dynamics, sinks
    from hiddenlens.studies.report import PREPEND_BOS

    for command in (analyze.dynamics, analyze.sinks, demo.demo):
        assert inspect.signature(command).parameters["add_bos"].default is PREPEND_BOS
    assert dynamics.DynamicsConfig().add_bos is sinks.SinksConfig().add_bos is PREPEND_BOS
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "dynamics", "--model", "tiny-llama", "--n-prompts", "1", "--chars", "40", "--batch-size",
              "1", "--no-belief", "--target", "next", "--no-bos", "--out", str(tmp_path / "dynamics")])
    assert exc.value.code == 0
    res = dynamics.Result.read(tmp_path / "dynamics")
    assert res.config.add_bos is False and res.summary["add_bos"] is False
    ex = res.tables["example_lens"]
    assert ex.loc[ex["position"] == 0, "token"].iloc[0] == "The"  # the example prompt's own first token
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "sinks", "--model", "tiny-llama", "--n-prompts", "2", "--n-tokens", "32", "--causal-heads",
              "1", "--causal-prompts", "2", "--no-bos", "--out", str(tmp_path / "sinks")])
    assert exc.value.code == 0
    res = sinks.Result.read(tmp_path / "sinks")
    assert res.config.add_bos is False
    assert {d["add_bos"] for d in res.summary["domains"].values()} == {False}
    assert {d["tokens_per_prompt_max"] for d in res.summary["domains"].values()} == {31}  # the 32 less the BOS
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--model", "tiny-llama", "--prompt", "The cat", "--no-bos"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "prompt tokens: ['The'" in out and "<|bos|>" not in out


def test_site_table_shapes_are_the_captured_shapes():
    import hiddenlens as hl
    from hiddenlens.dashboard import backend

    key = modelstore.ModelKey("tiny-llama")
    table = backend.site_table(key)
    handle = modelstore.get_model(key)
    with hl.capture(handle, list(table["site"])) as cache:
        handle.run(["one two three"], add_bos=True)
    n = handle.tokenize(["one two three"], add_bos=True).input_ids.shape[1]
    sizes = {"batch": "1", "pos": str(n), "q": str(n), "k": str(n)}
    for site, shape in zip(table["site"], table["shape"]):
        dims = [sizes.get(d, d) for d in shape.strip("[]").split(", ")]
        assert [int(d) for d in dims] == list(cache[site].shape), site
    rows = table.set_index("site")
    assert rows.loc["blocks.0.attn.pattern", "axes"] == "[batch, n_heads, q, k]"
    assert rows.loc["blocks.0.attn.pattern", "shape"] == "[batch, 4, q, k]"
    assert rows.loc["blocks.1.attn.k", "shape"] == "[batch, 2, pos, 16]"  # GQA: 2 KV heads of width 16
    assert rows.loc["logits", "shape"] == "[batch, pos, 512]"
    at = run_page()
    shown = at.dataframe[1].value
    assert list(shown.columns) == ["site", "layer", "kind", "axes", "shape"]
    assert list(shown["shape"]) == list(table["shape"])


def test_model_picker_shows_the_full_spec():
    from hiddenlens.dashboard import sidebar

    at = run_page()
    no_errors(at)
    assert at.sidebar.caption[0].value.startswith("Spec: `tiny-llama`")
    embedded = modelstore.EMBEDDED_SPEC
    assert embedded == "smollm2-135m-instruct"
    assert len(sidebar.LABELS[embedded]) <= 24, "the picker's label fits the sidebar"
    assert f"`{embedded}`" in sidebar.spec_caption(embedded) and f"`{embedded}`" in sidebar.PICKER_HELP
    assert at.sidebar.selectbox(key="pick_kind").options[0] == sidebar.LABELS[embedded]


def _png(path: Path, colour: str) -> None:
    from PIL import Image

    Image.new("RGB", (8, 6), colour).save(path, format="PNG")


def test_results_report_shows_its_own_images_only_and_the_folder_is_remembered(tmp_path):
    folder = tmp_path / "runs" / "mine"
    folder.mkdir(parents=True)
    _png(folder / "fig.png", "red")
    _png(tmp_path / "runs" / "outside.png", "blue")
    (folder / "summary.json").write_text('{"x": 1}')
    (folder / "report.md").write_text("# My run\n\n![the figure](fig.png)\n\nfrom above: ![up](../outside.png)\n\n"
                                      "remote: ![web](https://example.com/a.png)\n")
    at = run_page("results")
    at.text_input(key="res_path").input(str(folder)).run()
    no_errors(at)
    report_tab = at.tabs[0]
    images = report_tab.get("image")
    assert len(images) == 1 and images[0].proto.imgs[0].caption == "fig"  # only the folder's own PNG
    notes = " ".join(m.value for m in report_tab.markdown)
    assert "image not shown (not a PNG of this run folder): `../outside.png`" in notes
    assert "remote image not loaded: `https://example.com/a.png`" in notes
    at.switch_page("views/overview.py").run()
    at.switch_page("views/results.py").run()
    no_errors(at)
    assert at.text_input(key="res_path").value == str(folder), "the folder survives a visit to another page"
    assert any(str(folder) in s.value for s in at.success)


def test_save_as_run_writes_study_folders_the_results_page_opens(tmp_path):
    from hiddenlens.studies import intention, sinks

    at = run_page("sinks")
    at.toggle(key="sink_domains").set_value(True).run()
    no_errors(at)
    shown = at.dataframe[0].value
    at.button(key="sink_save").click().run()
    no_errors(at)
    [saved] = [s.value for s in at.success if "Saved the sinks run" in s.value]
    res = sinks.Result.read(saved.split(": ", 1)[1])
    assert res.folder.parent == tmp_path / "runs" / "sinks" and res.config.add_bos is True
    pd.testing.assert_frame_equal(res.tables["contrast"].reset_index(drop=True), shown.reset_index(drop=True))
    assert {"heads_prose", "heads_code", "causal", "leaving_tokens"} <= set(res.tables)

    at = intention_live()
    shown = at.dataframe[0].value
    at.button(key="int_save").click().run()
    no_errors(at)
    [saved] = [s.value for s in at.success if "Saved the intention run" in s.value]
    res = intention.Result.read(saved.split(": ", 1)[1])
    assert res.config.n == 4 and res.config.regimes == ["direct"]
    pd.testing.assert_frame_equal(res.tables["regimes"], shown, check_dtype=False)
    at = run_page("results")
    at.text_input(key="res_path").input(str(res.folder)).run()
    no_errors(at)
    assert any("`intention` run" in s.value for s in at.success)


def test_prompt_list_switches_and_keeps_prompts():
    at = run_page()
    pick = at.sidebar.selectbox(key="hl_prompt_pick")
    assert len(pick.options) == 5 and any("Eiffel" in o for o in pick.options)   # the examples
    pick.set_value("The Eiffel Tower is in the city of").run()
    no_errors(at)
    assert at.sidebar.text_area(key="hl_prompt").value == "The Eiffel Tower is in the city of"
    assert at.sidebar.selectbox(key="hl_prompt_pick").value is None          # ready for the next switch
    at.sidebar.text_area(key="hl_prompt").input("My own prompt about cheese").run()
    at.sidebar.button(key="hl_prompt_keep").click().run()
    no_errors(at)
    assert "My own prompt about cheese" in at.session_state["hl_prompts"]
    at.switch_page("views/dynamics.py").run()                                 # the prompt follows every page
    assert at.sidebar.text_area(key="hl_prompt").value == "My own prompt about cheese"


def test_save_as_run_writes_steering_and_leakage_views_that_read_back(tmp_path):
    from hiddenlens.studies import read_run

    _truth_run(tmp_path / "runs" / "truth")
    at = run_page("truth")
    at.text_input(key="truth_path").input(str(tmp_path / "runs" / "truth")).run()
    at.button(key="truth_save").click().run()
    no_errors(at)
    saved = [s.value for s in at.success if "Saved the view run" in s.value]
    assert saved, [s.value for s in at.success]
    back = read_run(saved[0].rsplit(": ", 1)[1])
    assert back.config.page == "steering" and back.config.params["alpha"] == 5.0
    shown = at.dataframe[0].value.iloc[0]
    assert back.tables["steered"]["token"].str.cat() == shown["steered"]      # the very tokens the page shows
    at.switch_page("views/leakage.py").run()
    at.selectbox(key="leak_span").set_value("France").run()
    at.button(key="leak_save").click().run()
    no_errors(at)
    saved = [s.value for s in at.success if "Saved the view run" in s.value]
    back = read_run(saved[0].rsplit(": ", 1)[1])
    bars = plotly_specs(at)[0]["data"][0]
    assert back.config.params["span"] == "France" and len(back.tables["next_token"]) == len(bars["x"])
    assert back.summary["kl_after_before_nats"] >= 0
