"""Models split across devices by accelerate, and nnsight's remote path (NDIF) through a local stand-in.

The split model is tiny-llama saved with ``save_pretrained`` and loaded with a device map that keeps some blocks on
the CPU and offloads the others (and the LM head) to disk: accelerate's hooks read their weights back from the
offload folder at each forward, while their parameters sit on ``meta``. Every read, edit and steered generation
must equal the same checkpoint loaded normally (atol 1e-5).
"""
from __future__ import annotations

import pytest
import torch

import hiddenlens as hl
from hiddenlens.interventions.steer import steer_generate
from hiddenlens.models.loading import PlacementError
from hiddenlens.probes.backends import BackendError
from hiddenlens.probes.direction import Direction

PROMPTS = ["The capital of France is", "x = 1"]
#: blocks 1 and 3 and the LM head on disk, the rest on the CPU
SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_llama):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.hf_model.save_pretrained(d)
    tiny_llama.tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def plain(folder):
    return hl.load_model(str(folder), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def split(folder):
    return hl.load_model(str(folder), dtype="float32", device_map=SPLIT, offload_folder=str(folder / "offload"))


def test_the_map_really_offloads(split):
    """The disk blocks hold no weights in memory (meta) and their weights were written to the offload folder."""
    layers = split.hf_model.model.layers
    assert layers[1].self_attn.q_proj.weight.device.type == "meta"
    assert layers[0].self_attn.q_proj.weight.device.type == "cpu"
    assert split.info["device_map"]["model.layers.3"] == "disk"
    assert split.device == torch.device("cpu")  # where the input embedding runs


def test_every_resid_post_matches(plain, split):
    ref_logits, ref = plain.run_with_cache(PROMPTS, "blocks.*.resid_post")
    logits, cache = split.run_with_cache(PROMPTS, "blocks.*.resid_post", to="cpu")
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    for site in ref:
        assert cache[site].device.type == "cpu"
        torch.testing.assert_close(cache[site], ref[site], atol=1e-5, rtol=0)


def _edited(handle):
    v = torch.linspace(-1, 1, handle.adapter.d_model)
    with hl.capture(handle, ["blocks.3.resid_post"]) as cache:
        with hl.edit(handle, {"blocks.1.resid_post": hl.Add(v)}, positions="last") as log, \
                hl.edit(handle, {"blocks.3.attn.z": hl.Zero()}, heads=[1]):
            out = handle.run(PROMPTS)
    return out.logits, cache["blocks.3.resid_post"], log.changed("blocks.1.resid_post")


def test_edits_on_disk_blocks_match(plain, split):
    """An Add on a disk-offloaded block and a Zero of one head's attn.z (disk side) give the plain model's result."""
    ref_logits, ref_resid, ref_change = _edited(plain)
    logits, resid, change = _edited(split)
    assert not torch.allclose(ref_logits, plain.run(PROMPTS).logits, atol=1e-3)  # the edit does something
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(resid, ref_resid, atol=1e-5, rtol=0)
    torch.testing.assert_close(change, ref_change, atol=1e-5, rtol=0)


def test_steered_generate_matches(plain, split):
    g = torch.Generator().manual_seed(0)
    dirs = [Direction(torch.randn(plain.adapter.d_model, generator=g), 1.0, "blocks.2.resid_post")]
    ref = steer_generate(plain, PROMPTS, dirs, 6.0, "generated", max_new_tokens=6)
    out = steer_generate(split, PROMPTS, dirs, 6.0, "generated", max_new_tokens=6)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.added_norm, ref.added_norm, atol=1e-5, rtol=0)
    assert not torch.equal(ref.sequences, plain.generate(PROMPTS, max_new_tokens=6).sequences)


def test_placement_without_a_map_is_refused(folder):
    with pytest.raises(PlacementError, match="max_memory given without device_map"):
        hl.load_model(str(folder), max_memory={"cpu": "1GiB"})
    with pytest.raises(PlacementError, match="save_pretrained"):
        hl.load_model("tiny-llama", device_map="auto")


# ---- nnsight remote=True: the remote path through nnsight's local simulation (remote="local") -----------------
# remote="local" serializes the trace exactly as for NDIF, deserializes it with every non-installed module hidden
# (hiddenlens included) and runs it here: a trace body that needed hiddenlens code would fail as on the server.

@pytest.fixture(scope="module")
def nn(tiny_llama):
    return tiny_llama.with_backend("nnsight")


def test_remote_reads_and_edits_match_a_local_run(tiny_llama, nn):
    ref = _edited(tiny_llama)
    got = _remote_edited(nn)
    assert not torch.allclose(ref[0], tiny_llama.run(PROMPTS).logits, atol=1e-3)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _remote_edited(handle):
    v = torch.linspace(-1, 1, handle.adapter.d_model)
    with hl.capture(handle, ["blocks.3.resid_post"]) as cache:
        with hl.edit(handle, {"blocks.1.resid_post": hl.Add(v)}, positions="last") as log, \
                hl.edit(handle, {"blocks.3.attn.z": hl.Zero()}, heads=[1]):
            out = handle.run(PROMPTS, remote="local")
    return out.logits, cache["blocks.3.resid_post"], log.changed("blocks.1.resid_post")


def test_remote_generate_matches(tiny_llama, nn):
    got = nn.generate(PROMPTS, max_new_tokens=5, remote="local").sequences
    assert torch.equal(got, tiny_llama.generate(PROMPTS, max_new_tokens=5).sequences)


def test_what_cannot_run_remotely_raises(nn):
    """A function edit or an attention-weight site needs hiddenlens code on the server: refused, not run here."""
    with pytest.raises(BackendError, match="Apply.*remote=True"):
        with hl.edit(nn, {"blocks.1.resid_post": lambda x, where: x * 2}):
            nn.run(PROMPTS, remote="local")
    with pytest.raises(BackendError, match="attn.pattern with remote=True"):
        with hl.capture(nn, ["blocks.1.attn.pattern"]):
            nn.run(PROMPTS, remote="local")
    with pytest.raises(BackendError, match="generate with remote=True"):
        with hl.capture(nn, ["blocks.1.resid_post"]):
            nn.generate(PROMPTS, max_new_tokens=2, remote="local")


def test_remote_true_reaches_nnsight(nn, monkeypatch):
    """remote=True (NDIF itself: not reachable here) is handed to nnsight's trace unchanged."""
    seen = {}

    def fake_backend(model, remote, blocking, job_id, verbose):  # NDIF's RemoteBackend -> the local simulation
        seen["remote"] = remote
        from nnsight.intervention.backends.local import LocalSimulationBackend
        return LocalSimulationBackend(model)

    monkeypatch.setattr(type(nn.model), "_remote_backend", fake_backend)
    with hl.capture(nn, ["blocks.2.resid_post"]) as cache:
        nn.run(PROMPTS, remote=True)
    assert seen["remote"] is True and cache["blocks.2.resid_post"].shape[0] == 2
