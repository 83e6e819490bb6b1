"""Latent-state dynamics: lens, trajectory statistics, geometry, token dynamics, belief states, tuned lens,
checkpoints (the logit lens and "Eliciting Latent Predictions from Transformers with the Tuned Lens" (arXiv 2303.08112) testable facts)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import hiddenlens as hl
from hiddenlens.analyses.checkpoints import over_checkpoints, parse_checkpoint, plot_over_checkpoints
from hiddenlens.analyses.dynamics import (belief_state_r2, cosine, dynamics_shares, dynamics_summary,
                                          io_matrix_eigenvalues, lens_logits, logit_lens, token_dynamics,
                                          token_rank)
from hiddenlens.analyses.tuned_lens import TunedLens, collect_states, lens_kl, train_tuned_lens
from hiddenlens.common.stats import js_divergence, kl_divergence
from hiddenlens.models.tiny import offline_prose


# ---- distribution and geometry facts ---------------------------------------------------------------------------
def test_divergences_and_rank_facts():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 30, generator=g) * 3, torch.randn(50, 30, generator=g) * 3
    assert torch.allclose(kl_divergence(a, a), torch.zeros(50), atol=1e-6)
    js = js_divergence(a, b)
    assert (js >= 0).all() and (js <= math.log(2)).all() and torch.allclose(js, js_divergence(b, a), atol=1e-6)
    disjoint = torch.log(torch.tensor([[1.0, 1e-30], [1e-30, 1.0]]))
    assert js_divergence(disjoint[0], disjoint[1], from_log_probs=True).item() == pytest.approx(math.log(2), abs=1e-5)
    target = torch.randint(0, 30, (50,), generator=g)
    assert torch.equal(token_rank(a, target), token_rank(a + 17.5, target))
    assert (token_rank(a, a.argmax(-1)) == 1).all()
    assert torch.allclose(cosine(a, a), torch.ones(50), atol=1e-6)


def test_token_dynamics_classifies_geometric_decay_and_growth():
    depth = torch.arange(12, dtype=torch.float64)[:, None]
    norms = torch.cat([torch.exp(-0.3 * depth).expand(12, 3), torch.exp(0.2 * depth).expand(12, 2)], 1)
    table = token_dynamics(norms)
    assert table["kind"].tolist() == ["convergent"] * 3 + ["divergent"] * 2
    assert table["slope"].tolist() == pytest.approx([-0.3] * 3 + [0.2] * 2)
    assert table["monotone"].all()
    assert dynamics_shares(table) == pytest.approx({"convergent": 0.6, "divergent": 0.4, "flat": 0.0})
    with pytest.raises(ValueError, match="positive"):
        token_dynamics(torch.zeros(4, 2))


def test_positive_definite_input_output_matrix_has_positive_eigenvalues():
    g = torch.Generator().manual_seed(1)
    p = torch.triu(torch.randn(8, 8, generator=g), 1) + torch.eye(8)  # upper triangular, unit diagonal
    d = torch.diag(torch.nn.functional.softplus(torch.randn(8, generator=g)) + 0.7)
    assert (io_matrix_eigenvalues(p, d @ p) > 0).all()   # S_C = P, S_B = D P  ->  P^T D P
    assert (io_matrix_eigenvalues(p, -d @ p) < 0).all()


# ---- belief-state predictability ---------------------------------------------------------------------------------
def _fsm(n_seq=60, length=40, k=5, v=3, seed=0):
    rng = np.random.default_rng(seed)
    table = rng.integers(0, k, size=(k, v))
    h, e, nxt, groups = [], [], [], []
    for s in range(n_seq):
        state = rng.integers(k)
        for _ in range(length):
            x = rng.integers(v)
            new = table[state, x]
            h.append(np.eye(k)[state]), e.append(np.eye(v)[x]), nxt.append(np.eye(k)[new]), groups.append(s)
            state = new
    return np.array(h), np.array(e), np.array(nxt), np.array(groups)


def test_deterministic_finite_state_machine_is_predictable():
    h, e, nxt, groups = _fsm()
    assert belief_state_r2(h, e, nxt, regressor="mlp", groups=groups)["r2"] > 0.95


def test_iid_latents_are_not_predictable_and_linear_dynamics_are():
    rng = np.random.default_rng(1)
    h, e = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 4))
    assert abs(belief_state_r2(h, e, rng.normal(size=(2000, 16)))["r2"]) < 0.05
    a, b = rng.normal(size=(16, 16)) / 4, rng.normal(size=(4, 16))
    res = belief_state_r2(h, e, h @ a + e @ b)
    assert res["r2"] > 0.999 and res["cosine"] > 0.999
    with pytest.raises(ValueError, match="same n"):
        belief_state_r2(h, e[:10], h)


# ---- lens on a tiny model ----------------------------------------------------------------------------------------
def test_last_layer_logit_lens_reproduces_the_model(tiny_llama):
    logits, traj = lens_logits(tiny_llama, "The function returns a value")
    assert logits.shape[0] == tiny_llama.n_layers + 1 and traj.sites[0] == "embed"
    assert torch.allclose(logits[-1], traj.logits[0], atol=1e-5)
    df = logit_lens(tiny_llama, "The function returns a value", target="next")
    last = df[df["layer"] == tiny_llama.n_layers - 1]
    assert last["kl_to_final"].max() < 1e-6 and (last["final_top1_rank"] == 1).all()
    assert np.allclose(last["cos_last"], 1.0, atol=1e-6) and last["growth"].isna().all()
    assert ((df["js_to_final"] >= 0) & (df["js_to_final"] <= math.log(2) + 1e-9)).all()
    assert df["target_rank"].isna().sum() == tiny_llama.n_layers + 1  # the last position has no next token


def test_zero_initialised_tuned_lens_equals_logit_lens(tiny_llama):
    lens = TunedLens.for_model(tiny_llama)
    plain, _ = lens_logits(tiny_llama, "Return the value of x")
    tuned, _ = lens_logits(tiny_llama, "Return the value of x", lens=lens)
    assert torch.equal(plain, tuned)


def test_tuned_lens_training_lowers_held_out_kl_and_round_trips(tiny_llama, tmp_path):
    text = offline_prose(40_000)
    train = [text[i:i + 300] for i in range(0, 24_000, 300)]
    held = [text[i:i + 300] for i in range(30_000, 36_000, 300)]
    lens, history = train_tuned_lens(tiny_llama, train, steps=30, tokens_per_step=256, max_tokens=4000, lr=4.0,
                                     init="zero", optimizer="sgd", progress=False)  # the paper's recipe
    assert len(history) == 30
    states, finals = collect_states(tiny_llama, held, lens.sites, max_tokens=1500, progress=False)
    before = lens_kl(tiny_llama, TunedLens.for_model(tiny_llama), states, finals)
    after = lens_kl(tiny_llama, lens, states, finals)
    assert (after < before).all() and after.sum() < 0.9 * before.sum()
    path = lens.save(tmp_path / "lens.safetensors")
    loaded = TunedLens.load(path, handle=tiny_llama)
    assert loaded.sites == lens.sites == ["embed", "blocks.0.resid_post", "blocks.1.resid_post",
                                          "blocks.2.resid_post"]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), lens.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="train-lens"):
        TunedLens.load(tmp_path / "missing.safetensors")


def test_streamed_summary_does_not_depend_on_batch_size(tiny_llama):
    prompts = ["The value of x", "Return a list of all the items in order", "A class", "Raise an error if"]
    a = dynamics_summary(tiny_llama, prompts, batch_size=1, progress=False)
    b = dynamics_summary(tiny_llama, prompts, batch_size=4, progress=False)
    assert list(a["site"]) == ["embed"] + [f"blocks.{l}.resid_post" for l in range(4)]
    assert np.isnan(a["layer"].iloc[0]) and list(a["layer"].iloc[1:]) == [0, 1, 2, 3]  # embed is no layer
    assert np.allclose(a.drop(columns="site").to_numpy(), b.drop(columns="site").to_numpy(), atol=1e-4,
                       equal_nan=True)
    assert a["kl_to_final"].iloc[-1] < 1e-6 and a["final_top1_agree"].iloc[-1] == 1.0


def test_over_checkpoints_builds_one_tidy_table(tmp_path):
    def load(spec, **kw):
        return hl.load_model("tiny-llama", seed=int(spec))

    df = over_checkpoints(["0", "1"], lambda h: dynamics_summary(h, ["The value", "A list of"], progress=False),
                          load=load, labels=["step0", "step1"])
    assert df.columns[0] == "checkpoint" and list(df["checkpoint"].unique()) == ["step0", "step1"]
    assert not np.allclose(df[df.checkpoint == "step0"]["entropy"], df[df.checkpoint == "step1"]["entropy"])
    fig = plot_over_checkpoints(df, "site", ["entropy", "kl_to_final"])
    assert len(fig.axes) == 2
    assert parse_checkpoint("org/model@step1000") == ("org/model", "step1000")
    with pytest.raises(ValueError, match="unique"):
        over_checkpoints(["0", "1"], lambda h: pd.DataFrame(), load=load, labels=["a", "a"])


# ---- embedded model ----------------------------------------------------------------------------------------------
@pytest.mark.embedded
def test_paris_rank_improves_toward_the_last_layer(smollm):
    df = logit_lens(smollm, "The capital of France is", target=" Paris")
    last_pos = df["position"].max()
    rows = df[df["position"] == last_pos].set_index("layer")
    ranks = rows["target_rank"]
    assert ranks.loc[29] == 1  # the model itself predicts " Paris"
    # measured: rank ~2000-5000 through layer 22, then 396, 92, 113, 34, 7, 3, 1 over layers 23-29
    assert ranks.loc[0:14].min() > 50 * ranks.loc[26:29].max()
    assert rows["top1_token"].loc[29] == " Paris"
    assert rows["kl_to_final"].loc[29] < 1e-6 and rows["final_top1_rank"].loc[29] == 1
    with torch.no_grad():
        ids = smollm.tokenize("The capital of France is").input_ids
        model_top = smollm.hf_model(ids).logits[0, -1].argmax().item()
    assert rows["top1_id"].loc[29] == model_top
