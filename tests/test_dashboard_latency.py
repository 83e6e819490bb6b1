"""Issue 13, latency: the steering and leakage views keep what no change touches (the prompt's KV cache, the plain
continuation and its scores, the "before" run, the span's lone-run states), stream their tokens, show what runs,
and give the same numbers as computing everything again. Also: truth scores only where the detector means
something, the sidebar's BOS toggle on both pages, and the intention page's live-run status."""
from __future__ import annotations

import html
import re
from pathlib import Path

import pandas as pd
import pytest
import streamlit as st
import torch

from hiddenlens.analyses.truth import token_scores
from hiddenlens.dashboard import backend, modelstore
from hiddenlens.interventions.replace import (compare_replacement, continue_span_prompt, every_site,
                                              isolated_states, locate_span, select_states)
from hiddenlens.interventions.steer import (continuation_states, continue_prefilled, decode_greedy, prefill,
                                            steer_generate, steer_prefilled)
from hiddenlens.probes.direction import Direction

from dashboard_app import intention_live, run_page

PROMPT = "The capital of France is Paris. The capital of Germany is"
KEY = modelstore.ModelKey("tiny-llama")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No model and no cached result (Streamlit's caches are process-global); a truth run under the runs root."""
    monkeypatch.setenv(modelstore.MODEL_ENV, "tiny-llama")
    monkeypatch.setenv(modelstore.RUNS_ENV, str(tmp_path / "runs"))
    st.cache_resource.clear()
    modelstore.clear()
    yield tmp_path / "runs"
    st.cache_resource.clear()
    modelstore.clear()


def _direction(scale: float = 1.0) -> Direction:
    u = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(0)), dim=0)
    return Direction(u, sigma=scale, site="blocks.2.resid_post", method="mass_mean", model="tiny-llama")


def _truth_run(folder: Path) -> None:
    from hiddenlens.studies import truth as study

    layers = pd.DataFrame({"layer": [0, 1, 2, 3], "method": ["mass_mean"] * 4, "auroc": [0.5, 0.6, 0.7, 0.65]})
    study.Result(study.TruthConfig(model="tiny-llama"), {"best_layer": 2, "family": "capitals"},
                 {"layers": layers}, directions={"mass_mean": _direction()}).write(folder)


class Recorder:
    """The progress and stream callbacks of a page, recorded."""

    def __init__(self):
        self.stages: list[str] = []
        self.texts: dict[str, list[str]] = {}

    def progress(self, done: float, stage: str) -> None:
        assert 0.0 <= done <= 1.0
        self.stages.append(stage)

    def stream(self, which: str, text: str) -> None:
        self.texts.setdefault(which, []).append(text)

    def ran(self, prefix: str) -> bool:
        return any(s.startswith(prefix) for s in self.stages)


# ---- interventions: one prefill, the same tokens ----------------------------------------------------------------
@pytest.mark.parametrize("add_bos", [None, True])
def test_prefilled_decoding_gives_the_tokens_of_generate_and_steer_generate(tiny_llama, add_bos):
    d = _direction()
    pre = prefill(tiny_llama, PROMPT, add_bos=add_bos)
    P = len(pre.ids)
    ref = tiny_llama.generate([PROMPT], max_new_tokens=8, add_bos=add_bos)
    assert pre.ids + continue_prefilled(tiny_llama, pre, 8) == ref.sequences[0].tolist()
    for mode in ("generated", "all", "prompt"):
        for alpha in (0.0, 20.0):
            got = steer_prefilled(tiny_llama, pre, [d], alpha, mode, 8)
            want = steer_generate(tiny_llama, [PROMPT], [d], alpha, mode=mode, max_new_tokens=8, add_bos=add_bos)
            assert torch.equal(got.sequences.cpu(), want.sequences.cpu()), (mode, alpha)
            assert torch.allclose(got.added_norm, want.added_norm, atol=1e-5), (mode, alpha)
            assert got.texts == want.texts and got.prompt_length == P
    steered = steer_prefilled(tiny_llama, pre, [d], 20.0, "generated", 8)
    norms = steered.added_norm[0]
    assert (norms[:P - 1] == 0).all() and (norms[P - 1:-1] > 0).all(), "mode generated: from the last prompt position"
    assert norms[-1] == 0, "the last new token is chosen, never run"
    assert pre.cache.get_seq_length() == P - 1, "decoding works on copies: the prefill serves every alpha"
    # the unsteered states of the continuation, read on top of the prompt's cache, are those of a full forward
    ids = steered.sequences[0].tolist()
    h = continuation_states(tiny_llama, pre, ids, d.site)
    full = token_scores(tiny_llama, d, ids, 0)
    assert h.shape == (len(ids) - P + 1, 64)
    assert torch.allclose(d.p_true(h), torch.tensor(full["p_true"].to_numpy()[P - 1:], dtype=torch.float32),
                          atol=1e-5)


