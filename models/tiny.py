"""Tiny seeded random models built in memory (about a second), for tests and quick demos.

``tiny-llama``: Llama architecture, 4 layers, d_model 64, 4 query heads over 2 KV heads (grouped-query
attention), untied unembedding. ``tiny-gpt2``: GPT-2, 4 layers, d_model 64, 4 heads. Both share a byte-level
BPE tokenizer (vocabulary 512) trained in memory on Python's offline ``pydoc_data.topics`` prose, with
``<|bos|>`` (id 0), ``<|eos|>`` (id 1) and ``<|pad|>`` (id 2), and a minimal chat template.
"""
from __future__ import annotations

import functools

import torch
from pydoc_data.topics import topics

TINY_SPECS = ("tiny-llama", "tiny-gpt2")

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


def offline_prose(max_chars: int | None = None) -> str:
    """English prose shipped with CPython (the help topics of ``pydoc_data.topics``), in a fixed order."""
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text if max_chars is None else text[:max_chars]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 512) trained on offline prose; deterministic."""
    # heavy dependency (transformers / tokenizers): imported on use, so `import hiddenlens` stays light
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = offline_prose(300_000)
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>")
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def build_tiny(spec: str, seed: int = 0):
    """Return ``(model, tokenizer)`` for ``tiny-llama`` or ``tiny-gpt2``, weights seeded by ``seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # heavy dependency: on use

    tok = tiny_tokenizer()
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if spec == "tiny-llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                          rms_norm_eps=1e-5, **common)
        model = LlamaForCausalLM(cfg)
    elif spec == "tiny-gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=512, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown tiny model {spec!r}; choose one of {TINY_SPECS}")
    model.config.name_or_path = spec
    return model.eval(), tok
