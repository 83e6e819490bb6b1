"""``hiddenlens.edit``: known answers on tiny random models (every op, heads, positions, padding, KV cache, order)."""
from __future__ import annotations

import pytest
import torch

import hiddenlens as hl
from hiddenlens.probes.positions import PositionError

PROMPTS = ["The capital of France is", "In the beginning the", "A"]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_add_changes_exactly_the_selected_real_positions(request, fixture):
    h = request.getfixturevalue(fixture)
    v = _rand(h.adapter.d_model)
    with hl.capture(h, "blocks.1.resid_post") as before:
        h.run(PROMPTS)
    with hl.edit(h, {"blocks.1.resid_post": hl.Add(v)}, positions=[-1, 2]) as e, \
            hl.capture(h, "blocks.1.resid_post") as after:
        h.run(PROMPTS)
    diff = after["blocks.1.resid_post"] - before["blocks.1.resid_post"]
    mask = before.attention_masks[0].bool()
    width = mask.shape[1]
    edited = torch.zeros_like(mask)
    edited[:, [2, width - 1]] = True
    edited &= mask  # padding is never edited
    assert torch.allclose(diff[edited], v.expand(int(edited.sum()), -1), atol=1e-5)
    assert diff[~edited].abs().max() == 0
    norms = e.changed("blocks.1.resid_post")
    assert torch.allclose(norms[edited], v.norm().expand(int(edited.sum())), atol=1e-4)


def test_heads_are_edited_alone_and_reads_see_the_edit(tiny_llama):
    h = tiny_llama
    with hl.capture(h, ["blocks.2.attn.z", "logits"]) as before:
        h.run(PROMPTS)
    with hl.capture(h, ["blocks.2.attn.z", "logits"]) as outer, \
            hl.edit(h, {"blocks.2.attn.z": hl.Zero()}, heads=[1, 3]):
        h.run(PROMPTS)
    z0, z1 = before["blocks.2.attn.z"], outer["blocks.2.attn.z"]  # the read was opened BEFORE the edit
    mask = before.attention_masks[0].bool()
    assert z1[:, [1, 3]].permute(0, 2, 1, 3)[mask].abs().max() == 0
    assert torch.equal(z1[:, [0, 2]], z0[:, [0, 2]])
    assert (outer["logits"] - before["logits"]).abs().max() > 1e-4


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_every_readable_site_is_writable(request, fixture):
    """Scale(2) at a site doubles what a read at that site returns (fused qkv of GPT-2 included)."""
    h = request.getfixturevalue(fixture)
    for site in h.site_names():
        if site.endswith(("attn.scores",)) or site == "logits":
            continue
        with hl.capture(h, site) as before:
            h.run(PROMPTS[:1])
        with hl.edit(h, {site: hl.Scale(2.0)}), hl.capture(h, site) as after:
            h.run(PROMPTS[:1])
        assert torch.allclose(after[site], 2 * before[site], atol=1e-5, rtol=1e-5), site


def test_pattern_edit_recomputes_the_head_output(tiny_llama):
    """All of a head's attention on key 0 makes its output at every query equal its value at position 0."""
    h = tiny_llama
    a = h.adapter

    def first_key(p, where):
        one = torch.zeros_like(p)
        one[..., 0] = 1.0
        return one

    with hl.edit(h, {"blocks.1.attn.pattern": hl.Apply(first_key)}, heads=[2]), \
            hl.capture(h, ["blocks.1.attn.z", "blocks.1.attn.v"]) as cache:
        h.run(PROMPTS[:1])
    z, v = cache["blocks.1.attn.z"], cache["blocks.1.attn.v"]
    kv = 2 // (a.n_heads // a.n_kv_heads)
    assert torch.allclose(z[0, 2], v[0, kv, 0].expand_as(z[0, 2]), atol=1e-5)


def test_patching_the_whole_residual_restores_the_clean_run(tiny_llama):
    """Known answer: patch blocks.0.resid_pre with the clean run's -> the corrupted run gives the clean logits."""
    h = tiny_llama
    clean, corrupt = ["The capital of France is"], ["The capital of Italy is"]
    with hl.capture(h, "blocks.0.resid_pre") as cache:
        ref = h.run(clean).logits
    assert h.tokenize(clean).input_ids.shape == h.tokenize(corrupt).input_ids.shape
    with hl.edit(h, {"blocks.0.resid_pre": hl.Patch(cache)}):
        patched = h.run(corrupt).logits
    assert torch.equal(patched, ref)
    with hl.edit(h, {"blocks.0.resid_pre": hl.Patch(cache)}, positions=[0]):  # BOS-free: position 0 is "The"
        partly = h.run(corrupt).logits
    assert not torch.allclose(partly[0, -1], ref[0, -1])  # patching one shared token leaves the answer corrupted


