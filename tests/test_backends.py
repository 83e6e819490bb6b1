"""The three backends (hf, transformer_lens, nnsight) read the same tensors, clean up, and generate alike.

Tiny random models only; the embedded-model parity lives in test_parity_embedded.py.
"""
from __future__ import annotations

import pytest
import torch

import hiddenlens as hl
from hiddenlens.probes.sites import BLOCK_SITES

PROMPTS = ["The quick brown fox jumps over the lazy dog", "x", "Hello there, how are you?"]
OTHERS = ("transformer_lens", "nnsight")


@pytest.fixture(scope="module")
def handles(tiny_llama, tiny_gpt2):
    """{spec: {backend: handle}}: hf from the session fixtures, the other backends via load_model (same seed)."""
    out = {}
    for spec, hf in (("tiny-llama", tiny_llama), ("tiny-gpt2", tiny_gpt2)):
        out[spec] = {"hf": hf}
        for backend in OTHERS:
            out[spec][backend] = hl.load_model(spec, backend=backend)
    return out


def _all_hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _compare(site: str, ref: torch.Tensor, got: torch.Tensor, tol: float = 1e-4) -> None:
    assert got.shape == ref.shape, f"{site}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if site.endswith("attn.scores"):  # masked entries hold the dtype's most negative value in both
        keep = ref > torch.finfo(ref.dtype).min / 2
        assert torch.equal(keep, got > torch.finfo(got.dtype).min / 2), f"{site}: different masked entries"
        ref, got = ref[keep], got[keep]
    err = (ref - got).abs().max().item()
    assert err <= tol, f"{site}: max |difference| {err:.3g} > {tol}"


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_every_site_agrees_across_backends(handles, spec):
    hs = handles[spec]
    sites = hs["hf"].site_names()
    assert {s.split(".", 2)[-1] for s in sites if s.startswith("blocks.0.")} == set(BLOCK_SITES)
    caches, logits = {}, {}
    for backend, h in hs.items():
        assert h.backend.name == backend
        with hl.capture(h, sites) as cache:
            logits[backend] = h.run(PROMPTS).logits
        caches[backend] = cache
    for backend in OTHERS:
        _compare("run logits", logits["hf"], logits[backend])
        for site in sites:
            _compare(f"{backend} {site}", caches["hf"][site], caches[backend][site])


@pytest.mark.parametrize("backend", OTHERS)
def test_positions_and_batches_agree(handles, backend):
    """positions='last' with two batches of different widths: same rows, same absolute positions."""
    hs = handles["tiny-llama"]
    got = {}
    for name in ("hf", backend):
        with hl.capture(hs[name], ["blocks.1.resid_post", "blocks.2.attn.pattern"], positions="last") as cache:
            hs[name].run(PROMPTS, batch_size=2, sort_by_length=True)
        got[name] = cache
    for site in ("blocks.1.resid_post", "blocks.2.attn.pattern"):
        _compare(site, got["hf"][site], got[backend][site])
        assert torch.equal(got["hf"].positions(site), got[backend].positions(site))


def test_load_model_builds_each_backend(handles):
    from nnsight.modeling.transformers import TransformersModel
    from transformer_lens.model_bridge import TransformerBridge

    for spec in ("tiny-llama", "tiny-gpt2"):
        hs = handles[spec]
        assert isinstance(hs["transformer_lens"].model, TransformerBridge)
        assert isinstance(hs["nnsight"].model, TransformersModel)
        assert hs["hf"].model is hs["hf"].hf_model
        assert "transformer_lens" in repr(hs["transformer_lens"])
    with pytest.raises(ValueError, match="unknown backend"):
        hl.load_model("tiny-llama", backend="pyvene")


def test_bridge_shares_weights_and_leaves_hf_model_plain(handles):
    h = handles["tiny-llama"]["transformer_lens"]
    bridged = h.model.original_model
    assert bridged is not h.hf_model
    mine = {p.data_ptr() for p in h.hf_model.parameters()}
    theirs = {p.data_ptr() for p in bridged.parameters()}
    assert mine == theirs, "the bridge holds weight tensors of its own"
    assert type(h.hf_model.model.layers[0]).__name__ == "LlamaDecoderLayer"
    assert type(bridged.model.layers[0]).__name__ == "BlockBridge"
    assert h.hf_model.config._attn_implementation != "eager"  # only the bridged clone was switched
    assert bridged.config._attn_implementation == "eager"


@pytest.mark.parametrize("backend", ["hf", *OTHERS])
def test_hooks_removed_after_block_and_after_error(handles, backend):
    h = handles["tiny-llama"][backend]
    root = h.model.original_model if backend == "transformer_lens" else h.hf_model
    attn_impl = h.hf_model.config._attn_implementation
    before = _all_hooks(root)
    with torch.inference_mode():
        fresh = h.run(PROMPTS[:2]).logits
    sites = ["embed", "blocks.*.resid_post", "blocks.1.attn.pattern", "blocks.1.attn.scores", "logits"]
    with hl.capture(h, sites):
        h.run(PROMPTS[:2])
    assert _all_hooks(root) == before
    with pytest.raises(ZeroDivisionError):
        with hl.capture(h, sites):
            h.run(PROMPTS[:2])
            1 / 0
    assert _all_hooks(root) == before
    assert h.hf_model.config._attn_implementation == attn_impl
    from hiddenlens.probes import context
    assert not context.open_blocks(h) and h.backend.hooks.installed == 0 if backend != "nnsight" else True
    with torch.inference_mode():
        again = h.run(PROMPTS[:2]).logits
    assert torch.equal(fresh, again)


