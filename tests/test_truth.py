"""Truthful directions on synthetic data with known answers ("Inference-Time Intervention: Eliciting Truthful Answers from a Language Model" (arXiv 2306.03341) and "Representation Engineering: A Top-Down Approach to AI Transparency" (arXiv 2310.01405)), data splits, save/load."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

import pytest
import torch

from hiddenlens.analyses import truth as T
from hiddenlens.analyses.truth_data import FAMILIES, data_hash, load_capitals, make_statements
from hiddenlens.probes.direction import load_directions, save_directions


def two_clusters(n=2000, d=32, snr=3.0, seed=0, axis=None):
    """Two Gaussians at +-mu * axis (unit noise): separation / noise std = snr."""
    rng = np.random.default_rng(seed)
    axis = np.eye(d)[0] if axis is None else axis
    y = rng.integers(0, 2, n)
    X = rng.standard_normal((n, d)) + np.where(y[:, None] == 1, 1, -1) * (snr / 2) * axis
    return X, y


# ---- data -------------------------------------------------------------------------------------------------
def test_statements_split_by_entity_and_are_deterministic():
    df = make_statements(FAMILIES, seed=0)
    assert len(load_capitals()) >= 100
    for fam, g in df.groupby("family"):
        owners = g.groupby("entity").split.nunique()
        assert (owners == 1).all(), f"{fam}: an entity appears in two splits"
        assert set(g.split) == {"train", "val", "test"}
        assert (g.groupby("pair_id").label.apply(sorted).apply(tuple) == (0, 1)).all()
    caps = df[df.family == "capitals"].set_index("entity").split
    negs = df[df.family == "negations"].set_index("entity").split
    assert (caps.groupby(level=0).first() == negs.groupby(level=0).first()).all()
    row = df[(df.family == "capitals") & (df.entity == "France") & (df.label == 1)].iloc[0]
    assert row.text == "The capital of France is Paris."
    row = df[(df.family == "arithmetic") & (df.prompt == "3 + 4 =") & (df.label == 1)].iloc[0]
    assert row.text == "3 + 4 = 7."
    assert data_hash(make_statements(FAMILIES, seed=0)) == data_hash(df)
    assert data_hash(make_statements(FAMILIES, seed=1)) != data_hash(df)


def test_unknown_family_fails_loudly():
    with pytest.raises(ValueError, match="choose from"):
        make_statements(["capitals", "colours"])


# ---- testable facts from the papers (ITI, RepE) -----------------------------------------------------------------------------
def test_mass_mean_parallel_to_separation_axis_and_sigma_pooled():
    """"Inference-Time Intervention: Eliciting Truthful Answers from a Language Model" (arXiv 2306.03341): cos > 0.99 for N = 2000, SNR = 3; sigma = pooled projected std."""
    rng = np.random.default_rng(1)
    axis = rng.standard_normal(32)
    axis /= np.linalg.norm(axis)
    X, y = two_clusters(axis=axis)
    u, sigma, det = T.fit_direction(X, y, "mass_mean")
    assert abs(u @ axis) > 0.99
    assert u @ axis > 0  # points from false to true
    # pooled std of the projection: within-class 1 plus between-class spread (snr/2)^2
    assert sigma == pytest.approx(np.sqrt(1 + 1.5 ** 2), rel=0.05)
    auc, acc = T.auroc_accuracy(u, det, *two_clusters(seed=2, axis=axis))
    assert auc > 0.95 and acc > 0.9


def test_repe_first_pc_of_paired_differences_and_sign():
    """"Representation Engineering: A Top-Down Approach to AI Transparency" (arXiv 2310.01405): pairs differing by +-delta e1 plus isotropic noise give PC1 = +-e1; sign from labels."""
    rng = np.random.default_rng(3)
    n, d = 400, 24
    base = rng.standard_normal((n, d)) * 3
    e1 = np.eye(d)[0]
    true = base + 2.0 * e1 + 0.3 * rng.standard_normal((n, d))
    false = base - 2.0 * e1 + 0.3 * rng.standard_normal((n, d))
    X = np.concatenate([true, false])
    y = np.r_[np.ones(n), np.zeros(n)]
    pairs = np.r_[np.arange(n), np.arange(n)]
    u, _, _ = T.fit_direction(X, y, "repe", pair_ids=pairs)
    assert u @ e1 > 0.99
    u_flipped, _, _ = T.fit_direction(X, 1 - y, "repe", pair_ids=pairs)
    assert u_flipped @ e1 < -0.99


def test_probe_direction_separates():
    X, y = two_clusters(n=600, snr=3.0, seed=4)
    u, _, det = T.fit_direction(X, y, "probe")
    assert u[0] > 0.9
    auc, _ = T.auroc_accuracy(u, det, *two_clusters(n=600, seed=5))
    assert auc > 0.95


def test_probe_is_the_converged_l2_logistic_regression():
    """The probe solves ITI's objective (L2 logistic regression, C = 1, raw features) to its optimum, also when one
    feature is 1000x the others' scale (a residual stream's massive activations): the coefficient equals a
    tightly converged reference fit."""
    from sklearn.linear_model import LogisticRegression

    X, y = two_clusters(n=400, d=16, snr=1.0, seed=6)
    X[:, 3] *= 1000.0
    ref = LogisticRegression(C=1.0, tol=1e-12, max_iter=100_000).fit(X, y).coef_[0]
    got = T.probe_direction(X, y)
    assert np.linalg.norm(got - ref) < 1e-4 * np.linalg.norm(ref)     # lbfgs at max_iter=1000: 4e-4


def test_top_k_picks_planted_head():
    """"Inference-Time Intervention: Eliciting Truthful Answers from a Language Model" (arXiv 2306.03341): top-K selection picks the head with the strongest planted signal."""
    n, L, H, hd = 300, 3, 4, 8

    def acts(seed):
        r = np.random.default_rng(seed)
        y = r.integers(0, 2, n)
        A = r.standard_normal((n, L, H, hd))
        sign = np.where(y == 1, 1.0, -1.0)
        A[:, 2, 1, 0] += 1.5 * sign   # strongest
        A[:, 0, 3, 2] += 0.5 * sign   # weaker
        return torch.from_numpy(A).float(), torch.from_numpy(y)

    (tr, ytr), (va, yva), (te, yte) = acts(10), acts(11), acts(12)
    table = T.head_sweep(tr, ytr, va, yva, te, yte, layers=[0, 1, 2])
    assert T.top_k_heads(table, 1) == [(2, 1)]
    assert T.top_k_heads(table, 2) == [(2, 1), (0, 3)]
    dirs = T.iti_directions(torch.cat([tr, va]), torch.cat([ytr, yva]), [0, 1, 2], [(2, 1)], table=table)
    assert dirs[0].site == "blocks.2.attn.z" and dirs[0].head == 1 and abs(float(dirs[0].vector[0])) > 0.95


def test_layer_sweep_finds_signal_layer():
    rng = np.random.default_rng(7)
    n, L, d = 400, 4, 16
    y = rng.integers(0, 2, n)
    A = rng.standard_normal((n, L, d))
    A[:, 2, 0] += np.where(y == 1, 1.5, -1.5)
    A = torch.from_numpy(A).float()
    tr, te = slice(0, 300), slice(300, None)
    table, fitted = T.layer_sweep(A[tr], y[tr], A[te], y[te], [0, 1, 2, 3], methods=("mass_mean", "probe"))
    best = table.sort_values("auroc").iloc[-1]
    assert best.layer == 2 and best.auroc > 0.9
    assert table[table.layer != 2].auroc.max() < 0.7
    assert ("probe", 2) in fitted


def test_procrustes_recovers_rotation_and_transfer_aligns():
    rng = np.random.default_rng(8)
    k = 6
    Q = np.linalg.qr(rng.standard_normal((k, k)))[0]
    A = rng.standard_normal((50, k))
    assert np.allclose(T.procrustes(A @ Q.T, A), Q, atol=1e-8)
    # source space with a truth signal; target = rotated source + noise (same inputs in both "models")
    d = 20
    X, y = two_clusters(n=800, d=d, snr=3.0, seed=9)
    X[:, :8] *= 3  # give the PCA a well-defined spread
    Rot = np.linalg.qr(rng.standard_normal((d, d)))[0]
    Xt = X @ Rot + 0.05 * rng.standard_normal(X.shape)
    res = T.subspace_transfer(X[:400], y[:400], Xt[400:], y[400:], X[:400], Xt[:400], k=10)
    assert res["auroc_aligned"] > 0.95
    held_out_source = T.subspace_transfer(X[:400], y[:400], X[400:], y[400:], X[:400], X[:400], k=10)
    assert abs(res["auroc_aligned"] - held_out_source["auroc_aligned"]) < 0.02
    ia, ib = T.class_matched_pairs(y[:100], y[100:300])
    assert (y[:100][ia] == y[100:300][ib]).all()


def test_bad_inputs_fail_loudly():
    X, y = two_clusters(n=50, d=4)
    with pytest.raises(ValueError, match="unknown method"):
        T.fit_direction(X, y, "cca")
    with pytest.raises(ValueError, match="both 0"):
        T.fit_direction(X, np.ones(50), "mass_mean")
    Xn = X.copy()
    Xn[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        T.fit_direction(Xn, y, "mass_mean")
    with pytest.raises(ValueError, match="pair_ids"):
        T.fit_direction(X, y, "repe")
    with pytest.raises(ValueError, match="expected X"):
        T.fit_direction(X, y[:10], "mass_mean")


# ---- save / load --------------------------------------------------------------------------------------------
def test_direction_roundtrip(tmp_path):
    d = T.Direction(torch.tensor([0.6, 0.8, 0.0]), 2.5, "blocks.7.resid_post", None, "probe", "m", "abc",
                    (1.5, -0.2), {"test_auroc": 0.9})
    stem = d.save(tmp_path / "dir")
    back = T.Direction.load(str(stem) + ".safetensors")
    assert torch.equal(back.vector, d.vector) and back.sigma == 2.5 and back.layer == 7
    assert back.detector == (1.5, -0.2) and back.metrics == {"test_auroc": 0.9} and back.method == "probe"
    heads = [T.Direction(torch.randn(4), 1.0, "blocks.1.attn.z", h, "mass_mean") for h in range(3)]
    save_directions(heads, tmp_path / "heads")
    loaded = load_directions(tmp_path / "heads.json")
    assert [x.head for x in loaded] == [0, 1, 2]
    assert all(torch.equal(a.vector, b.vector) for a, b in zip(heads, loaded))
    assert len(load_directions(tmp_path / "dir")) == 1
    with pytest.raises(FileNotFoundError, match="truth directions"):
        T.Direction.load(tmp_path / "missing")
    assert json.loads((tmp_path / "dir.json").read_text())["format"] == 2
    assert "blocks.7.resid_post" in repr(d) and len(repr(d)) < 120  # one short line, not the vector
    with pytest.raises(ValueError, match="need a head"):
        T.Direction(torch.randn(4), 1.0, "blocks.1.attn.z")
    with pytest.raises(ValueError, match="take a head"):
        T.Direction(torch.randn(4), 1.0, "blocks.1.resid_post", head=0)


def test_version_1_direction_files_still_load(tmp_path):
    """Files written before directions were addressed by site name (layer + site kind, no format field)."""
    from safetensors.torch import save_file

    save_file({"vector": torch.tensor([1.0, 0.0])}, str(tmp_path / "old.safetensors"))
    (tmp_path / "old.json").write_text(json.dumps({"sigma": 2.0, "layer": 5, "site": "resid_post", "head": None,
                                                   "method": "probe", "model": "m", "data_hash": "",
                                                   "metrics": {}, "detector": [1.0, 0.0]}))
    old = T.Direction.load(tmp_path / "old")
    assert old.site == "blocks.5.resid_post" and old.layer == 5 and old.sigma == 2.0
    save_file({"vector.0": torch.ones(3), "vector.1": torch.tensor([0., 1., 0.])}, str(tmp_path / "heads.safetensors"))
    meta = {"sigma": 1.0, "layer": 2, "site": "attn.z", "method": "mass_mean", "model": "", "data_hash": "",
            "metrics": {}, "detector": [1.0, 0.0]}
    (tmp_path / "heads.json").write_text(json.dumps({"directions": [meta | {"head": 0}, meta | {"head": 3}]}))
    heads = load_directions(tmp_path / "heads")
    assert [(h.site, h.head) for h in heads] == [("blocks.2.attn.z", 0), ("blocks.2.attn.z", 3)]


# ---- on a tiny model (plumbing; the embedded model carries the real claims) -----------------------------------
def test_extract_and_token_scores_on_tiny(tiny_llama):
    texts = ["The capital of France is Paris.", "1 + 1 = 2.", "Which is larger, 3 or 5? The larger is 5."]
    acts = T.extract_last_token(tiny_llama, texts, layers=[1, 3], heads=True, batch_size=2)
    assert acts["resid"].shape == (3, 2, 64) and acts["heads"].shape == (3, 2, 4, 16)
    from hiddenlens.probes.capture import capture
    with capture(tiny_llama, ["blocks.3.resid_post"], positions="last") as cache:
        tiny_llama.run(texts[1:2], logits=False)
    assert torch.allclose(acts["resid"][1, 1], cache["blocks.3.resid_post"][0, -1], atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        T.extract_last_token(tiny_llama, texts, layers=[4])
    d = T.Direction(torch.nn.functional.normalize(torch.randn(64), dim=0), 1.0, "blocks.2.resid_post")
    df = T.token_scores(tiny_llama, d, "The capital of France is", max_new_tokens=4)
    assert df.generated.sum() == 4 and len(df) == (~df.generated).sum() + 4
    assert df.p_true.between(0, 1).all() and isinstance(df, pd.DataFrame)


# ---- selection on validation only -------------------------------------------------------------------------
def test_select_layer_uses_validation_not_test():
    table = pd.DataFrame(dict(layer=[1, 2, 3] * 2, method=["probe"] * 3 + ["mass_mean"] * 3,
                              auroc=[0.99, 0.60, 0.70, 0.5, 0.5, 0.5],          # test: layer 1 looks best
                              val_auroc=[0.55, 0.90, 0.90, 0.9, 0.5, 0.5]))      # validation: layers 2 and 3 tie
    assert T.select_layer(table, "probe") == 2                                   # ties go to the earlier layer
    assert T.select_layer(table, "mass_mean") == 1
    with pytest.raises(ValueError, match="validation columns"):
        T.select_layer(table.drop(columns="val_auroc"), "probe")


def test_test_labels_never_reach_the_selection(tiny_llama, monkeypatch):
    """Flip every test label: the chosen layer and the saved directions must not change (only test scores do)."""
    honest = T.fit_truth(tiny_llama, "capitals", layers=[1, 2, 3], k_heads=0)
    real = T.make_statements

    def flipped(*args, **kwargs):
        df = real(*args, **kwargs)
        test = df.split == "test"
        df.loc[test, "label"] = 1 - df.loc[test, "label"]
        return df

    monkeypatch.setattr(T, "make_statements", flipped)
    leaked = T.fit_truth(tiny_llama, "capitals", layers=[1, 2, 3], k_heads=0)
    assert leaked.best_layer == honest.best_layer
    assert leaked.summary["best_layer_chosen_on"] == "val"
    for method, d in honest.directions.items():
        assert torch.equal(d.vector, leaked.directions[method].vector) and d.sigma == leaked.directions[method].sigma
    assert not np.allclose(honest.layers.auroc, leaked.layers.auroc)              # the test scores did change
    assert np.allclose(honest.layers.val_auroc, leaked.layers.val_auroc)
