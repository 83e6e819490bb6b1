"""The activation store: round trip, lazy reads, damage detection (kill -9, concurrent writers, edited manifests and
other hostile cases: tests/test_hostile_store.py)."""
import json

import pytest
import torch

import hiddenlens as hl
from hiddenlens.probes.store import ActivationStore, StoreError, read_prompts, write_activations

PROMPTS = [f"Prompt {i}: the {w} sat on the mat." for i, w in enumerate(["cat", "dog", "bird", "fish", "cow"] * 4)]


def test_round_trip_matches_capture(tiny_llama, tmp_path):
    h = tiny_llama
    store = write_activations(h, PROMPTS, ["blocks.1.resid_post", "blocks.0.attn.z"], tmp_path / "s",
                              batch_size=3, shard_rows=40, progress=False)
    assert store.complete and len(store.shards) > 1
    with hl.capture(h, ["blocks.1.resid_post", "blocks.0.attn.z"]) as c:
        out = h.run(PROMPTS)
    m = out.attention_mask.bool()
    assert torch.allclose(store.read("blocks.1.resid_post"), c["blocks.1.resid_post"][m], atol=1e-5)
    assert torch.allclose(store.read("blocks.0.attn.z"), c["blocks.0.attn.z"].movedim(1, 2)[m], atol=1e-5)
    meta = store.meta()
    assert meta["prompt"].tolist() == sorted(meta["prompt"].tolist())
    assert torch.equal(meta["token"], out.input_ids[m])
    assert len(store) == int(m.sum())
    part = store.read("blocks.1.resid_post", slice(35, 45))      # spans two shards, read lazily
    assert torch.equal(part, store.read("blocks.1.resid_post")[35:45])
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert man["weights_sha256"] and man["versions"]["torch"] and man["prompt_ids"][0] == "0"
    assert man["manifest_sha256"] and all(len(e["entry_sha256"]) == 64 for e in man["shards"])


def test_last_position_store(tiny_llama, tmp_path):
    store = write_activations(tiny_llama, PROMPTS, "blocks.*.resid_post", tmp_path / "s", positions="last",
                              progress=False)
    assert len(store) == len(PROMPTS)
    with hl.capture(tiny_llama, "blocks.2.resid_post", positions="last") as c:
        tiny_llama.run(PROMPTS)
    assert torch.allclose(store.read("blocks.2.resid_post"), c["blocks.2.resid_post"][:, 0], atol=1e-5)


def test_damage_and_mismatch_are_loud(tiny_llama, tmp_path):
    store = write_activations(tiny_llama, PROMPTS, "blocks.0.resid_post", tmp_path / "s", progress=False,
                              shard_rows=50)
    shard = tmp_path / "s" / store.shards[0]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged"):
        ActivationStore(tmp_path / "s").read("blocks.0.resid_post")
    with pytest.raises(FileExistsError, match="resume"):
        write_activations(tiny_llama, PROMPTS, "blocks.0.resid_post", tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match="differs in"):
        write_activations(tiny_llama, PROMPTS, "blocks.1.resid_post", tmp_path / "s", progress=False, resume=True)
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore(tmp_path)
    with pytest.raises(KeyError, match="not in this store"):
        ActivationStore(tmp_path / "s", verify=False).read("blocks.3.resid_post")
    with pytest.raises(ValueError, match="ragged"):
        write_activations(tiny_llama, PROMPTS, "blocks.0.attn.pattern", tmp_path / "p", progress=False)


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert [p.text for p in read_prompts(tmp_path / "p.txt")] == ["first", "second"]
    (tmp_path / "p.jsonl").write_text('{"id": "a", "text": "x"}\n{"text": "y"}\n')
    assert [(p.id, p.text) for p in read_prompts(tmp_path / "p.jsonl")] == [("a", "x"), ("1", "y")]
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match="'text' field"):
        read_prompts(tmp_path / "bad.jsonl")

