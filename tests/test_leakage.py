"""Semantic-leakage measurement (Gonen et al. leak-rate) and the replacement sweep."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import hiddenlens.analyses.leakage as leakage
from hiddenlens.analyses.leakage import (SentenceEmbedder, continuation_nll, leak_indicators, load_prompt_pairs,
                                         reduction)
from hiddenlens.studies.leakage import LeakageConfig, Result, default_ranges, leakage_sweep, result_of


def _unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_leak_indicators_known_answers():
    concept = _unit([[1, 0], [1, 0], [1, 0]])
    control = _unit([[0, 1], [1, 0], [1, 1]])
    test = _unit([[1, 1], [0, 1], [1, 1]])
    assert leak_indicators(concept, control, test).tolist() == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="shape mismatch"):
        leak_indicators(concept, control, test[:2])


def test_reduction_of_the_excess_over_chance():
    assert reduction(0.8, 0.65) == pytest.approx(0.5)
    assert reduction(0.7, 0.5) == pytest.approx(1.0)
    assert reduction(0.7, 0.8) == pytest.approx(-0.5)
    assert math.isnan(reduction(0.5, 0.4))


def test_shipped_prompt_pairs_and_bad_files(tmp_path):
    pairs = load_prompt_pairs()
    assert len(pairs) >= 20 and len({p.id for p in pairs}) == len(pairs)
    for p in pairs:
        assert p.concept_prompt.endswith(p.target) and p.control_prompt == p.target
        assert p.concept.lower() in p.concept_sentence.lower()
        assert p.concept.lower() not in p.target.lower()
    assert len(load_prompt_pairs(limit=3)) == 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"pairs": [{"id": "x", "concept": "y"}]}))
    with pytest.raises(ValueError, match="lacks"):
        load_prompt_pairs(bad)


def test_continuation_nll_matches_manual_and_stops_at_eos(tiny_llama):
    prompt = tiny_llama.tokenize(["The fox"], add_bos=True).input_ids[0].tolist()
    eos = tiny_llama.tokenizer.eos_token_id
    cont = torch.tensor([[40, 41, 42], [40, eos, 42]])
    nll = continuation_nll(tiny_llama, prompt, cont)
    with torch.no_grad():
        lp = torch.log_softmax(tiny_llama.hf_model(input_ids=torch.tensor([prompt + [40, 41, 42]])).logits[0], -1)
    p = len(prompt)
    manual = -(lp[p - 1, 40] + lp[p, 41] + lp[p + 1, 42]) / 3
    assert nll[0] == pytest.approx(float(manual), abs=1e-4)
    with torch.no_grad():
        lp2 = torch.log_softmax(tiny_llama.hf_model(input_ids=torch.tensor([prompt + [40, eos]])).logits[0], -1)
    assert nll[1] == pytest.approx(float(-(lp2[p - 1, 40] + lp2[p, eos]) / 2), abs=1e-4)  # token after EOS ignored


def test_fallback_embedder_warns_and_works(tiny_llama, monkeypatch):
    def missing():
        raise FileNotFoundError("no package")

    monkeypatch.setattr(leakage, "minilm_dir", missing)
    with pytest.warns(UserWarning, match="falling back"):
        emb = SentenceEmbedder(tiny_llama)
    assert emb.kind == "lm-mean-pool"
    v = emb.encode(["a red apple", "", "the tax office"])
    assert v.shape == (3, 64) and np.allclose(np.linalg.norm(v, axis=1), 1.0)
    with pytest.raises(ValueError, match="no sentence embedder"), pytest.warns(UserWarning, match="falling back"):
        SentenceEmbedder(None)


class _KeywordEmbedder:
    """Deterministic stand-in: a 2-D 'embedding' saying whether a text contains the letter e."""

    kind = "keyword"

    def encode(self, texts):
        return _unit([[1.0, 0.0] if "e" in t else [0.0, 1.0] for t in texts])


def test_sweep_structure_and_report_on_tiny(tiny_llama, tmp_path):
    pairs = load_prompt_pairs(limit=2)
    res = leakage_sweep(tiny_llama, pairs, ranges=[(0, 3), (3, 3)], n_samples=2, max_new_tokens=3,
                        embedder=_KeywordEmbedder(), progress=False)
    s = res.summary.set_index("condition")
    assert list(s.index) == ["control", "concept", "replace 0-3", "replace 3-3"]
    assert s.loc["control", "kl_from_control"] == 0.0 and s.loc["concept", "kl_from_control"] > 0
    assert len(res.samples) == 2 * 2 * 4
    # the leak column is the known-answer comparison against the paired control sample
    ctrl = res.samples[res.samples.condition == "control"].set_index(["pair", "sample"])
    for _, r in res.samples[res.samples.condition == "concept"].iterrows():
        c = ctrl.loc[(r.pair, r["sample"])]
        expected = 0.5 if r.similarity == c.similarity else float(r.similarity > c.similarity)
        assert r.leak == expected
    result_of(LeakageConfig(model="tiny-llama", ranges=[[0, 3], [3, 3]]), res).write(tmp_path)
    assert {"summary.json", "leakage.png", "report.md", "samples.parquet", "summary.csv", "study.json"} <= {
        p.name for p in tmp_path.iterdir()}
    back = Result.read(tmp_path)
    assert back.config.ranges == [[0, 3], [3, 3]] and back.summary["best_range"].startswith("replace")
    assert list(back.tables["summary"].condition) == list(s.index)
    assert default_ranges(30, 5) == [(0, 29), (7, 29), (14, 29), (22, 29), (29, 29)]
    with pytest.raises(ValueError, match="out of range"):
        leakage_sweep(tiny_llama, pairs, ranges=[(1, 9)], embedder=_KeywordEmbedder(), progress=False)


@pytest.mark.embedded
def test_embedded_minilm_and_sweep(smollm):
    emb = SentenceEmbedder(smollm)
    assert emb.kind == "all-MiniLM-L6-v2"
    v = emb.encode(["yellow", "a yellow school bus", "a tax accountant"])
    assert v[0] @ v[1] > v[0] @ v[2]
    res = leakage_sweep(smollm, load_prompt_pairs(limit=1), ranges=[(0, 29)], n_samples=2, max_new_tokens=2,
                        embedder=emb, progress=False)
    s = res.summary.set_index("condition")
    assert 0.0 <= s.loc["concept", "leak_rate"] <= 1.0 and np.isfinite(s.loc["replace 0-29", "ppl_unpatched_model"])
