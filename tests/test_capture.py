"""The capture layer on tiny random models: faithfulness to HF tensors, positions, generate, reductions, failures."""
import pytest
import torch

import hiddenlens as hl
from hiddenlens.probes import HookNotFiredError, NonFiniteActivationError, RunningStats

PROMPTS = ["The quick brown fox jumps over", "A test", "Python is a programming language"]


def n_forward_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_resid_equals_hidden_states_and_logits(fixture, request):
    h = request.getfixturevalue(fixture)
    with hl.capture(h, ["embed", "blocks.*.resid_post", "final_norm", "logits"]) as cache:
        out = h.run(PROMPTS)
    with torch.inference_mode():
        pos = (out.attention_mask.cumsum(-1) - 1).clamp(min=0)  # per-row positions, as handle.run uses
        ref = h.hf_model(input_ids=out.input_ids, attention_mask=out.attention_mask, position_ids=pos,
                         output_hidden_states=True)
    m = out.attention_mask.bool()
    hs = ref.hidden_states
    assert torch.equal(cache["embed"][m], hs[0][m])
    for i in range(h.n_layers - 1):
        assert torch.allclose(cache[f"blocks.{i}.resid_post"][m], hs[i + 1][m], atol=1e-5)
    # HF quirk: the last hidden state is after the final norm; our last resid_post is before it
    assert torch.allclose(cache["final_norm"][m], hs[-1][m], atol=1e-5)
    assert not torch.allclose(cache[f"blocks.{h.n_layers - 1}.resid_post"][m], hs[-1][m], atol=1e-3)
    assert torch.allclose(cache["logits"][m], ref.logits[m], atol=1e-5)
    assert cache["blocks.0.resid_post"].shape == (3, out.input_ids.shape[1], h.adapter.d_model)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_residual_decomposition_and_head_shapes(fixture, request):
    h = request.getfixturevalue(fixture)
    a = h.adapter
    sites = ["blocks.1.resid_pre", "blocks.1.attn.out", "blocks.1.resid_mid", "blocks.1.mlp.out",
             "blocks.1.resid_post", "blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v", "blocks.1.attn.z",
             "blocks.1.attn.pattern", "blocks.1.attn.scores", "blocks.1.mlp.pre", "blocks.1.mlp.post"]
    with hl.capture(h, sites) as c:
        out = h.run(PROMPTS)
    m = out.attention_mask.bool()
    b, p = out.input_ids.shape
    assert torch.allclose(c["blocks.1.resid_mid"], c["blocks.1.resid_pre"] + c["blocks.1.attn.out"], atol=1e-5)
    assert torch.allclose(c["blocks.1.resid_post"][m], (c["blocks.1.resid_mid"] + c["blocks.1.mlp.out"])[m], atol=1e-5)
    assert c["blocks.1.attn.q"].shape == (b, a.n_heads, p, a.head_dim)
    assert c["blocks.1.attn.k"].shape == (b, a.n_kv_heads, p, a.head_dim)
    assert c["blocks.1.attn.z"].shape == (b, a.n_heads, p, a.head_dim)
    pat = c["blocks.1.attn.pattern"]
    assert pat.shape == (b, a.n_heads, p, p)
    rows = pat.sum(-1)[m[:, None, :].expand(b, a.n_heads, p)]
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    valid_rows = m[:, None, :, None].expand_as(pat)                   # padded query rows are garbage by design
    assert torch.equal(pat.triu(1)[valid_rows], torch.zeros_like(pat)[valid_rows])          # causal
    assert torch.allclose(c["blocks.1.attn.scores"].softmax(-1), pat, atol=1e-5)
    # attn.z is the pattern applied to v (GQA: each query head reads its KV group)
    v = c["blocks.1.attn.v"].repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
    assert torch.allclose(pat @ v, c["blocks.1.attn.z"], atol=1e-5)
    assert c["blocks.1.mlp.post"].shape == c["blocks.1.mlp.pre"].shape == (b, p, a.d_mlp)


def test_pattern_equals_hf_output_attentions():
    h = hl.load_model("tiny-llama", attn_implementation="eager")
    with hl.capture(h, "blocks.*.attn.pattern") as c:
        out = h.run(PROMPTS[:1])
    with torch.inference_mode():
        ref = h.hf_model(input_ids=out.input_ids, attention_mask=out.attention_mask, output_attentions=True)
    for i, att in enumerate(ref.attentions):
        assert torch.allclose(c[f"blocks.{i}.attn.pattern"], att, atol=1e-6)


