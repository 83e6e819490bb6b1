"""Dashboard: the tuned lens and the MLP decider trained for the model on first use (cached), under AppTest on
tiny-llama, and the sidebar's BOS convention on the Latent dynamics and Latent iteration pages."""
from __future__ import annotations

import json

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from hiddenlens.analyses import tuned_lens as tl
from hiddenlens.dashboard import modelstore
from hiddenlens.dashboard.ui import BOS_STATE
from hiddenlens.interventions import decider as decider_module

from dashboard_app import run_page as _run_page


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """No model, no cached result, a private user cache and small training recipes."""
    monkeypatch.setenv(modelstore.MODEL_ENV, "tiny-llama")
    monkeypatch.setenv(modelstore.RUNS_ENV, str(tmp_path / "runs"))
    monkeypatch.setenv("HIDDENLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tl, "CACHE_RECIPE", dict(tl.CACHE_RECIPE, n_prompts=16, max_tokens=1024, steps=1))
    monkeypatch.setattr(decider_module, "CACHE_RECIPE", dict(decider_module.CACHE_RECIPE, chunks=8, seq_len=64,
                                                             epochs=2))
    st.cache_resource.clear()
    modelstore.clear()
    yield
    st.cache_resource.clear()
    modelstore.clear()


def run_page(page: str, **state):
    return _run_page(page, timeout=240, **state)  # training a lens on first use takes longer


def heatmap(at: AppTest) -> dict:
    return json.loads(at.get("plotly_chart")[0].proto.spec)


def no_errors(at: AppTest) -> None:
    assert not at.exception and [e.value for e in at.error] == []


def test_tuned_lens_trained_for_this_model_on_first_use_then_cached():
    handle = modelstore.get_model(modelstore.ModelKey("tiny-llama"))
    path = tl.cached_lens_path(handle)
    at = run_page("dynamics")
    logit = heatmap(at)
    assert not path.exists()
    at.radio(key="dyn_lens").set_value("cached").run()
    no_errors(at)
    assert path.is_file(), "the first use trains the lens and caches it"
    tuned = heatmap(at)
    assert tuned["layout"]["title"]["text"].startswith("tuned lens")
    assert tuned["data"][0]["text"][-1] == logit["data"][0]["text"][-1], "the last row is the model's own output"
    assert tuned["data"][0]["text"] != logit["data"][0]["text"], "a trained lens reads the earlier layers otherwise"
    mtime = path.stat().st_mtime_ns
    at = run_page("dynamics", dyn_lens="cached")  # a new session: the cached file is read, not trained again
    no_errors(at)
    assert path.stat().st_mtime_ns == mtime
    assert any("trained for this model" in c.value for c in at.caption)
    assert heatmap(at)["data"][0]["text"] == tuned["data"][0]["text"]


def test_damaged_cached_lens_is_trained_again_not_loaded():
    handle = modelstore.get_model(modelstore.ModelKey("tiny-llama"))
    tl.cached_tuned_lens(handle, progress=False)
    path = tl.cached_lens_path(handle)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="training it again"):
        at = run_page("dynamics", dyn_lens="cached")
    no_errors(at)
    assert path.stat().st_size == size and heatmap(at)["layout"]["title"]["text"].startswith("tuned lens")


def test_dynamics_page_follows_the_bos_toggle():
    with_bos = heatmap(run_page("dynamics", dyn_positions=96))["data"][0]["x"]
    st.cache_resource.clear()
    without = heatmap(run_page("dynamics", dyn_positions=96, **{BOS_STATE: False}))["data"][0]["x"]
    assert len(with_bos) == len(without) + 1


def test_iteration_with_the_decider_trained_for_this_model():
    handle = modelstore.get_model(modelstore.ModelKey("tiny-llama"))
    folder = decider_module.cached_decider_dir(handle)
    at = run_page("iteration")
    at.radio(key="iter_kind").set_value("cached MLP").run()
    no_errors(at)
    assert (folder / "decider.safetensors").is_file()
    at.slider(key="iter_threshold_cached_MLP").set_value(0.0).run()
    no_errors(at)
    assert {m.label: m.value for m in at.metric}["Tokens iterated"] == "100%"  # every sigmoid score is > 0
    at.slider(key="iter_threshold_cached_MLP").set_value(1.0).run()
    assert {m.label: m.value for m in at.metric}["Tokens iterated"] == "0%"