def test_prefilled_steering_checks_its_inputs(tiny_llama):
    pre = prefill(tiny_llama, PROMPT)
    with pytest.raises(ValueError, match="conditional"):
        steer_prefilled(tiny_llama, pre, [_direction()], 1.0, "conditional", 4)
    with pytest.raises(ValueError, match="alpha"):
        steer_prefilled(tiny_llama, pre, [_direction()], "big", "generated", 4)
    with pytest.raises(ValueError, match="prefilled prompt"):
        continuation_states(tiny_llama, pre, [1, 2, 3], "blocks.2.resid_post")


def test_greedy_decoding_streams_every_token(tiny_llama):
    ids = tiny_llama.tokenize([PROMPT]).input_ids[0].tolist()
    seen = []
    new, first = decode_greedy(tiny_llama.with_backend("hf"), ids, 6, on_token=seen.append)
    assert seen == [new[:k] for k in range(1, 7)]
    logits = tiny_llama.run([ids]).logits[0, -1]
    assert int(first.argmax()) == new[0] and torch.allclose(first, logits.float().cpu(), atol=1e-4)


def test_replacement_from_kept_parts_equals_a_fresh_comparison(tiny_llama):
    span = locate_span(tiny_llama, PROMPT, "France")
    lone = isolated_states(tiny_llama, span, every_site(tiny_llama.n_layers))
    assert torch.equal(select_states(lone, (1, 2), tiny_llama.n_layers), isolated_states(tiny_llama, span, (1, 2)))
    before, log = continue_span_prompt(tiny_llama, span, max_new_tokens=6)
    assert log is None
    fresh = compare_replacement(tiny_llama, PROMPT, "France", (1, 3), max_new_tokens=6)
    kept = compare_replacement(tiny_llama, PROMPT, span, (1, 3), max_new_tokens=6, before=before,
                               states=select_states(lone, (1, 3), tiny_llama.n_layers))
    assert kept.continuation_before == fresh.continuation_before
    assert kept.continuation_after == fresh.continuation_after != fresh.continuation_before
    assert kept.kl_after_before == pytest.approx(fresh.kl_after_before, abs=1e-6) and fresh.kl_after_before > 0
    pd.testing.assert_frame_equal(kept.table, fresh.table)
    other = locate_span(tiny_llama, PROMPT, "France", add_bos=False)
    with pytest.raises(ValueError, match="another prompt"):
        compare_replacement(tiny_llama, PROMPT, other, (1, 3), add_bos=False, max_new_tokens=6, before=before)


# ---- backend: what an alpha, span or layer change recomputes ------------------------------------------------------
def test_steer_compare_keeps_the_prompt_and_the_plain_run_across_alphas(fresh):
    _truth_run(fresh / "truth")
    source = ("run", str(fresh / "truth"))
    first = Recorder()
    runs = backend.steer_compare(KEY, PROMPT, source, "mass_mean", 0.0, "generated", 8, True, first.progress,
                                 first.stream)
    assert [first.ran(s) for s in ("Prefilling", "Plain continuation", "Scoring the plain",
                                   "Steered continuation (alpha 0)", "Scoring the steered")] == [True] * 5
    plain, steered = runs["plain"], runs["steered"]
    assert plain["token"].tolist() == steered["token"].tolist(), "alpha 0 changes nothing"
    assert steered["p_true"].to_numpy() == pytest.approx(plain["p_true"].to_numpy(), abs=1e-5)
    handle = modelstore.get_model(KEY)
    new = plain[plain["generated"]]["token"].str.cat()
    assert first.texts["plain"][-1] == first.texts["steered"][-1] == new, "the streamed text is the continuation"
    assert len(first.texts["steered"]) == int(steered["generated"].sum()) == 8

    second = Recorder()
    runs = backend.steer_compare(KEY, PROMPT, source, "mass_mean", 20.0, "generated", 8, True, second.progress,
                                 second.stream)
    assert not any(second.ran(s) for s in ("Prefilling", "Plain continuation", "Scoring the plain"))
    assert second.ran("Steered continuation (alpha 20)") and set(second.texts) == {"steered"}
    assert runs["plain"] is plain
    steered = runs["steered"]
    assert steered["token"].tolist() != plain["token"].tolist()
    want = steer_generate(handle, [PROMPT], [_direction()], 20.0, max_new_tokens=8, add_bos=True)
    assert steered["token"].tolist() == [handle.tokenizer.decode([t]) for t in want.sequences[0].tolist()]
    full = token_scores(handle, _direction(), want.sequences[0].tolist(), 0)
    assert steered["p_true"].to_numpy() == pytest.approx(full["p_true"].to_numpy(), abs=1e-5)
    assert steered["statement_end"].tolist() == [t.strip().endswith(".") for t in steered["token"]]

    third = Recorder()
    again = backend.steer_compare(KEY, PROMPT, source, "mass_mean", 20.0, "generated", 8, True, third.progress,
                                  third.stream)
    assert third.stages == [] and again["steered"] is steered, "an alpha seen before is kept"


