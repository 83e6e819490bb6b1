"""Architecture discovery on tiny random configs of each supported family, checked against HF's own tensors."""
import pytest
import torch
from torch import nn

import hiddenlens as hl
from hiddenlens.models.adapter import UnknownArchitectureError, discover_adapter
from hiddenlens.probes.handle import ModelHandle
from hiddenlens.models.tiny import tiny_tokenizer


def build(family: str):
    import transformers as tf

    tok = tiny_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    if family == "llama":
        m = tf.LlamaForCausalLM(tf.LlamaConfig(intermediate_size=64, num_key_value_heads=2, **common))
    elif family == "mistral":
        m = tf.MistralForCausalLM(tf.MistralConfig(intermediate_size=64, num_key_value_heads=2, sliding_window=8,
                                                   **common))
    elif family == "qwen2":
        m = tf.Qwen2ForCausalLM(tf.Qwen2Config(intermediate_size=64, num_key_value_heads=2, **common))
    elif family == "gemma":
        m = tf.GemmaForCausalLM(tf.GemmaConfig(intermediate_size=64, num_key_value_heads=1, head_dim=8, **common))
    elif family == "gemma2":
        m = tf.Gemma2ForCausalLM(tf.Gemma2Config(intermediate_size=64, num_key_value_heads=2, head_dim=8, **common))
    elif family == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64))
    elif family == "gpt_neox":
        m = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(intermediate_size=64, **common))
    else:
        raise KeyError(family)
    m.eval()
    return ModelHandle(m, tok, discover_adapter(m), spec=f"test-{family}")


FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gemma2", "gpt2", "gpt_neox"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_discovery_and_faithful_capture(family):
    h = build(family)
    a = h.adapter
    assert a.n_layers == 2 and a.d_model == 32
    prompts = ["The capital of France is Paris.", "one two"]
    sites = ["embed", "blocks.*.resid_pre", "blocks.*.resid_post", "blocks.*.attn.out", "blocks.*.mlp.out",
             "blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v", "blocks.1.attn.z", "blocks.1.attn.pattern",
             "final_norm", "logits"]
    with hl.capture(h, sites) as c:
        out = h.run(prompts)
    with torch.inference_mode():
        pos = (out.attention_mask.cumsum(-1) - 1).clamp(min=0)  # per-row positions, as handle.run uses
        ref = h.hf_model(input_ids=out.input_ids, attention_mask=out.attention_mask, position_ids=pos,
                         output_hidden_states=True)
    m = out.attention_mask.bool()
    assert torch.allclose(c["embed"][m], ref.hidden_states[0][m], atol=1e-5)
    assert torch.allclose(c["blocks.0.resid_post"][m], ref.hidden_states[1][m], atol=1e-5)
    assert torch.allclose(c["final_norm"][m], ref.hidden_states[-1][m], atol=1e-5)
    assert torch.allclose(c["logits"][m], ref.logits[m], atol=1e-4)
    for i in range(2):
        recon = c[f"blocks.{i}.resid_pre"] + c[f"blocks.{i}.attn.out"] + c[f"blocks.{i}.mlp.out"]
        assert torch.allclose(recon[m], c[f"blocks.{i}.resid_post"][m], atol=1e-4), family
    assert c["blocks.1.attn.q"].shape[1] == a.n_heads
    assert c["blocks.1.attn.k"].shape[1] == a.n_kv_heads
    assert c["blocks.1.attn.z"].shape[1:] == (a.n_heads, out.input_ids.shape[1], a.head_dim)
    if family == "gpt_neox":
        assert a.parallel_residual and "resid_mid" in a.unavailable
        with pytest.raises(hl.UnknownSiteError, match="parallel residual"):
            hl.capture(h, "blocks.0.resid_mid")
    else:
        with hl.capture(h, ["blocks.0.resid_pre", "blocks.0.attn.out", "blocks.0.resid_mid"]) as c2:
            h.run(prompts)
        assert torch.allclose(c2["blocks.0.resid_mid"], c2["blocks.0.resid_pre"] + c2["blocks.0.attn.out"], atol=1e-5)


def test_unknown_architecture_names_the_override():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList([nn.Linear(4, 4)])
    with pytest.raises(UnknownArchitectureError, match="adapter_overrides=.*'blocks'"):
        discover_adapter(Odd())


def test_missing_model_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a transformers checkpoint"):
        hl.load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="could not load 'no-such-org/no-such-model'"):
        hl.load_model("no-such-org/no-such-model")
    with pytest.raises(ValueError, match="unknown backend"):
        hl.load_model("tiny-llama", backend="jax")
