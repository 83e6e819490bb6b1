"""On the embedded SmolLM2-135M (fp32, eager attention): the hf, transformer_lens and nnsight backends and HF's
own ``output_hidden_states`` / ``output_attentions`` give the same tensors within 1e-4.

The TransformerLens bridge and the nnsight model are built ONCE over the session's ``smollm_eager`` weights (the
bridge over a clone sharing its tensors); nothing is reloaded.
"""
from __future__ import annotations

import pytest
import torch

import hiddenlens as hl

pytestmark = pytest.mark.embedded

PROMPTS = ["The capital of France is Paris, and the capital of Italy is", "Two plus two equals"]
TOL = 1e-4


def _as_backend(handle, backend: str):
    return handle.with_backend(backend)


@pytest.fixture(scope="module")
def runs(smollm_eager):
    """HF's own outputs (computed before any wrapper exists) and every site of every backend."""
    h = smollm_eager
    assert h.hf_model.config._attn_implementation == "eager"
    batch = h.tokenize(PROMPTS)
    with torch.inference_mode():
        ref = h.hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids, use_cache=False,
                         output_hidden_states=True, output_attentions=True)
    hooks = _hooks(h.hf_model)  # transformers installs its own output-capturing hooks on first use
    handles = {"hf": h, "transformer_lens": _as_backend(h, "transformer_lens"), "nnsight": _as_backend(h, "nnsight")}
    sites = h.site_names()
    caches, logits = {}, {}
    for name, handle in handles.items():
        with hl.capture(handle, sites) as cache:
            logits[name] = handle.run(PROMPTS).logits
        caches[name] = cache
    return {"ref": ref, "hooks": hooks, "batch": batch, "caches": caches, "logits": logits, "sites": sites, "handle": h,
            "handles": handles}


def _hooks(model: torch.nn.Module) -> dict:
    return {name: (list(m._forward_hooks.values()), list(m._forward_pre_hooks.values()))
            for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks}


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a - b).abs().max().item()


def _finite(t: torch.Tensor) -> torch.Tensor:
    """attn.scores hold the dtype's most negative value where masked; compare only what the model attends to."""
    return t.clamp(min=-1e4)


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_every_site_matches_the_hf_backend(runs, backend):
    ref, got = runs["caches"]["hf"], runs["caches"][backend]
    bad = {}
    for site in runs["sites"]:
        a, b = ref[site], got[site]
        err = _err(_finite(a), _finite(b)) if site.endswith("attn.scores") else _err(a, b)
        if err > TOL:
            bad[site] = err
    assert not bad, f"{len(bad)} sites differ from the hf backend: {dict(list(bad.items())[:8])}"
    assert _err(runs["logits"]["hf"], runs["logits"][backend]) <= TOL


@pytest.mark.parametrize("backend", ["hf", "transformer_lens", "nnsight"])
def test_matches_hf_hidden_states_and_attentions(runs, backend):
    ref, cache = runs["ref"], runs["caches"][backend]
    hidden, n = ref.hidden_states, runs["handle"].n_layers
    assert len(hidden) == n + 1 and len(ref.attentions) == n
    assert _err(hidden[0], cache["embed"]) <= TOL  # quirk 1: hidden_states[0] is the embedding output
    for i in range(1, n):
        assert _err(hidden[i], cache[f"blocks.{i - 1}.resid_post"]) <= TOL, f"hidden_states[{i}]"
        assert _err(hidden[i], cache[f"blocks.{i}.resid_pre"]) <= TOL, f"hidden_states[{i}]"
    # quirk 2: the last entry is AFTER the final norm, so it is final_norm and not the last block's output
    assert _err(hidden[n], cache["final_norm"]) <= TOL
    assert _err(hidden[n], cache[f"blocks.{n - 1}.resid_post"]) > 1.0
    for i in range(n):
        assert _err(ref.attentions[i], cache[f"blocks.{i}.attn.pattern"]) <= TOL, f"attentions[{i}]"
    assert _err(ref.logits, cache["logits"]) <= TOL
    assert _err(ref.logits, runs["logits"][backend]) <= TOL


def test_wrapping_left_the_hf_model_unchanged(runs):
    """After both wrappers and three captures the plain HF forward is bit-identical; modules, attention
    implementation and hooks are as they were."""
    h, batch = runs["handle"], runs["batch"]
    assert type(h.adapter.block(h.hf_model, 0)).__name__ == "LlamaDecoderLayer"
    assert h.hf_model.config._attn_implementation == "eager"
    assert _hooks(h.hf_model) == runs["hooks"]
    with torch.inference_mode():
        again = h.hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False).logits
    assert torch.equal(again, runs["ref"].logits)


def _edits(h, clean_cache):
    """A mix of every kind of edit, at sites across the model (fp32): add, zero heads, scale, set, patch, apply."""
    a = h.adapter
    g = torch.Generator().manual_seed(0)
    return [
        ({"blocks.3.resid_post": hl.Add(torch.randn(a.d_model, generator=g))}, {}),
        ({"blocks.5.attn.z": hl.Zero()}, {"heads": [0, 4]}),
        ({"blocks.7.mlp.post": hl.Scale(0.5)}, {"positions": "last"}),
        ({"blocks.9.attn.out": hl.Set(torch.zeros(a.d_model))}, {"positions": [2, 3]}),
        ({"blocks.2.resid_pre": hl.Patch(clean_cache)}, {"positions": slice(0, 4)}),
        ({"blocks.11.attn.v": hl.Apply(lambda v, where: v.flip(-1))}, {"heads": [1]}),
        ({"blocks.4.attn.pattern": hl.Apply(lambda p, where: torch.softmax(p * 0.5, -1))}, {}),
    ]


def test_edits_give_the_same_logits_on_every_backend(runs):
    """An edit gives the same logits on the hf, transformer_lens and nnsight backends within 1e-4 (fp32)."""
    handles = runs["handles"]
    h = handles["hf"]
    with hl.capture(h, "blocks.2.resid_pre") as clean:
        h.run(["The Colosseum is in the city of Rome, and the capital of Italy is", "Two plus two"])
    plain = h.run(PROMPTS).logits
    real = h.tokenize(PROMPTS).attention_mask.bool()
    for edits, kw in _edits(h, clean):
        out = {}
        for name, other in handles.items():
            with hl.edit(other, edits, **kw):
                out[name] = other.run(PROMPTS).logits
        site = next(iter(edits))
        assert (out["hf"][real] - plain[real]).abs().max() > 1e-3, f"{site}: the edit changed nothing"
        for name in ("transformer_lens", "nnsight"):
            diff = float((out[name][real] - out["hf"][real]).abs().max())
            assert diff < TOL, f"{site} on {name}: logits differ from hf by {diff:.2e}"