def test_pattern_capture_leaves_untapped_layers_and_model_unchanged(tiny_llama):
    h = tiny_llama
    impl = h.hf_model.config._attn_implementation
    with torch.inference_mode():
        ref = h.run(PROMPTS).logits
    with hl.capture(h, ["blocks.2.attn.pattern", "blocks.1.resid_post"]) as c:
        logits = h.run(PROMPTS).logits
    m = h.tokenize(PROMPTS).attention_mask.bool()
    assert torch.allclose(logits[m], ref[m], atol=1e-5)
    assert h.hf_model.config._attn_implementation == impl
    assert c["blocks.2.attn.pattern"].shape[1] == h.adapter.n_heads


def test_positions_last_indices_slice_mask(tiny_llama):
    h = tiny_llama
    with hl.capture(h, "blocks.0.resid_post") as full:
        h.run(PROMPTS[:1])
    f = full["blocks.0.resid_post"]
    with hl.capture(h, "blocks.0.resid_post", positions="last") as c:
        h.run(PROMPTS[:1])
    assert torch.equal(c["blocks.0.resid_post"], f[:, -1:])
    with hl.capture(h, "blocks.0.resid_post", positions=[0, 2, -1]) as c:
        h.run(PROMPTS[:1])
    assert torch.equal(c["blocks.0.resid_post"], f[:, [0, 2, -1]])
    assert c.positions("blocks.0.resid_post").tolist() == [0, 2, f.shape[1] - 1]
    with hl.capture(h, "blocks.0.resid_post", positions=slice(1, 3)) as c:
        h.run(PROMPTS[:1])
    assert torch.equal(c["blocks.0.resid_post"], f[:, 1:3])
    batch = h.tokenize(PROMPTS)
    mask = batch.attention_mask.bool()
    with hl.capture(h, "blocks.0.resid_post", positions=mask) as c:
        h.hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert c["blocks.0.resid_post"].shape == (int(mask.sum()), h.adapter.d_model)


def test_generate_records_prompt_and_each_step_with_absolute_positions(tiny_llama):
    h = tiny_llama
    with hl.capture(h, ["blocks.1.resid_post", "blocks.1.attn.pattern"]) as c:
        gen = h.generate(PROMPTS[:1], max_new_tokens=4)
    seq = gen.sequences
    p = gen.prompt_length
    chunks = c.chunks("blocks.1.resid_post")
    assert [ch.value.shape[1] for ch in chunks] == [p, 1, 1, 1]
    assert c.positions("blocks.1.resid_post").tolist() == list(range(p + 3))
    # the cached decode equals a plain forward over the whole generated sequence (minus the last token)
    with hl.capture(h, ["blocks.1.resid_post", "blocks.1.attn.pattern"]) as ref:
        h.run(seq[:, :-1])
    assert torch.allclose(c["blocks.1.resid_post"], ref["blocks.1.resid_post"], atol=1e-5)
    assert torch.allclose(c["blocks.1.attn.pattern"], ref["blocks.1.attn.pattern"], atol=1e-5)


def test_batched_run_restores_prompt_order(tiny_llama):
    h = tiny_llama
    with hl.capture(h, "blocks.2.resid_post", positions="last") as one:
        h.run(PROMPTS)
    with hl.capture(h, "blocks.2.resid_post", positions="last") as many:
        h.run(PROMPTS, batch_size=1, sort_by_length=True)
    assert torch.allclose(one["blocks.2.resid_post"], many["blocks.2.resid_post"], atol=1e-5)


def test_running_stats_match_materialised_covariance(tiny_llama):
    h = tiny_llama
    texts = [f"Sentence number {i} talks about {w}." for i, w in enumerate(["cats", "dogs", "rain", "code"] * 3)]
    with hl.capture(h, "blocks.1.resid_post", positions="last", reduce="stats") as c:
        h.run(texts, batch_size=5)
    with hl.capture(h, "blocks.1.resid_post", positions="last") as full:
        h.run(texts)
    x = full["blocks.1.resid_post"][:, 0].double()
    st = c.stats["blocks.1.resid_post"]
    assert st.n == len(texts)
    assert torch.allclose(st.mean, x.mean(0), atol=1e-10)
    assert torch.allclose(st.cov, torch.cov(x.T), atol=1e-9)


def test_running_stats_merge_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 7, generator=g, dtype=torch.float64) * 3 + 1
    a = RunningStats().update(x[:10]).update(x[10:700])
    b = RunningStats().update(x[700:])
    a.merge(b)
    assert torch.allclose(a.cov, torch.cov(x.T), atol=1e-12)
    again = RunningStats.from_state_dict(a.state_dict())
    assert torch.equal(again.cov, a.cov)


def test_user_reduce_function(tiny_llama):
    h = tiny_llama
    with hl.capture(h, "blocks.0.attn.pattern", reduce=lambda site, t: t[:, :, :, 0].mean(-1)) as c:
        h.run(PROMPTS[:2])
    (chunk,) = c.chunks("blocks.0.attn.pattern")
    assert chunk.value.shape == (2, h.adapter.n_heads)