def test_leakage_keeps_the_before_run_and_the_lone_states(fresh):
    first = Recorder()
    backend.replacement(KEY, PROMPT, "France", 0, 1, max_new_tokens=6, progress=first.progress,
                        stream=first.stream)
    assert first.ran("Plain continuation") and first.ran("Running the span 'France'")
    assert first.ran("Continuation with 'France' replaced at blocks 0-1")
    layers = Recorder()
    got = backend.replacement(KEY, PROMPT, "France", 1, 3, max_new_tokens=6, progress=layers.progress,
                              stream=layers.stream)
    assert not layers.ran("Plain continuation") and not layers.ran("Running the span")
    assert set(layers.texts) == {"after"} and layers.texts["after"][-1] == got.continuation_after
    want = compare_replacement(modelstore.get_model(KEY), PROMPT, "France", (1, 3), add_bos=True, max_new_tokens=6)
    assert (got.continuation_before, got.continuation_after) == (want.continuation_before, want.continuation_after)
    assert got.kl_after_before == pytest.approx(want.kl_after_before, abs=1e-6)
    span = Recorder()
    backend.replacement(KEY, PROMPT, "Paris", 1, 3, max_new_tokens=6, progress=span.progress, stream=span.stream)
    assert span.ran("Running the span 'Paris'") and not span.ran("Plain continuation")


# ---- pages --------------------------------------------------------------------------------------------------------
def _spans(body: str) -> list[tuple[str, str]]:
    return [(t, html.unescape(x)) for t, x in re.findall(r'<span title="([^"]*)"[^>]*>(.*?)</span>', body, re.S)]


@pytest.mark.parametrize("add_bos", [True, False])
def test_truth_page_colours_only_where_the_detector_was_fitted(fresh, add_bos):
    _truth_run(fresh / "truth")
    at = run_page("truth", hl_add_bos=add_bos)
    at.text_input(key="truth_path").input(str(fresh / "truth")).run()
    assert not at.exception and [e.value for e in at.error] == []
    bodies = [h.proto.body for h in at.get("html")]
    assert len(bodies) == 2
    for body in bodies:
        spans = _spans(body)
        assert spans and any(tok.strip().endswith(".") for _, tok in spans)
        for title, tok in spans:
            assert title.startswith("p_true ") == tok.strip().endswith("."), (title, tok)
    handle = modelstore.get_model(KEY)
    text = at.dataframe[0].value.iloc[0]["plain"]
    assert text.startswith(handle.tokenizer.bos_token) == add_bos, "the sidebar's BOS toggle reaches the page"
    caption = next(c.value for c in at.caption if c.value.startswith("Colour:"))
    assert "fitted on statements tokenized without BOS" in caption  # tiny-llama's tokenizer adds none
    assert caption.endswith("not fitted on.") == add_bos
    labels = [m.label for m in at.metric]
    assert labels == ["p_true at the new statement ends (plain)", "p_true at the new statement ends (steered)"]


def test_leakage_page_follows_the_bos_toggle(fresh):
    at = run_page("leakage", hl_add_bos=False)
    at.selectbox(key="leak_span").set_value("France").run()
    at.slider(key="leak_layers").set_value((1, 3)).run()
    assert not at.exception and [e.value for e in at.error] == []
    want = compare_replacement(modelstore.get_model(KEY), PROMPT, "France", (1, 3), add_bos=False,
                               max_new_tokens=16)
    assert [c.value for c in at.code] == [PROMPT + want.continuation_before, PROMPT + want.continuation_after]
    assert len(at.get("progress")) == 0, "the progress bar is gone once the run is done"


def test_intention_live_run_says_what_it_computed(fresh):
    at = intention_live()
    assert not at.exception
    assert [(s.label, s.state) for s in at.status] == [("Computed live: 4 problems x 1 regimes", "complete")]
