"""Intention metrics: H_int, effective dimensionality, recoverability ("Intention Collapse: Intention-Level Metrics for Reasoning in Language Models" (arXiv 2601.01011) testable facts)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hiddenlens.analyses.intention import (effective_dimensionality, global_threshold_dimensionality,
                                           intention_entropy, layered_dimensionality, recoverability)
from hiddenlens.common.stats import auroc
from hiddenlens.probes.reducers import RunningStats


# ---- H_int ------------------------------------------------------------------------------------------------------
def test_uniform_logits_give_log2_of_support():
    logits = torch.zeros(3, 32768)
    assert torch.allclose(intention_entropy(logits, top_k=None), torch.full((3,), 15.0, dtype=torch.float64))
    assert intention_entropy(logits, top_k=100) == pytest.approx(math.log2(100), abs=1e-9)
    assert intention_entropy(logits[0], top_k=100, base=math.e).item() == pytest.approx(math.log(100), abs=1e-9)


def test_one_dominant_logit_gives_zero_entropy():
    logits = torch.zeros(32768)
    logits[7] = 50.0
    assert intention_entropy(logits, top_k=None).item() <= 1e-8
    assert intention_entropy(logits, top_k=100).item() <= 1e-8


def test_entropy_rejects_bad_input():
    with pytest.raises(ValueError, match="logits\\[:, -1\\]"):
        intention_entropy(torch.zeros(2, 3, 10))
    with pytest.raises(ValueError, match="NaN"):
        intention_entropy(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="top_k"):
        intention_entropy(torch.zeros(10), top_k=0)


# ---- dim_eff ----------------------------------------------------------------------------------------------------
def _isotropic(n, k, d, seed=0):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, k)))[0]
    return rng.normal(size=(n, k)) @ basis.T


def test_isotropic_k_dim_data_has_participation_ratio_k():
    x = _isotropic(20000, 10, 64)
    assert effective_dimensionality(x) == pytest.approx(10, rel=0.05)
    assert effective_dimensionality(x, "threshold") in (9, 10)


def test_streaming_covariance_gives_the_same_dimensionality_as_the_matrix():
    x = torch.from_numpy(_isotropic(3000, 7, 32, seed=1)) * torch.linspace(0.5, 2, 32)
    stats = RunningStats()
    for part in x.split(256):
        stats.update(part)
    for method in ("participation_ratio", "threshold", "mp_participation_ratio"):
        assert effective_dimensionality(stats, method) == pytest.approx(effective_dimensionality(x, method), rel=1e-9)


def test_participation_ratio_is_capped_below_n():
    x = np.random.default_rng(2).normal(size=(200, 4096))
    pr = effective_dimensionality(x)
    assert 170 < pr <= 199


def test_mp_correction_removes_noise_directions():
    rng = np.random.default_rng(3)
    signal = _isotropic(400, 3, 200, seed=3) * 10
    x = signal + rng.normal(size=(400, 200))
    # raw PR = (300 + 200)^2 / (3 * 100^2 + 200 * 1.5) ~ 8.3; the edge test drops most noise directions (the
    # median-based sigma^2 sits below the noise level, so a few noise eigenvalues near the edge survive)
    assert effective_dimensionality(x) > 7
    assert 3.0 <= effective_dimensionality(x, "mp_participation_ratio") <= 3.6


def test_twonn_recovers_a_linear_manifold_dimension():
    x = _isotropic(2000, 3, 20, seed=4)
    assert effective_dimensionality(x, "twonn") == pytest.approx(3, rel=0.15)
    with pytest.raises(ValueError, match="points"):
        effective_dimensionality(RunningStats().update(torch.from_numpy(x)), "twonn")


def test_aggregate_weights_follow_trace_and_equal_pr_when_layers_agree():
    a, b = _isotropic(5000, 6, 32, seed=5), _isotropic(5000, 6, 32, seed=6)
    res = layered_dimensionality({0: a, 1: b})
    assert res.aggregate == pytest.approx(res.table["dim_eff"].mean(), rel=0.02)
    scaled = layered_dimensionality({0: a, 1: 3 * b})
    assert scaled.table["dim_eff"].tolist() == pytest.approx(res.table["dim_eff"].tolist(), rel=1e-9)
    assert scaled.table["weight"][1] / scaled.table["weight"][0] == pytest.approx(
        9 * res.table["weight"][1] / res.table["weight"][0], rel=1e-9)


def test_global_threshold_stacks_layers_as_rows_for_matrices_and_stats():
    a, b = _isotropic(800, 4, 16, seed=7), _isotropic(800, 4, 16, seed=8) + 0.5
    from_matrix = global_threshold_dimensionality({0: a, 1: b})
    from_stats = global_threshold_dimensionality({0: RunningStats().update(torch.from_numpy(a)),
                                                  1: RunningStats().update(torch.from_numpy(b))})
    assert from_matrix == from_stats and from_matrix >= 4


def test_dimensionality_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown method"):
        effective_dimensionality(np.zeros((5, 3)), "pca")
    with pytest.raises(ValueError, match="at least 2"):
        effective_dimensionality(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        effective_dimensionality(np.array([[0.0, np.nan], [1.0, 2.0]]))


# ---- recoverability ---------------------------------------------------------------------------------------------
def _two_classes(n=200, sep=6.0, d=20, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, d))
    x[:, 0] += sep * y
    return x, y


def test_separated_classes_are_recovered_and_shuffled_labels_are_not():
    x, y = _two_classes()
    res = recoverability(x, y, n_boot=300)
    assert res.auroc > 0.99 and res.ci_low > 0.97 and res.n_splits == 5
    assert 0.35 <= res.shuffled_auroc <= 0.65
    perm = np.random.default_rng(1).permutation(y)
    assert 0.35 <= recoverability(x, perm, n_boot=100, shuffle_control=False).auroc <= 0.65


def test_split_protocol_reports_test_auroc_and_chosen_c():
    x, y = _two_classes(seed=2)
    res = recoverability(x, y, protocol="split", n_boot=200)
    assert res.protocol == "split" and res.auroc > 0.95 and res.C in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    assert res.train_auroc is not None and 0.35 <= res.shuffled_auroc <= 0.65


def test_constant_scores_and_constant_features_give_half():
    assert auroc(np.arange(10) % 2, np.ones(10)) == 0.5
    y = np.arange(100) % 2
    assert recoverability(np.ones((100, 3)), y, n_boot=100, shuffle_control=False).auroc == pytest.approx(0.5)


def test_rare_class_reduces_folds_with_a_warning_and_single_class_fails():
    x, y = _two_classes()
    y = np.zeros(200, dtype=int)
    y[:3] = 1
    with pytest.warns(UserWarning, match="3 folds"):
        assert recoverability(x, y, n_boot=50, shuffle_control=False).n_splits == 3
    with pytest.raises(ValueError, match="single class"):
        recoverability(x, np.ones(200))
    with pytest.raises(ValueError, match="at least 2 per class"):
        recoverability(x, np.r_[1, np.zeros(199)])
    with pytest.raises(ValueError, match="N = 200"):
        recoverability(x, y[:50])


def test_layered_features_are_concatenated():
    x, y = _two_classes(n=120, d=8)
    stacked = np.stack([np.random.default_rng(3).normal(size=x.shape), x], 1)  # [N, 2 layers, d]
    assert recoverability(stacked, y, n_boot=50, shuffle_control=False).auroc > 0.95


# ---- embedded model ---------------------------------------------------------------------------------------------
@pytest.mark.embedded
def test_intention_pass_matches_hf_hidden_states_and_logits(smollm):
    from hiddenlens.analyses.arithmetic import make_problems
    from hiddenlens.analyses.regimes import build_messages, chat_prompt_ids, intention_pass

    probs = make_problems(3)
    prompts = [chat_prompt_ids(smollm.tokenizer, build_messages(p, "direct")) for p in probs]
    res = intention_pass(smollm, prompts, layers=[10, 28, 29], batch_size=2)
    assert res["states"].shape == (3, 3, 576)
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            out = smollm.hf_model(torch.tensor([ids]), output_hidden_states=True)
        assert np.allclose(res["states"][i, 0], out.hidden_states[11][0, -1].numpy(), atol=1e-4)
        assert np.allclose(res["states"][i, 1], out.hidden_states[29][0, -1].numpy(), atol=1e-4)
        last = out.logits[0, -1]
        assert res["h_int_full"][i] == pytest.approx(float(intention_entropy(last, top_k=None)), abs=1e-4)
        assert 0 <= res["h_int"][i] <= math.log2(100) + 1e-9
    pr = effective_dimensionality(res["states"][:, 2])
    assert 1.0 <= pr <= 2.0  # 3 items: rank <= 2
