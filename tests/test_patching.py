"""Causal toolkit: activation / attribution patching, ablations, direct logit attribution (known answers)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hiddenlens as hl
from hiddenlens.analyses.dla import direct_logit_attribution
from hiddenlens.interventions.patching import (PromptPair, ablation_op, activation_patching, attribution_patching,
                                               compare)

# single-token answers of the tiny models' byte-level tokenizer (the embedded model is used in docs/patching.md)
PAIRS = [PromptPair("The capital of France is", "The capital of Italy is", " a", " b"),
         PromptPair("The cuisine of France is", "The cuisine of Italy is", " a", " b")]


@pytest.fixture(scope="module")
def denoise(tiny_llama):
    return activation_patching(tiny_llama, PAIRS, "blocks.*.resid_post", progress=False)


def test_last_layer_last_position_is_clean_and_shared_prefix_is_corrupt(tiny_llama, denoise):
    cells, n = denoise.cells, tiny_llama.n_layers
    last = cells[(cells.site == f"blocks.{n - 1}.resid_post") & (cells.position == cells.position.max())]
    assert np.allclose(last["normalized"], 1.0, atol=1e-5)  # by construction: the clean last state
    first = cells[cells.position == 0]                      # "The" is the same token in both prompts
    assert np.allclose(first["normalized"], 0.0, atol=1e-6)  # patching an identical state changes nothing
    summary = denoise.summary()
    assert {"normalized", "ci_low", "ci_high", "n_pairs"} <= set(summary.columns) and summary.n_pairs.eq(2).all()
    grid = denoise.grid()
    assert grid.shape == (n, len(tiny_llama.tokenize(PAIRS[0].clean).input_ids[0]))
    assert list(denoise.pairs.columns[:3]) == ["pair", "clean", "corrupted"]


def test_probability_metric(tiny_llama):
    prob = activation_patching(tiny_llama, PAIRS, f"blocks.{tiny_llama.n_layers - 1}.resid_post", positions=[-1],
                               metric="prob", progress=False)
    assert np.allclose(prob.cells["normalized"], 1.0, atol=1e-5)
    assert prob.pairs["metric_clean"].between(0, 1).all()
    with pytest.raises(ValueError, match="metric"):
        activation_patching(tiny_llama, PAIRS, metric="rank", progress=False)


def test_noising_breaks_the_clean_run(tiny_llama):
    noise = activation_patching(tiny_llama, PAIRS[:1], f"blocks.{tiny_llama.n_layers - 1}.resid_post",
                                direction="noise", positions=[-1], progress=False)
    assert np.allclose(noise.cells["normalized"], 0.0, atol=1e-5)  # the corrupted last state = the corrupted run


def test_attribution_equals_activation_patching_where_the_metric_is_linear(tiny_llama):
    """After ``final_norm`` only the (linear) unembedding runs: first order is exact."""
    act = activation_patching(tiny_llama, PAIRS, "final_norm", progress=False)
    att = attribution_patching(tiny_llama, PAIRS, "final_norm", progress=False)
    both = compare(act, att)
    assert np.allclose(both["activation"], both["attribution"], atol=1e-4)
    resid = compare(activation_patching(tiny_llama, PAIRS, "blocks.*.resid_post", progress=False),
                    attribution_patching(tiny_llama, PAIRS, "blocks.*.resid_post", progress=False))
    assert resid.attrs["pearson_r"] > 0.5  # an approximation elsewhere, reported with its correlation


def test_per_head_attribution_adds_up_to_the_attention_output(tiny_llama):
    """attn.out = W_O z + b is linear in z, so the heads' first-order terms sum to the attention output's."""
    heads = attribution_patching(tiny_llama, PAIRS, "blocks.*.attn.z", per_head=True, progress=False).cells
    out = attribution_patching(tiny_llama, PAIRS, "blocks.*.attn.out", progress=False).cells
    per_layer_heads = heads.groupby(["pair", "layer"])["normalized"].sum()
    per_layer_out = out.groupby(["pair", "layer"])["normalized"].sum()
    assert np.allclose(per_layer_heads.to_numpy(), per_layer_out.to_numpy(), atol=1e-4)
    assert heads["head"].notna().all() and per_layer_heads.abs().max() > 0


def test_per_head_patching_and_backends_agree(tiny_llama):
    ref = activation_patching(tiny_llama, PAIRS[:1], "blocks.*.attn.z", per_head=True, progress=False)
    assert ref.cells["head"].notna().all() and ref.grid().shape == (tiny_llama.n_layers, 4)
    for backend in ("transformer_lens", "nnsight"):
        got = activation_patching(tiny_llama.with_backend(backend), PAIRS[:1], "blocks.*.attn.z", per_head=True,
                                  progress=False)
        assert np.allclose(got.cells["metric"], ref.cells["metric"], atol=1e-4), backend


def test_ablations(tiny_llama):
    h = tiny_llama
    prompt, donor = "The capital of France is", "The capital of Italy is"
    with hl.edit(h, {"blocks.0.resid_pre": ablation_op(h, "blocks.0.resid_pre", "resample", [donor])}):
        resampled = h.run([prompt]).logits
    assert torch.equal(resampled, h.run([donor]).logits)  # the whole input of block 0 comes from the donor
    with hl.capture(h, "blocks.1.mlp.out") as cache:
        h.run([donor])
    mean = cache["blocks.1.mlp.out"][0].mean(0)
    with hl.edit(h, {"blocks.1.mlp.out": ablation_op(h, "blocks.1.mlp.out", "mean", [donor])}), \
            hl.capture(h, "blocks.1.mlp.out") as after:
        h.run([prompt])
    assert torch.allclose(after["blocks.1.mlp.out"][0], mean.expand_as(after["blocks.1.mlp.out"][0]), atol=1e-5)
    with hl.edit(h, {"blocks.1.attn.z": ablation_op(h, "blocks.1.attn.z", "zero")}, heads=[2]), \
            hl.capture(h, "blocks.1.attn.z") as z:
        h.run([prompt])
    assert z["blocks.1.attn.z"][0, 2].abs().max() == 0 and z["blocks.1.attn.z"][0, 1].abs().max() > 0
    with pytest.raises(ValueError, match="reference"):
        ablation_op(h, "blocks.1.mlp.out", "mean")


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_dla_parts_sum_to_the_logits(request, fixture):
    h = request.getfixturevalue(fixture)
    df = direct_logit_attribution(h, "The capital of France is", [" a", " b"])
    logits = h.run(["The capital of France is"]).logits[0, -1]
    for tok, col in zip([" a", " b"], df.columns[3:]):
        tid = h.tokenizer(tok, add_special_tokens=False)["input_ids"][0]
        assert abs(df[col].sum() - float(logits[tid])) < 1e-4
    heads = direct_logit_attribution(h, "The capital of France is", [" a"], per_head=True)
    whole = direct_logit_attribution(h, "The capital of France is", [" a"], per_head=False)
    for layer in range(h.n_layers):
        per = heads[(heads.layer == layer) & heads.component.isin(["attn_head", "attn_bias"])][" a"].sum()
        assert abs(per - whole[(whole.layer == layer) & (whole.component == "attn")][" a"].sum()) < 1e-4


def test_bad_pairs_fail_loudly(tiny_llama):
    with pytest.raises(ValueError, match="same token length"):
        activation_patching(tiny_llama, [PromptPair("The capital of France is", "The capital of Peru is",
                                                    " a", " b")], progress=False)
    with pytest.raises(ValueError, match="single-token"):
        activation_patching(tiny_llama, [PromptPair("a b", "a c", " R", " a")], progress=False)
    with pytest.raises(ValueError, match="one template"):
        activation_patching(tiny_llama, [PAIRS[0], PromptPair("The anthem of France is", "The anthem of Italy is",
                                                               " a", " b")], progress=False)
    with pytest.raises(ValueError, match="direction"):
        activation_patching(tiny_llama, PAIRS, direction="sideways", progress=False)


def test_patching_study_runs_writes_and_reads(tiny_llama, tmp_path):
    import json

    from hiddenlens.studies import patching as study
    from hiddenlens.studies import read_run

    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps({"pairs": [p.__dict__ for p in PAIRS]}))
    res = study.run(study.PatchingConfig(model="tiny-llama", pairs=str(pairs)), tiny_llama, progress=False)
    assert {"cells", "summary", "pairs", "attribution", "dla"} <= set(res.tables)
    assert abs(res.tables["dla"]["logit_diff"].sum() - res.summary["clean_metric_mean"]) < 1e-3
    folder = res.write(tmp_path / "run")
    back = read_run(folder)
    assert set(back.tables) == set(res.tables) and (folder / "patching.png").is_file()
    assert len(study.load_pairs()) >= 6  # the shipped pairs load
    with pytest.raises(ValueError, match="clean, corrupted"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"pairs": [{"clean": "a"}]}))
        study.load_pairs(str(bad))