def test_edits_during_generate_use_absolute_positions(tiny_llama):
    """Cached decoding (one token per forward) and uncached decoding edit the same absolute positions."""
    h = tiny_llama
    v = _rand(h.adapter.d_model, seed=3) * 4
    with hl.edit(h, {"blocks.2.resid_post": hl.Add(v)}, positions=slice(6, None)):
        cached = h.generate(PROMPTS, max_new_tokens=5)
    with hl.edit(h, {"blocks.2.resid_post": hl.Add(v)}, positions=slice(6, None)):
        uncached = h.generate(PROMPTS, max_new_tokens=5, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert not torch.equal(cached.sequences, h.generate(PROMPTS, max_new_tokens=5).sequences)


def test_edit_order_outer_block_first(tiny_llama):
    h = tiny_llama
    with hl.edit(h, {"blocks.0.mlp.out": hl.Set(torch.ones(64))}), \
            hl.edit(h, {"blocks.0.mlp.out": hl.Scale(3.0)}), hl.capture(h, "blocks.0.mlp.out") as c:
        h.run(PROMPTS[:1])
    assert torch.allclose(c["blocks.0.mlp.out"], torch.full_like(c["blocks.0.mlp.out"], 3.0))


def test_stop_after_the_last_needed_block(tiny_llama):
    """``run(logits=False)`` runs nothing past the deepest block an open read or edit needs."""
    h = tiny_llama
    calls = []
    probe = h.adapter.block(h.hf_model, 3).register_forward_hook(lambda *a: calls.append(1))  # test-only counter
    try:
        with hl.capture(h, "blocks.1.resid_post") as cache:
            h.run(PROMPTS, logits=False)
        assert calls == [] and cache["blocks.1.resid_post"].shape[0] == 3
        with hl.capture(h, "blocks.1.resid_post"):
            h.run(PROMPTS)  # logits wanted: the whole model runs
        assert calls == [1]
        with hl.capture(h, ["blocks.1.resid_post", "final_norm"]):
            h.run(PROMPTS, logits=False)
        assert calls == [1, 1]
    finally:
        probe.remove()
    stopped = {}
    for backend in ("transformer_lens", "nnsight"):
        other = h.with_backend(backend)
        with hl.capture(other, "blocks.1.resid_post") as c:
            other.run(PROMPTS, logits=False)
        stopped[backend] = c["blocks.1.resid_post"]
        real = cache.attention_masks[0].bool()
        assert (stopped[backend][real] - cache["blocks.1.resid_post"][real]).abs().max() < 1e-4


def test_bad_edits_fail_loudly(tiny_llama):
    h = tiny_llama
    with pytest.raises(ValueError, match="per-head sites only"):
        hl.edit(h, {"blocks.0.resid_post": hl.Zero()}, heads=[0])
    with pytest.raises(ValueError, match="heads"):
        hl.edit(h, {"blocks.0.attn.z": hl.Zero()}, heads=[9])
    with pytest.raises(hl.UnknownSiteError):
        hl.edit(h, {"blocks.0.resid_pots": hl.Zero()})
    with pytest.raises(ValueError, match="NaN"):
        hl.Add(torch.tensor([float("nan")]))
    with pytest.raises(TypeError, match="floating"):
        hl.Add(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="region's shape"):
        with hl.edit(h, {"blocks.0.resid_post": hl.Apply(lambda r, w: r[:, :1])}):
            h.run(PROMPTS[:1])
    with pytest.raises(PositionError, match="position 100 is outside the input"):
        with hl.edit(h, {"blocks.0.resid_post": hl.Zero()}, positions=[100]):
            h.run(PROMPTS[:1])
    with pytest.raises(hl.EditNotAppliedError, match="selected no entry"):  # a slice past the end names no index
        with hl.edit(h, {"blocks.0.resid_post": hl.Zero()}, positions=slice(100, 200)):
            h.run(PROMPTS[:1])
    with pytest.raises(hl.EditNotAppliedError, match="never ran"):
        with hl.edit(h, {"blocks.0.resid_post": hl.Zero()}):
            pass
    assert h.backend.hooks.installed == 0