def test_capture_leaves_user_transformer_lens_hooks_alone(handles):
    h = handles["tiny-gpt2"]["transformer_lens"]
    seen = []
    point = h.model.hook_dict["blocks.1.hook_resid_post"]
    point.add_hook(lambda t, hook: seen.append(t.shape))
    try:
        with hl.capture(h, ["blocks.1.resid_post"]):
            h.run(PROMPTS[:1])
        h.run(PROMPTS[:1])
        assert len(seen) == 2, "a user hook added through TransformerLens was removed or skipped"
    finally:
        point.remove_hooks()


def test_transformer_lens_generate_captures_every_step(handles):
    """Cached decoding through the bridge: same tokens and same per-step tensors as the hf backend."""
    hs = handles["tiny-gpt2"]
    sites = ["blocks.*.resid_post", "blocks.1.attn.pattern", "logits"]
    out = {}
    for name in ("hf", "transformer_lens"):
        with hl.capture(hs[name], sites) as cache:
            gen = hs[name].generate(PROMPTS[:2], max_new_tokens=4)
        out[name] = (gen, cache)
    (g_hf, c_hf), (g_tl, c_tl) = out["hf"], out["transformer_lens"]
    assert torch.equal(g_hf.sequences, g_tl.sequences)
    real = g_hf.attention_mask[:, :-1].bool()  # the last new token is never fed back
    assert c_tl.positions("blocks.0.resid_post").tolist() == list(range(g_hf.sequences.shape[1] - 1))
    for site in ("blocks.0.resid_post", "blocks.3.resid_post"):  # padded positions hold nothing meaningful
        _compare(site, c_hf[site][real], c_tl[site][real])
    _compare("pattern", c_hf["blocks.1.attn.pattern"], c_tl["blocks.1.attn.pattern"])
    _compare("logits", c_hf["logits"], c_tl["logits"])  # generate computes the last position of each pass
    assert len(c_tl.chunks("logits")) == 4  # the prompt pass and one pass per fed-back token


def test_nnsight_generate_matches_and_captures_every_step(handles):
    hs = handles["tiny-llama"]
    sites = ["blocks.*.resid_post", "blocks.1.attn.pattern", "logits"]
    out = {}
    for name in ("hf", "nnsight"):
        with hl.capture(hs[name], sites) as cache:
            gen = hs[name].generate(PROMPTS[:2], max_new_tokens=5)
        out[name] = (gen, cache)
    (ref, c_hf), (got, c_nn) = out["hf"], out["nnsight"]
    assert torch.equal(ref.sequences, got.sequences) and ref.texts == got.texts
    real = ref.attention_mask[:, :-1].bool()
    assert c_nn.positions("blocks.0.resid_post").tolist() == list(range(ref.sequences.shape[1] - 1))
    for site in ("blocks.0.resid_post", "blocks.3.resid_post"):
        _compare(site, c_hf[site][real], c_nn[site][real])
    _compare("pattern", c_hf["blocks.1.attn.pattern"], c_nn["blocks.1.attn.pattern"])
    _compare("logits", c_hf["logits"], c_nn["logits"])
    assert hs["nnsight"].backend._hf.hooks.installed == 0


def test_left_padding_does_not_change_a_prompt(handles):
    """Positions come from the attention mask: a GPT-2 prompt reads the same alone and left-padded in a batch."""
    for backend, h in handles["tiny-gpt2"].items():
        alone = h.run(PROMPTS[1:2]).logits[0, -1]
        padded = h.run(PROMPTS).logits[1, -1]
        assert (alone - padded).abs().max().item() < 1e-4, backend


def test_bench_capture_cli_writes_every_contender(tmp_path):
    """The benchmark's plumbing on a tiny model (structure only: timings on a shared CPU prove nothing)."""
    import json

    from typer.testing import CliRunner

    from hiddenlens.benchmarks.capture import SCENARIOS
    from hiddenlens.cli import app

    out = tmp_path / "capture.json"
    threads = torch.get_num_threads()
    try:
        res = CliRunner().invoke(app, ["bench", "capture", "--model", "tiny-llama", "--batch", "2", "--tokens", "8",
                                       "--reps", "1", "--pattern-layer", "-1", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["pattern_layer"] == 3 and result["reps"] == 1 and result["torch_threads"] == 1
    for scenario, names in SCENARIOS.items():
        for clock in ("seconds", "cpu_seconds"):
            assert list(result[clock][scenario]) == list(names)
            assert all(len(v) == 1 and v[0] > 0 for v in result[clock][scenario].values())
        assert result["ratio_to_plain"][scenario]["plain"] == result["cpu_ratio_to_plain"][scenario]["plain"] == 1.0
    goals = {"resid_capture_within_1.05x_plain", "faster_than_transformer_lens", "faster_than_nnsight",
             "one_layer_stops_early (<= 0.55x plain)"}
    assert set(result["goal"]) == set(result["goal_cpu"]) == goals
    bad = CliRunner().invoke(app, ["bench", "capture", "--model", "tiny-llama", "--pattern-layer", "9",
                                   "--out", str(out)])
    assert bad.exit_code != 0 and "out of range" in str(bad.exception)
