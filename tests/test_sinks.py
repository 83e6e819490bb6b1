"""Sink metrics on hand-built attention tensors with exactly known values, and on the tiny random models."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hiddenlens.analyses import sinks


def _sink_pattern(n: int) -> torch.Tensor:
    """Every query attends only to position 0: [1, 1, n, n]."""
    a = torch.zeros(1, 1, n, n)
    a[..., 0] = 1.0
    return a


def _uniform_pattern(n: int) -> torch.Tensor:
    a = torch.tril(torch.ones(n, n))
    return (a / a.sum(1, keepdim=True))[None, None]


def _prev_pattern(n: int) -> torch.Tensor:
    a = torch.zeros(n, n)
    a[0, 0] = 1.0
    a[torch.arange(1, n), torch.arange(n - 1)] = 1.0
    return a[None, None]


def test_all_to_first_is_a_perfect_sink():
    n = 6
    r = sinks.pattern_reductions(_sink_pattern(n))
    assert r["sink_first"].item() == pytest.approx(1.0)
    assert r["other_mass"].item() == pytest.approx(0.0)
    assert (r["attn0_sum"] / r["n_queries"]).item() == pytest.approx(1.0)
    assert r["row_entropy_sum"].item() == pytest.approx(0.0, abs=1e-6)
    assert r["col_entropy"].item() == pytest.approx(1.0)  # column 0 is uniform over all n queries


def test_uniform_attention_matches_closed_form():
    n = 7
    r = sinks.pattern_reductions(_uniform_pattern(n))
    mass = [sum(1 / (i + 1) for i in range(j, n)) / (n - j) for j in range(n)]
    assert torch.allclose(r["mass"][0, 0], torch.tensor(mass), atol=1e-6)
    assert r["sink_first"].item() == pytest.approx(mass[0])
    assert r["other_mass"].item() == pytest.approx(max(mass[1:]))
    assert r["other_pos"].item() == 1 + max(range(n - 1), key=lambda j: mass[1 + j])
    assert (r["attn0_sum"] / r["n_queries"]).item() == pytest.approx(sum(1 / (i + 1) for i in range(1, n)) / (n - 1))
    assert (r["row_entropy_sum"] / r["n_queries"]).item() == pytest.approx(1.0, abs=1e-6)

    def col_h(j):
        w = [1 / (i + 1) for i in range(j, n)]
        p = [x / sum(w) for x in w]
        return -sum(x * math.log(x) for x in p) / math.log(n - j)
    assert r["col_entropy"].item() == pytest.approx(max(col_h(j) for j in range(n - 1)), abs=1e-6)


def test_previous_token_head_is_not_a_sink():
    n = 8
    r = sinks.pattern_reductions(_prev_pattern(n))
    assert r["sink_first"].item() == pytest.approx(2 / n)
    assert (r["attn0_sum"] / r["n_queries"]).item() == pytest.approx(1 / (n - 1))
    assert r["row_entropy_sum"].item() == pytest.approx(0.0, abs=1e-6)
    assert r["col_entropy"].item() == pytest.approx(math.log(2) / math.log(n))


def test_delimiter_draws_the_other_mass():
    n = 6
    a = torch.zeros(1, 1, n, n)
    a[0, 0, :, 0] = 0.5
    a[0, 0, 0, 0] = 1.0
    a[0, 0, 1, 1] = 0.5
    a[0, 0, 2, 1] = 0.5
    a[0, 0, 3:, 3] = 0.5                                                 # key 3 ("the delimiter") from queries 3..5
    r = sinks.pattern_reductions(a)
    assert r["other_pos"].item() == 3
    assert r["other_mass"].item() == pytest.approx(0.5 * 3 / 3)
    assert r["sink_first"].item() == pytest.approx((1 + 0.5 * 5) / 6)


def test_left_padding_gives_the_unpadded_numbers():
    n, pad = 5, 3
    plain = _uniform_pattern(n)
    padded = torch.zeros(1, 1, n + pad, n + pad)
    padded[..., pad:, pad:] = plain
    padded[..., :pad, :pad] = 0.123                                      # garbage in padded rows must be ignored
    r0 = sinks.pattern_reductions(plain)
    r1 = sinks.pattern_reductions(padded, torch.tensor([pad]))
    for key in ("sink_first", "other_mass", "attn0_sum", "n_queries", "row_entropy_sum", "col_entropy"):
        assert torch.allclose(r0[key].float(), r1[key].float(), atol=1e-6), key
    assert torch.allclose(r0["mass"][..., :n], r1["mass"][..., :n], atol=1e-6)
    assert r1["mass"][..., n:].abs().max() == 0


def test_logit_gap_ignores_masked_entries():
    n = 5
    s = torch.ones(1, 1, n, n)
    s[..., 0] = 5.0
    s = s + torch.triu(torch.full((n, n), -1e9), 1)                       # causal mask added, as captured
    expected = sum(5 - (5 + i) / (i + 1) for i in range(1, n))
    assert sinks.logit_gap_sum(s).item() == pytest.approx(expected, rel=1e-6)
    padded = torch.full((1, 1, n + 2, n + 2), -3.4e38)
    padded[..., 2:, 2:] = s
    assert sinks.logit_gap_sum(padded, torch.tensor([2])).item() == pytest.approx(expected, rel=1e-6)


def test_value_norms_with_grouped_query_heads():
    # 4 query heads over 2 KV heads, head_dim 2, d_model 3
    v = torch.zeros(1, 2, 3, 2)
    v[0, 0, :, 0] = torch.tensor([1.0, 2.0, 3.0])                         # KV head 0 (query heads 0, 1)
    v[0, 1, :, 1] = torch.tensor([4.0, 0.0, 1.0])                         # KV head 1 (query heads 2, 3)
    w_o = torch.zeros(3, 8)
    w_o[0, 0] = 2.0                                                       # head 0: maps dim 0 -> 2x
    w_o[1, 2] = 0.5                                                       # head 1: dim 0 -> 0.5x
    w_o[2, 5] = 1.0                                                       # head 2: dim 1 -> 1x
    w_o[0, 7], w_o[1, 7] = 3.0, 4.0                                       # head 3: dim 1 -> norm 5x
    norms = sinks.head_value_norms(v, w_o, n_heads=4)
    expected = torch.tensor([[2, 4, 6], [0.5, 1, 1.5], [4, 0, 1], [20, 0, 5]], dtype=torch.float32)
    assert torch.allclose(norms[0], expected)
    with pytest.raises(ValueError, match="n_heads\\*head_dim"):
        sinks.head_value_norms(v, w_o[:, :6], n_heads=4)


def test_sink_analysis_matches_a_full_pattern_capture(tiny_llama):
    import hiddenlens as hl

    prompts = ["The quick brown fox jumps over the lazy dog.", "Attention sinks appear", "a b c d e f"]
    res = sinks.sink_analysis(tiny_llama, prompts, batch_size=2)
    assert len(res.heads) == tiny_llama.adapter.n_layers * tiny_llama.adapter.n_heads
    assert res.mass.shape[:2] == (tiny_llama.adapter.n_layers, tiny_llama.adapter.n_heads)
    rows = sinks.prepare_prompts(tiny_llama, prompts)
    sums = torch.zeros(tiny_llama.adapter.n_layers, tiny_llama.adapter.n_heads)
    count = 0
    for r in rows:  # one prompt at a time: no padding, independent route
        with hl.capture(tiny_llama, "blocks.*.attn.pattern") as cache:
            tiny_llama.run([r], add_bos=None)
        for layer in range(tiny_llama.adapter.n_layers):
            sums[layer] += cache[f"blocks.{layer}.attn.pattern"][0, :, 1:, 0].sum(-1)
        count += len(r) - 1
    got = torch.tensor(res.heads.dormancy.values, dtype=torch.float32).view_as(sums)
    assert torch.allclose(got, sums / count, atol=1e-5)
    assert (res.layers.resid_first > 0).all() and res.heads.value_ratio.notna().all()
    one = sinks.sink_analysis(tiny_llama, prompts, layers=[2])                # a subset of layers: same numbers
    assert torch.allclose(torch.tensor(one.heads.dormancy.values, dtype=torch.float32), got[2], atol=1e-6)
    assert np.allclose(one.mass[0], res.mass[2], equal_nan=True) and not np.isnan(one.mass[0, :, 0]).any()


def test_sink_analysis_rejects_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="out of range"):
        sinks.sink_analysis(tiny_llama, ["hello world"], layers=[99])
    with pytest.raises(ValueError, match="no prompts"):
        sinks.sink_analysis(tiny_llama, [])
    with pytest.raises(ValueError, match="head 9 out of range"):
        sinks.head_pattern(tiny_llama, "hello world", 0, 9)


def test_zero_intervention_equals_zeroed_output_weights(tiny_llama):
    prompts = ["The quick brown fox jumps over the lazy dog.", "Attention sinks appear in many models"]
    df = sinks.head_ablation(tiny_llama, prompts, [(1, 2)], modes=("zero",))
    a = tiny_llama.adapter
    w = a.sub(tiny_llama.hf_model, 1, a.o_path).weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w[:, 2 * a.head_dim:3 * a.head_dim] = 0
        rows = sinks.prepare_prompts(tiny_llama, prompts)
        s, n = zip(*(sinks._ce_sums(tiny_llama, rows, [i]) for i in range(len(rows))))
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert df.ce.iloc[0] == pytest.approx(sum(s) / sum(n), rel=1e-5)
    assert df.delta_ce.iloc[0] != 0
    assert df.changed_positions.iloc[0] > 0


def test_bos_intervention_copies_the_first_output(tiny_llama):
    import hiddenlens as hl

    a = tiny_llama.adapter
    with sinks.intervene_head(tiny_llama, 2, 1, "bos") as report:
        with hl.capture(tiny_llama, "blocks.2.attn.z") as cache:  # registered after: sees the rewritten input
            tiny_llama.run(["one two three four five"], add_bos=True)
    z = cache["blocks.2.attn.z"][0]                                       # [heads, pos, head_dim]
    assert torch.equal(z[1], z[1, :1].expand_as(z[1]))
    assert not torch.equal(z[0], z[0, :1].expand_as(z[0]))
    assert report.changed_positions == z.shape[1]
    assert len(a.sub(tiny_llama.hf_model, 2, a.o_path)._forward_pre_hooks) == 0


def test_leaving_tokens_and_contrast(tiny_gpt2):
    prompts = ["the cat sat on the mat", "the dog sat on the log", "the end of the line is the end"]
    df = sinks.sink_leaving_tokens(tiny_gpt2, prompts, layer=0, head=0, min_count=2)
    assert set(df.columns) == {"token", "token_id", "count", "attn_first"}
    assert (df["count"] >= 2).all() and df.attn_first.is_monotonic_increasing
    a = sinks.sink_analysis(tiny_gpt2, prompts[:2])
    b = sinks.sink_analysis(tiny_gpt2, prompts[2:])
    assert sinks.sink_scores(tiny_gpt2, prompts[:2]).equals(a.heads)
    c = sinks.domain_contrast({"x": a, "y": b})
    assert len(c) == len(a.heads)
    assert c["diff"].abs().is_monotonic_decreasing
    row = c.iloc[0]
    assert row["diff"] == pytest.approx(row["dormancy_x"] - row["dormancy_y"])
    tokens, pattern = sinks.head_pattern(tiny_gpt2, prompts[0], 1, 3)
    assert pattern.shape == (len(tokens), len(tokens))
    assert abs(pattern.sum(1) - 1).max() < 1e-5


def test_dashboard_figures(tiny_gpt2):
    from hiddenlens.analyses.sinks_figures import head_pattern_plotly, sink_map_plotly

    res = sinks.sink_analysis(tiny_gpt2, ["one two three four", "five six seven"])
    trace = sink_map_plotly(res.heads).data[0]
    assert trace.type == "heatmap" and np.asarray(trace.z).shape == (4, 4)
    assert np.asarray(trace.z)[2, 1] == pytest.approx(res.heads.query("layer == 2 and head == 1").dormancy.item())
    tokens, pattern = sinks.head_pattern(tiny_gpt2, "one two three", 0, 0)
    assert np.asarray(head_pattern_plotly(tokens, pattern).data[0].z).shape == (len(tokens), len(tokens))
