"""TaH's trained half: a LoRA used only in iterations >= 1, on tiny-llama with known answers."""
import json

import pytest
import torch

from hiddenlens.interventions.decider import EntropyDecider, MaskDecider, prose_chunks
from hiddenlens.interventions.iterate import first_pass, iterate_from
from hiddenlens.interventions.tah_adapter import (AdapterConfig, AdapterMismatchError, adapted_handle,
                                                  depth_one_logits, load_adapter, save_adapter, train_adapter)


@pytest.fixture(scope="module")
def chunk(tiny_llama):
    return prose_chunks(tiny_llama, "train", 1, 24)[0]


def test_a_fresh_adapter_is_exactly_the_base_model(tiny_llama, chunk):
    lora = adapted_handle(tiny_llama, AdapterConfig(rank=4))
    everywhere = MaskDecider(torch.ones(len(chunk), dtype=torch.bool))
    with torch.no_grad():
        plain = iterate_from(tiny_llama, first_pass(tiny_llama, chunk), everywhere)
        adapted = iterate_from(tiny_llama, first_pass(tiny_llama, chunk), everywhere, lora=lora)
    torch.testing.assert_close(adapted.logits, plain.logits, atol=1e-5, rtol=1e-5)
    assert lora.hf_model is not tiny_llama.hf_model
    assert not any("lora_" in n for n, _ in tiny_llama.hf_model.named_parameters())   # the shared model untouched


def test_training_lowers_the_iterated_loss_and_leaves_the_base_unchanged(tiny_llama, chunk):
    before = {n: p.detach().clone() for n, p in tiny_llama.hf_model.named_parameters()}
    lora, history = train_adapter(tiny_llama, [chunk], EntropyDecider(0.0), AdapterConfig(rank=4, lr=5e-3, steps=25),
                                  progress=False)
    assert (history["n_positions"] == len(chunk) - 1).all()          # threshold 0: every position with a target
    assert history["loss"].iloc[0] == pytest.approx(history["loss_first"].iloc[0], rel=0.2)  # starts near z0's CE
    assert history["loss"].tail(3).mean() < history["loss"].head(3).mean() - 0.3   # nats
    for n, p in tiny_llama.hf_model.named_parameters():
        assert torch.equal(p, before[n]), n
    with torch.no_grad():
        fp = first_pass(tiny_llama, chunk)
        pos = torch.arange(len(chunk) - 1)
        z1 = depth_one_logits(lora, fp, pos)
        ce = torch.nn.functional.cross_entropy(fp.logits[pos] + z1, torch.as_tensor(chunk[1:]))
    assert float(ce) < history["loss"].head(3).mean()
    assert fp.cache.get_seq_length() == len(chunk)                  # the shared first pass is cropped back


def test_save_load_roundtrip_and_refusals(tiny_llama, chunk, tmp_path):
    lora, history = train_adapter(tiny_llama, [chunk], EntropyDecider(0.0), AdapterConfig(rank=2, steps=3),
                                  progress=False)
    folder = save_adapter(lora, tmp_path / "tah", history)
    back = load_adapter(tiny_llama, folder)
    with torch.no_grad():
        fp = first_pass(tiny_llama, chunk)
        pos = torch.tensor([1, 5, 9])
        torch.testing.assert_close(depth_one_logits(back, fp, pos), depth_one_logits(lora, fp, pos))
    with pytest.raises(FileExistsError):
        save_adapter(lora, folder)
    meta = json.loads((folder / "adapter.json").read_text())
    meta["base_weights_sha256"] = "0" * 64
    (folder / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterMismatchError, match="trained on"):
        load_adapter(tiny_llama, folder)
    with pytest.raises(FileNotFoundError, match="train-adapter"):
        load_adapter(tiny_llama, tmp_path / "nowhere")


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="positive"):
        AdapterConfig(rank=0)
    with pytest.raises(ValueError, match="target"):
        AdapterConfig(targets=[])


def test_iteration_study_reports_lora_rows(tiny_llama, chunk, tmp_path):
    from hiddenlens.studies import iteration as study

    lora, history = train_adapter(tiny_llama, [chunk], EntropyDecider(0.0), AdapterConfig(rank=2, steps=2),
                                  progress=False)
    save_adapter(lora, tmp_path / "tah", history)
    res = study.run(study.IterationConfig(model="tiny-llama", chunks=1, seq_len=24, lora=str(tmp_path / "tah")),
                    tiny_llama, progress=False)
    names = set(res.tables["summary"]["decider"])
    assert {"entropy", "entropy+lora", "always+lora", "oracle+lora"} <= names
    assert "+lora" in res.report()


def test_cli_train_adapter_then_analyze_iteration_with_it(tmp_path):
    from hiddenlens.cli import main
    from hiddenlens.studies import iteration as study

    with pytest.raises(SystemExit) as exc:
        main(["train-adapter", "--model", "tiny-llama", "--chunks", "1", "--seq-len", "16", "--steps", "2",
              "--rank", "2", "--out", str(tmp_path / "tah")])
    assert exc.value.code == 0 and (tmp_path / "tah" / "adapter.safetensors").is_file()
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "iteration", "--model", "tiny-llama", "--lora", str(tmp_path / "tah"), "--chunks", "1",
              "--seq-len", "16", "--out", str(tmp_path / "it")])
    assert exc.value.code == 0
    assert "entropy+lora" in set(study.Result.read(tmp_path / "it").tables["summary"]["decider"])


def test_cached_adapter_trains_once_then_reads_and_retrains_a_damaged_one(tiny_llama, tmp_path, monkeypatch):
    from hiddenlens.interventions import tah_adapter

    monkeypatch.setenv("HIDDENLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tah_adapter, "CACHE_RECIPE", {"chunks": 1, "seq_len": 16, "entropy_threshold": 0.0,
                                                      "steps": 2})
    first = tah_adapter.cached_adapter(tiny_llama, progress=False)
    folder = tah_adapter.cached_adapter_dir(tiny_llama)
    assert (folder / "adapter.safetensors").is_file() and str(tmp_path) in str(folder)
    again = tah_adapter.cached_adapter(tiny_llama, progress=False)
    for (n, a), (_, b) in zip(first.hf_model.named_parameters(), again.hf_model.named_parameters()):
        if "lora_" in n:
            assert torch.equal(a, b), n
    (folder / "adapter.safetensors").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="training it again"):
        tah_adapter.cached_adapter(tiny_llama, progress=False)
    assert tah_adapter.load_adapter(tiny_llama, folder) is not None