def test_hooks_removed_after_exception_and_model_unchanged(tiny_llama):
    h = tiny_llama
    before = n_forward_hooks(h.hf_model)
    impl = h.hf_model.config._attn_implementation
    with torch.inference_mode():
        ref = h.run(PROMPTS[:1]).logits
    with pytest.raises(RuntimeError, match="boom"):
        with hl.capture(h, ["blocks.*.resid_post", "blocks.1.attn.pattern"]):
            h.run(PROMPTS[:1])
            raise RuntimeError("boom")
    assert n_forward_hooks(h.hf_model) == before
    assert h.hf_model.config._attn_implementation == impl
    assert not any(hasattr(m, "_hiddenlens_attn_tap") for m in h.hf_model.modules())
    with torch.inference_mode():
        assert torch.equal(h.run(PROMPTS[:1]).logits, ref)


def test_fails_loudly(tiny_llama, tiny_gpt2):
    h = tiny_llama
    with pytest.raises(HookNotFiredError, match="no forward pass ran"):
        with hl.capture(h, "blocks.0.resid_post"):
            pass
    with pytest.raises(HookNotFiredError, match="logits"):
        with hl.capture(h, ["logits", "blocks.0.resid_post"]):
            h.run(PROMPTS[:1], logits=False)
    with pytest.raises(hl.UnknownSiteError, match="closest"):
        hl.capture(h, "blocks.0.resid_psot")
    with pytest.raises(ValueError, match="zero tokens"):
        h.run([""])
    with pytest.raises(ValueError, match="no prompts"):
        h.run([])
    with pytest.raises(KeyError, match="was not captured"):
        with hl.capture(h, "blocks.0.resid_post") as c:
            h.run(PROMPTS[:1])
        c["blocks.1.resid_post"]


def test_non_finite_activation_raises(tiny_llama):
    h = tiny_llama
    before = n_forward_hooks(h.hf_model)
    block = h.adapter.block(h.hf_model, 1)
    handle = block.register_forward_hook(lambda m, a, o: o * float("nan"))
    try:
        with pytest.raises(NonFiniteActivationError, match="blocks.1.resid_post holds NaN"):
            with hl.capture(h, "blocks.1.resid_post"):
                h.run(PROMPTS[:1])
    finally:
        handle.remove()
    assert n_forward_hooks(h.hf_model) == before


def test_inference_mode_unless_grad(tiny_llama):
    h = tiny_llama
    with hl.capture(h, "blocks.0.resid_post") as c:
        h.run(PROMPTS[:1])
    assert c["blocks.0.resid_post"].is_inference()
    with hl.capture(h, "blocks.0.resid_post", grad=True) as c:
        h.run(PROMPTS[:1])
    t = c["blocks.0.resid_post"]
    assert t.requires_grad
    t.sum().backward()
    assert h.adapter.embedding(h.hf_model).weight.grad is not None
    h.hf_model.zero_grad(set_to_none=True)


def test_bos_is_explicit(tiny_llama):
    h = tiny_llama
    bos = h.tokenizer.bos_token_id
    assert h.tokenize("hello").input_ids[0, 0] != bos
    assert h.tokenize("hello", add_bos=True).input_ids[0, 0] == bos
    twice = h.tokenize(h.tokenize("hello", add_bos=True).input_ids, add_bos=True).input_ids
    assert (twice == bos).sum() == 1


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_left_padded_batch_equals_one_prompt_at_a_time(fixture, request):
    h = request.getfixturevalue(fixture)
    with hl.capture(h, "blocks.3.resid_post", positions="last") as batched:
        h.run(PROMPTS)
    for i, p in enumerate(PROMPTS):
        with hl.capture(h, "blocks.3.resid_post", positions="last") as alone:
            h.run([p])
        assert torch.allclose(batched["blocks.3.resid_post"][i], alone["blocks.3.resid_post"][0], atol=1e-5)


def test_with_attention_shares_weights_and_leaves_the_original_alone(tiny_llama):
    h = tiny_llama
    impl = h.hf_model.config._attn_implementation
    eager = h.with_attention("eager")
    assert eager.hf_model.config._attn_implementation == "eager"
    assert h.hf_model.config._attn_implementation == impl
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(h.hf_model.parameters(), eager.hf_model.parameters()))
    with hl.capture(eager, "blocks.1.resid_post") as ce, hl.capture(h, "blocks.1.resid_post") as co:
        eager.run(PROMPTS[:1])
        h.run(PROMPTS[:1])
    assert torch.allclose(ce["blocks.1.resid_post"], co["blocks.1.resid_post"], atol=1e-5)
