"""The embedded model: offline loading from the converted cache, its tokenizer's BOS, capture during generate."""
import pytest
import torch

import hiddenlens as hl
from hiddenlens.models import embedded

pytestmark = pytest.mark.embedded


def test_loaded_from_cached_safetensors_without_reconverting(smollm, monkeypatch):
    out = embedded.converted_dir()
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    import transformers

    def refuse(*a, **k):
        raise AssertionError("the GGUF was converted again although a cached copy exists")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    assert embedded.ensure_converted(progress=False) == out


def test_architecture_and_bos(smollm):
    a = smollm.adapter
    assert (a.family, a.n_layers, a.d_model, a.n_heads, a.n_kv_heads, a.head_dim) == ("llama", 30, 576, 9, 3, 64)
    tok = smollm.tokenizer
    assert tok.bos_token == "<|im_start|>" and tok.bos_token_id == 1
    assert smollm.tokenize("Hello").input_ids[0, 0] != 1                 # the tokenizer adds no BOS
    assert smollm.tokenize("Hello", add_bos=True).input_ids[0, 0] == 1


def test_capture_during_generate_equals_full_forward(smollm):
    prompts = ["The capital of France is", "Water boils at a temperature of"]
    with hl.capture(smollm, ["blocks.11.resid_post", "blocks.29.resid_post", "logits"], positions="last") as c:
        gen = smollm.generate(prompts, max_new_tokens=4)
    assert gen.texts[0].strip().startswith("Paris")
    assert c["blocks.11.resid_post"].shape == (2, 4, 576)
    assert c.positions("blocks.11.resid_post").tolist() == list(range(gen.prompt_length - 1, gen.prompt_length + 3))
    with hl.capture(smollm, ["blocks.11.resid_post", "blocks.29.resid_post", "logits"]) as full:
        rows = [r[m.bool()].tolist() for r, m in zip(gen.sequences[:, :-1], gen.attention_mask[:, :-1])]
        smollm.run(rows)
    for site in ("blocks.11.resid_post", "blocks.29.resid_post", "logits"):
        ref = full[site][:, -4:]
        assert torch.allclose(c[site], ref, rtol=1e-4, atol=1e-3), site
    # the captured last-step logits pick the generated tokens (greedy)
    assert torch.equal(c["logits"].argmax(-1), gen.new_tokens)
